"""Run by torchrun from test_ddp.py: train a few steps, save this rank's networks and centers
(FSDP: rank 0 saves the gathered networks).

usage: torchrun --nproc_per_node=2 tests/ddp_worker.py OUT_DIR [--resume] [--knn] key=value ...

--resume continues from OUT_DIR/checkpoint.pth; --knn runs the trainer's k-NN evaluation
after training (it writes to OUT_DIR/log.jsonl).
"""
import os
import sys

import torch

from ibot_fast import fsdp
from ibot_fast.config import build_config
from ibot_fast.train import Trainer


def main():
    out_dir, args = sys.argv[1], sys.argv[2:]
    flags = {a for a in args if a.startswith("--")}
    overrides = [a for a in args if not a.startswith("--")]
    torch.set_num_threads(1)
    cfg = build_config("demo", [f"train.output_dir={out_dir}", *overrides])
    trainer = Trainer(cfg, resume="auto" if "--resume" in flags else None)
    trainer.run()
    trainer.loss.finish_center_update()
    if "--knn" in flags:
        trainer.evaluate_knn()
    rank = int(os.environ.get("RANK", "0"))
    state = trainer.network_state_dicts()  # every rank gathers; FSDP: rank 0 gets them
    if rank == 0 or not trainer.sharded:
        torch.save({"teacher": state["teacher"], "student": state["student"],
                    "center": trainer.loss.center, "center2": trainer.loss.center2,
                    "sharded": trainer.sharded,
                    "local_numel": sum(fsdp.local(p).numel()
                                       for p in trainer.student_module.parameters())},
                   os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
