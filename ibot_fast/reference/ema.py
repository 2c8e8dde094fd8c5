"""Teacher EMA, the pure-PyTorch truth: `teacher <- m * teacher + (1 - m) * student`.

`ema_loop_` is the official iBOT update, one parameter at a time (two kernel launches
each on a GPU). `ema_` is the twin of `ibot_fast.kernels.ema_` on flat 1-D buffers: it
computes the same fp32 expression as the kernel, so the two agree bit for bit.
"""
from typing import Iterable, Union

import torch
from torch import Tensor

Momentum = Union[float, Tensor]


@torch.no_grad()
def ema_loop_(teacher_params: Iterable[Tensor], student_params: Iterable[Tensor],
              momentum: Momentum) -> None:
    """The official iBOT loop: `for t, s: t.mul_(m).add_((1 - m) * s)`.

    In fp32: `fl(fl(t * m) + fl((1 - m) * s))`, three roundings, with `m` and `1 - m`
    rounded to fp32 from Python doubles (or, for a 0-d fp32 tensor `m`, `1 - m` formed
    in fp32).
    """
    for t, s in zip(teacher_params, student_params, strict=True):
        t.mul_(momentum).add_((1 - momentum) * s.detach())


@torch.no_grad()
def ema_(teacher: Tensor, student: Tensor, momentum: Momentum) -> Tensor:
    """Twin of `ibot_fast.kernels.ema_`: in place on the 1-D `teacher`, returns it.

    fp32 (and fp64) buffers: exactly `ema_loop_` on one tensor. 16-bit buffers: upcast,
    the same fp32 expression, one rounding back (the kernel does the same).
    """
    if isinstance(momentum, Tensor):
        momentum = momentum.to(device=teacher.device, dtype=torch.float32)
    if teacher.dtype in (torch.float32, torch.float64):
        return teacher.mul_(momentum).add_((1 - momentum) * student)
    t = teacher.float().mul_(momentum).add_((1 - momentum) * student.float())
    return teacher.copy_(t)
