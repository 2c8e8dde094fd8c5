"""AdamW step of the student fused with the teacher EMA, the pure-PyTorch truth (twin of
`ibot_fast.kernels.adamw_ema_`), on one flat fp32 segment (one parameter group).

Per element, in fp32, with k = step + 1 the update's 1-based count (see `adamw_ema_`):

    g  = grad * grad_scale                                  (grad_scale optional)
    m  = m + (1 - b1) * (g - m)                             (torch's exp_avg.lerp_)
    v  = b2 * v + (1 - b2) * (g * g)
    p  = p * (1 - lr * wd) - (lr / bc1[k]) * (m / (sqrt(v) / bc2_sqrt[k] + eps))
    t  = momentum * t + (1 - momentum) * p                  (the EMA, on the new p)

with `bc1[k] = 1 - b1^k`, `bc2_sqrt[k] = sqrt(1 - b2^k)` computed in double on the host
and rounded to fp32 (`bias_correction_table`). When `found_inf` is nonzero, p, m, v and
the step count are left alone (torch's fused AdamW with `found_inf`) and the EMA still runs.
This is `torch.optim.AdamW` (decoupled weight decay) followed by the official EMA, with
a fixed order of fp32 roundings that the Triton kernel reproduces bit for bit.
"""
import functools
import math
from typing import Optional, Union

import torch
from torch import Tensor

from .ema import ema_

# Table rows past this many steps are clamped (only betas within ~1e-5 of 1 get there).
MAX_TABLE_ROWS = 1 << 21


@functools.lru_cache(maxsize=None)
def bias_correction_table(beta1: float, beta2: float, device: torch.device) -> Tensor:
    """`[L, 2]` fp32 rows `(1 - beta1^k, sqrt(1 - beta2^k))` for k = 0 .. L - 1.

    Computed in double as torch's single-tensor AdamW does, then rounded to fp32. L is the
    first k at which both fp32 values are exactly 1.0 (then every later step reads the last
    row exactly); ~18,700 rows for beta2 = 0.999. Built once per (betas, device) and kept,
    so a device-side step count needs no host sync.
    """
    rows = 2
    for beta in (beta1, beta2):
        if 0.0 < beta < 1.0:
            rows = max(rows, math.ceil(math.log(2.0 ** -26) / math.log(beta)) + 1)
    rows = min(rows, MAX_TABLE_ROWS)
    table = torch.tensor([(1 - beta1 ** k, (1 - beta2 ** k) ** 0.5) for k in range(rows)],
                         dtype=torch.float64)
    return table.to(device=device, dtype=torch.float32)


def _sqrt_rn(x: Tensor) -> Tensor:
    """Correctly rounded fp32 square root (torch's vectorised CPU sqrt may be 1 ulp off;
    sqrt in double then rounded to fp32 is exact to the last bit)."""
    return x.double().sqrt().to(x.dtype)


@torch.no_grad()
def adamw_ema_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
               teacher: Tensor, step: Tensor, *, lr: float, weight_decay: float,
               momentum: Union[float, Tensor], beta1: float = 0.9, beta2: float = 0.999,
               eps: float = 1e-8, grad_scale: Optional[Tensor] = None,
               found_inf: Optional[Tensor] = None, frozen: bool = False) -> None:
    """Twin of `ibot_fast.kernels.adamw_ema_` (same arguments, same in-place results)."""
    if frozen:
        ema_(teacher, param, momentum)
        return
    table = bias_correction_table(beta1, beta2, param.device)
    if found_inf is None:
        apply = torch.ones((), dtype=torch.bool, device=param.device)
    else:
        apply = found_inf == 0
    k = (step.long() + 1).clamp(1, len(table) - 1)
    bc1, bc2_sqrt = table[k, 0], table[k, 1]

    g = grad.float()
    if grad_scale is not None:
        g = g * grad_scale.float()
    m = exp_avg + (1 - beta1) * (g - exp_avg)
    v = beta2 * exp_avg_sq + (1 - beta2) * (g * g)
    denom = _sqrt_rn(v) / bc2_sqrt + eps
    step_size = torch.full_like(bc1, lr) / bc1  # not `lr / bc1`: that is lr * (1 / bc1)
    p = param * (1 - lr * weight_decay) - step_size * (m / denom)

    param.copy_(torch.where(apply, p, param))
    exp_avg.copy_(torch.where(apply, m, exp_avg))
    exp_avg_sq.copy_(torch.where(apply, v, exp_avg_sq))
    ema_(teacher, param, momentum)
    step.add_(apply.to(step.dtype))
