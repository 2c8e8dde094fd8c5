"""Run by torchrun from test_ddp.py: train a few steps, save this rank's networks and centers
(FSDP: rank 0 saves the gathered networks).

usage: torchrun --nproc_per_node=2 tests/ddp_worker.py OUT_DIR [--resume] [--knn] key=value ...

--resume continues from OUT_DIR/checkpoint.pth; --knn runs the trainer's k-NN evaluation
after training (it writes to OUT_DIR/log.jsonl). Faults on rank 1 only, to check that
every process decides alike: --nan-on-rank1 makes its loss NaN at iteration 1;
--usr2-on-rank1-at-epoch-end sends it SIGUSR2 during the first epoch's last step;
--bad-on-rank1 reports 4 unreadable images per batch there. A UserError is written to
OUT_DIR/error{rank}.txt instead of a traceback.
"""
import os
import signal
import sys

import torch

from ibot_fast import UserError, dist, fsdp
from ibot_fast.config import build_config
from ibot_fast.train import Trainer


def main():
    out_dir, args = sys.argv[1], sys.argv[2:]
    flags = {a for a in args if a.startswith("--")}
    overrides = [a for a in args if not a.startswith("--")]
    torch.set_num_threads(1)
    cfg = build_config("demo", [f"train.output_dir={out_dir}", *overrides])
    trainer = Trainer(cfg, resume="auto" if "--resume" in flags else None)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 1:
        inject_faults(trainer, flags)
    try:
        result = trainer.run()
    except UserError as e:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(str(e))
        return
    trainer.loss.finish_center_update()
    if "--knn" in flags:
        trainer.evaluate_knn()
    if trainer.sharded:  # this process's shards, to compare HSDP's replicas
        torch.save({n: fsdp.local(p).detach() for n, p in
                    trainer.student_module.named_parameters()},
                   os.path.join(out_dir, f"local{rank}.pt"))
    state = trainer.network_state_dicts()  # every rank gathers; FSDP: rank 0 gets them
    if rank == 0 or not trainer.sharded:
        torch.save({"teacher": state["teacher"], "student": state["student"],
                    "center": trainer.loss.center, "center2": trainer.loss.center2,
                    "sharded": trainer.sharded, "nonfinite": int(trainer.nonfinite_total),
                    "status": str(result["status"]), "iteration": trainer.iteration,
                    "local_numel": sum(fsdp.local(p).numel()
                                       for p in trainer.student_module.parameters())},
                   os.path.join(out_dir, f"rank{rank}.pt"))


class BadReads:
    """The trainer's loader, every batch reporting 4 unreadable images."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            yield {**batch, "n_bad": 4}

    def __getattr__(self, name):
        return getattr(self.loader, name)


def inject_faults(trainer, flags):
    if "--bad-on-rank1" in flags:
        trainer.loader = BadReads(trainer.loader)
    step = trainer.train_step

    def faulty_step(batch, it, epoch):
        if "--usr2-on-rank1-at-epoch-end" in flags and it == trainer.iters_per_epoch - 1:
            out = step(batch, it, epoch)
            os.kill(os.getpid(), signal.SIGUSR2)  # during the epoch's last step
            return out
        if "--nan-on-rank1" in flags and it == 1:
            loss_terms = trainer.loss_terms

            def nan_loss(*args, **kwargs):
                losses = loss_terms(*args, **kwargs)
                return {**losses, "loss": losses["loss"] * float("nan")}
            trainer.loss_terms = nan_loss
            try:
                return step(batch, it, epoch)
            finally:
                del trainer.loss_terms
        return step(batch, it, epoch)
    trainer.train_step = faulty_step


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        dist.destroy()
        raise
    dist.end(0)  # as ibot_fast.train.main (dist.end says why)
