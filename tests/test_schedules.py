"""Per-iteration schedules (ibot_fast/schedules.py) against the official DINO / iBOT
`cosine_scheduler`, computed here from its definition: a linear warm-up
from `start_warmup_value` over `warmup_epochs * niter_per_ep` iterations (both ends
included), then `final + 0.5 (base - final) (1 + cos(pi i / n))` for i = 0 .. n - 1.
Its last value is therefore one step short of `final`: final + (base - final)
(1 - cos(pi / n)) / 2, within (base - final) (pi / n)^2 / 4 of it.
"""
import math

import numpy as np
import pytest

from ibot_fast.config import build_config
from ibot_fast.schedules import Schedules, build_schedules, cosine_schedule


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                              start_warmup_value=0):
    """The official schedule's values, one iteration at a time, from its definition
    (module docstring): w = warmup_epochs * niter_per_ep warm-up iterations evenly from
    start to base (both ends included), then n = total - w cosine iterations."""
    total = epochs * niter_per_ep
    w = warmup_epochs * niter_per_ep
    n = total - w
    values = []
    for it in range(total):
        if it < w:
            step = (base_value - start_warmup_value) / (w - 1) if w > 1 else 0.0
            values.append(start_warmup_value + it * step if it < w - 1 else base_value)
        else:
            i = it - w
            values.append(final_value + 0.5 * (base_value - final_value)
                          * (1 + math.cos(math.pi * i / n)))
    return np.array(values)


def _last_step_gap(base, final, n):
    """How far the official schedule's last value is from `final` (n cosine iterations)."""
    return 0.5 * (base - final) * (1 - math.cos(math.pi / n))


@pytest.mark.parametrize("base, final, epochs, niter, warmup, start", [
    (1e-3, 1e-6, 100, 37, 10, 0.0),   # lr: warm-up, then cosine down
    (0.04, 0.4, 30, 11, 0, 0.0),      # weight decay: cosine up, no warm-up
    (0.996, 1.0, 12, 250, 0, 0.0),    # teacher momentum
    (2e-3, 1e-6, 5, 3, 2, 1e-4),      # warm-up from a nonzero start
    (0.5, 0.5, 4, 7, 1, 0.0),         # flat
    (1.0, 0.0, 1, 1, 0, 0.0),         # a single iteration
])
def test_cosine_schedule_equals_official(base, final, epochs, niter, warmup, start):
    ours = cosine_schedule(base, final, epochs, niter, warmup, start)
    official = official_cosine_scheduler(base, final, epochs, niter, warmup, start)
    assert ours.shape == official.shape == (epochs * niter,)
    np.testing.assert_allclose(ours, official, rtol=1e-13, atol=1e-16)


def test_warmup_then_cosine_endpoints():
    base, final, epochs, niter, warmup, start = 1e-3, 1e-6, 20, 50, 4, 1e-5
    lr = cosine_schedule(base, final, epochs, niter, warmup, start)
    w = warmup * niter
    assert len(lr) == epochs * niter
    assert lr[0] == start and lr[w - 1] == pytest.approx(base, rel=1e-15)
    steps = np.diff(lr[:w])  # linear: equal steps of (base - start) / (w - 1)
    np.testing.assert_allclose(steps, (base - start) / (w - 1), rtol=1e-9)
    assert lr[w] == pytest.approx(base, rel=1e-15)  # the cosine starts at the peak
    assert (np.diff(lr[w:]) < 0).all() and (lr > final).all()
    n = len(lr) - w
    assert lr[-1] == pytest.approx(final + _last_step_gap(base, final, n), rel=1e-12)
    assert lr[-1] - final <= (base - final) * (math.pi / n) ** 2 / 4
    # half-way through the cosine: the mean of peak and final
    assert lr[w + n // 2] == pytest.approx((base + final) / 2, rel=1e-12)


def test_short_run_is_all_warmup():
    """More warm-up epochs than epochs (the official code fails there): the run is warm-up
    only, from start to base, one value per iteration."""
    lr = cosine_schedule(1.0, 0.0, 2, 3, warmup_epochs=5, start_warmup=0.5)
    np.testing.assert_allclose(lr, np.linspace(0.5, 1.0, 6), rtol=1e-15)


@pytest.mark.parametrize("preset, overrides, niter", [
    (None, [], 40),  # defaults: 100 epochs, warm-up 10, wd 0.04 -> 0.4, momentum 0.996
    ("demo", ["optim.momentum_teacher=0.99", "optim.min_lr=2e-6"], 7),
])
def test_build_schedules_follows_the_config(preset, overrides, niter):
    cfg = build_config(preset, overrides)
    o, epochs = cfg.optim, cfg.train.epochs
    peak = 3e-3
    sched = build_schedules(cfg, niter, peak)
    total = epochs * niter
    assert len(sched.lr) == len(sched.wd) == len(sched.momentum) == total

    official = dict(
        lr=official_cosine_scheduler(peak, o.min_lr, epochs, niter, o.warmup_epochs),
        wd=official_cosine_scheduler(o.weight_decay, o.weight_decay_end, epochs, niter),
        momentum=official_cosine_scheduler(o.momentum_teacher, 1, epochs, niter))
    for name, expected in official.items():
        np.testing.assert_allclose(getattr(sched, name), expected, rtol=1e-13, atol=1e-16,
                                   err_msg=name)

    # lr: linear warm-up from 0 to the peak given (the batch-scaled lr), cosine to min_lr
    w = o.warmup_epochs * niter
    assert 0 < w < total
    assert sched.lr[0] == 0.0 and sched.lr[w - 1] == pytest.approx(peak, rel=1e-15)
    assert (np.diff(sched.lr[:w]) > 0).all() and (np.diff(sched.lr[w:]) < 0).all()
    gap = _last_step_gap(peak, o.min_lr, total - w)
    assert sched.lr[-1] == pytest.approx(o.min_lr + gap, rel=1e-12)
    assert o.min_lr < sched.lr[-1] <= o.min_lr + peak * (math.pi / (total - w)) ** 2 / 4
    # weight decay: cosine up from weight_decay to weight_decay_end, no warm-up
    assert sched.wd[0] == pytest.approx(o.weight_decay, abs=1e-15)
    assert (np.diff(sched.wd) > 0).all()
    assert sched.wd[-1] == pytest.approx(
        o.weight_decay_end - _last_step_gap(o.weight_decay_end, o.weight_decay, total),
        rel=1e-12)
    # teacher momentum: cosine up to 1, no warm-up, never above 1
    assert sched.momentum[0] == pytest.approx(o.momentum_teacher, abs=1e-15)
    assert (np.diff(sched.momentum) > 0).all() and (sched.momentum < 1).all()
    assert sched.momentum[-1] == pytest.approx(
        1 - _last_step_gap(1, o.momentum_teacher, total), rel=1e-15)
    assert 1 - sched.momentum[-1] <= (1 - o.momentum_teacher) * (math.pi / total) ** 2 / 4


def test_default_recipe_values():
    """The defaults are iBOT's: weight decay 0.04 -> 0.4, teacher momentum 0.996 -> 1."""
    cfg = build_config()
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.4)
    assert cfg.optim.momentum_teacher == 0.996
    sched = build_schedules(cfg, 100, 5e-4)
    assert sched.wd[0] == pytest.approx(0.04, abs=1e-15)
    # 10,000 iterations: one cosine step short of the end is 9e-9, 1e-10 and 1.5e-11 away
    assert sched.wd[-1] == pytest.approx(0.4, abs=3e-8)
    assert sched.momentum[-1] == pytest.approx(1.0, abs=2e-10)
    assert sched.lr[-1] == pytest.approx(cfg.optim.min_lr, abs=3e-11)


def test_at_returns_python_floats_of_one_iteration():
    sched = Schedules(lr=np.array([0.1, 0.2]), wd=np.array([0.3, 0.4]),
                      momentum=np.array([0.5, 0.6]))
    values = sched.at(1)
    assert values == {"lr": 0.2, "wd": 0.4, "momentum": 0.6}
    assert all(type(v) is float for v in values.values())
