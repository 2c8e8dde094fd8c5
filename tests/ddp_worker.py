"""Run by torchrun from test_ddp.py: train a few steps, save this rank's teacher and centers.

usage: torchrun --nproc_per_node=2 tests/ddp_worker.py OUT_DIR key=value ...
"""
import os
import sys

import torch

from ibot_fast.config import build_config
from ibot_fast.train import Trainer


def main():
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    cfg = build_config("demo", [f"train.output_dir={out_dir}", *overrides])
    trainer = Trainer(cfg)
    trainer.run()
    trainer.loss.finish_center_update()
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"teacher": trainer.teacher.state_dict(),
                "student": trainer.student_module.state_dict(),
                "center": trainer.loss.center, "center2": trainer.loss.center2},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
