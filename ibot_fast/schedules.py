"""Per-iteration schedules, precomputed as arrays (docs/design.md §1.5).

lr: linear warm-up from 0 over `warmup_epochs`, then cosine to `min_lr`; weight decay:
cosine from `weight_decay` to `weight_decay_end`; teacher momentum: cosine from
`momentum_teacher` to 1. The teacher temperatures are per epoch (loss.py), as official.
"""
from dataclasses import dataclass

import numpy as np


def cosine_schedule(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup=0.0):
    """Official iBOT/DINO `cosine_scheduler`: one value per iteration."""
    total = epochs * niter_per_ep
    warmup_iters = min(int(warmup_epochs * niter_per_ep), total)  # short runs: all warm-up
    warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(total - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray

    def at(self, it: int) -> dict:
        return {"lr": float(self.lr[it]), "wd": float(self.wd[it]),
                "momentum": float(self.momentum[it])}


def build_schedules(cfg, niter_per_ep: int, peak_lr: float) -> Schedules:
    o, epochs = cfg.optim, cfg.train.epochs
    return Schedules(
        lr=cosine_schedule(peak_lr, o.min_lr, epochs, niter_per_ep, o.warmup_epochs),
        wd=cosine_schedule(o.weight_decay, o.weight_decay_end, epochs, niter_per_ep),
        momentum=cosine_schedule(o.momentum_teacher, 1.0, epochs, niter_per_ep),
    )
