"""The student's AdamW step and the teacher's EMA in one pass over a flat fp32 segment.

Per element (fp32; k = step + 1, bc1[k] = 1 - b1^k, bc2_sqrt[k] = sqrt(1 - b2^k)):

    g  = grad * grad_scale                                    (optional, device scalar)
    m  = m + (1 - b1) * (g - m)
    v  = b2 * v + (1 - b2) * (g * g)
    p  = p * (1 - lr * wd) - (lr / bc1[k]) * (m / (sqrt(v) / bc2_sqrt[k] + eps))
    t  = momentum * t + (1 - momentum) * p                    (EMA on the updated p)

that is `torch.optim.AdamW` (decoupled weight decay, per-group step count) followed by
`ibot_fast.kernels.ema_`, the twin being `ibot_fast.reference.adamw_ema.adamw_ema_`.
Every operation is rounded separately (FMA contraction off, `sqrt_rn`, `div_rn`), in the
twin's order, so kernel and twin agree bit for bit; against torch's own AdamW (another
rounding order: lerp, addcdiv, double step size) they agree to a few fp32 ulps.

Device-side state, no host sync, CUDA-graph friendly:
- `step` is a 0-d tensor (updates applied so far, like torch's `state["step"]`); the
  kernel reads it and indexes a per-(betas, device) table of bias corrections computed
  once in double (`bias_correction_table`); the host function then adds 1 to it on the
  device (0 when `found_inf` is nonzero), as torch's fused AdamW does.
- `grad_scale` (0-d, optional) multiplies the gradient in the kernel: the global-norm
  clipping coefficient and/or 1 / loss scale, without a separate pass over the grads.
- `found_inf` (0-d, optional): when nonzero the AdamW update is skipped (nothing is
  written but the teacher) and the EMA still runs on the unchanged parameters.

Bytes per element: read grad, exp_avg, exp_avg_sq, param, teacher (4 x 4 B + grad size);
write exp_avg, exp_avg_sq, param, teacher (4 x 4 B): 36 B with fp32 grads, against 40 B
for a fused AdamW step (read 4, write 3) followed by `ema_` (read 2, write 1), and 48 B
when clipping also rescales the gradients in place first.

One launch per segment (parameter group): groups differ in lr / weight decay / step
count, and a frozen group (the iBOT last layer during `freeze_last_layer` epochs, whose
gradients torch drops) only gets the EMA (`frozen=True`: no moment, parameter or step
update, exactly what torch AdamW does with `p.grad = None`).
"""
from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ibot_fast.reference import adamw_ema as reference
from ibot_fast.reference.adamw_ema import bias_correction_table

from .ema import ema_
from .utils import use_triton

LAUNCH = (2048, 8)  # (BLOCK, num_warps): elementwise, 8 fp32 of each stream per thread


@triton.jit
def _adamw_ema_kernel(
    param_ptr,  # [n] fp32 student parameters, updated in place
    grad_ptr,  # [n] gradient, fp32 / bf16 / fp16
    exp_avg_ptr,  # [n] fp32 first moment, updated in place
    exp_avg_sq_ptr,  # [n] fp32 second moment, updated in place
    teacher_ptr,  # [n] fp32 teacher parameters, updated in place (EMA)
    step_ptr,  # [] AdamW updates applied so far to this segment (read only)
    bias_ptr,  # [last_row + 1, 2] fp32 rows (1 - b1^k, sqrt(1 - b2^k))
    grad_scale_ptr,  # [] fp32 gradient multiplier (read when HAS_GRAD_SCALE)
    found_inf_ptr,  # [] nonzero: skip the AdamW update (read when HAS_FOUND_INF)
    momentum_ptr,  # [] fp32 EMA momentum on the device (read when MOMENTUM_ON_DEVICE)
    n_elements,  # elements in the segment
    last_row,  # steps past the table use its last row
    lr,  # fp32 learning rate
    decay,  # fp32 (1 - lr * weight_decay), rounded from the host's double
    beta2,  # fp32 b2
    one_minus_beta1,  # fp32 (1 - b1)
    one_minus_beta2,  # fp32 (1 - b2)
    eps,  # fp32 epsilon
    momentum,  # fp32 EMA momentum m (when not MOMENTUM_ON_DEVICE)
    one_minus_momentum,  # fp32 (1 - m), rounded from the host's double
    HAS_GRAD_SCALE: tl.constexpr,  # multiply the gradient by *grad_scale_ptr
    HAS_FOUND_INF: tl.constexpr,  # skip the update when *found_inf_ptr != 0
    MOMENTUM_ON_DEVICE: tl.constexpr,  # m = *momentum_ptr, 1 - m formed in fp32
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    update = mask  # elements whose AdamW update is stored: none on an overflow step
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
        update = offsets < tl.where(skip, 0, n_elements)
    row = tl.minimum(tl.load(step_ptr).to(tl.int64) + 1, last_row)
    bc1 = tl.load(bias_ptr + 2 * row)
    bc2_sqrt = tl.load(bias_ptr + 2 * row + 1)

    p = tl.load(param_ptr + offsets, mask=mask)
    t = tl.load(teacher_ptr + offsets, mask=mask)
    g = tl.load(grad_ptr + offsets, mask=update, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=update)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=update)
    if HAS_GRAD_SCALE:
        g = g * tl.load(grad_scale_ptr)

    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p_new = p * decay - tl.div_rn(lr, bc1) * tl.div_rn(m, denom)
    tl.store(exp_avg_ptr + offsets, m, mask=update)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=update)
    tl.store(param_ptr + offsets, p_new, mask=update)

    if HAS_FOUND_INF:
        p_new = tl.where(skip, p, p_new)
    if MOMENTUM_ON_DEVICE:
        momentum = tl.load(momentum_ptr)
        one_minus_momentum = 1.0 - momentum
    t = t * momentum + p_new * one_minus_momentum
    tl.store(teacher_ptr + offsets, t, mask=mask)


def _check(param, grad, exp_avg, exp_avg_sq, teacher, step, grad_scale, found_inf):
    buffers = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
               "teacher": teacher}
    for name, t in buffers.items():
        if t.dim() != 1 or not t.is_contiguous() or t.numel() != param.numel():
            raise ValueError(f"{name} must be a contiguous 1-D tensor of {param.numel()} "
                             f"elements, got {tuple(t.shape)}")
        if t.device != param.device:
            raise ValueError(f"{name} is on {t.device}, param on {param.device}")
        if name != "grad" and t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 (master weights), got {t.dtype}")
    if not grad.is_floating_point():
        raise ValueError(f"grad must be floating point, got {grad.dtype}")
    for name, t in {"step": step, "grad_scale": grad_scale, "found_inf": found_inf}.items():
        if t is not None and (t.dim() != 0 or t.device != param.device):
            raise ValueError(f"{name} must be a 0-d tensor on {param.device}, got "
                             f"{tuple(t.shape)} on {t.device}")


def adamw_ema_fwd(param, grad, exp_avg, exp_avg_sq, teacher, step, *, lr, weight_decay,
                  momentum, beta1, beta2, eps, grad_scale, found_inf) -> None:
    """Check the segment, launch `_adamw_ema_kernel`, then advance `step` on the device."""
    _check(param, grad, exp_avg, exp_avg_sq, teacher, step, grad_scale, found_inf)
    n = param.numel()
    if isinstance(momentum, Tensor):
        momentum_ptr = momentum.to(device=param.device, dtype=torch.float32)
        m, c = 0.0, 0.0
    else:
        momentum_ptr = None
        m, c = float(momentum), 1.0 - float(momentum)
    table = bias_correction_table(beta1, beta2, param.device)
    if grad_scale is not None:
        grad_scale = grad_scale.to(torch.float32)
    if n:
        block, num_warps = LAUNCH
        _adamw_ema_kernel[(triton.cdiv(n, block),)](
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            teacher,
            step,
            table,
            grad_scale,
            found_inf,
            momentum_ptr,
            n,
            table.shape[0] - 1,
            lr,
            1.0 - lr * weight_decay,
            beta2,
            1.0 - beta1,
            1.0 - beta2,
            eps,
            m,
            c,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            MOMENTUM_ON_DEVICE=momentum_ptr is not None,
            BLOCK=block,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    step.add_(1 if found_inf is None else (found_inf == 0).to(step.dtype))


@torch.no_grad()
def adamw_ema_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
               teacher: Tensor, step: Tensor, *, lr: float, weight_decay: float,
               momentum: Union[float, Tensor], beta1: float = 0.9, beta2: float = 0.999,
               eps: float = 1e-8, grad_scale: Optional[Tensor] = None,
               found_inf: Optional[Tensor] = None, frozen: bool = False) -> None:
    """AdamW on one flat segment of the student, then the teacher EMA, in one pass.

    param, exp_avg, exp_avg_sq, teacher: contiguous 1-D fp32 tensors of one size (the
        segment's views of the flat student, moment and teacher buffers); updated in place.
    grad: same size, fp32 / bf16 / fp16; read only.
    step: 0-d tensor (any real dtype) on the same device: AdamW updates applied so far to
        this segment; incremented in place on the device (by 0 when `found_inf` != 0).
    lr, weight_decay: this group's values (Python floats; weight decay is decoupled,
        `p *= 1 - lr * wd`). momentum: the EMA momentum, a Python float or a 0-d tensor
        read on the device (as in `ema_`). beta1, beta2, eps: as torch AdamW.
    grad_scale: optional 0-d tensor multiplying the gradient (clip coefficient, 1/scale).
    found_inf: optional 0-d tensor; nonzero skips the AdamW update (EMA still runs).
    frozen: the group's gradients are dropped this step: no AdamW update and no step
        increment, the EMA only (`ema_(teacher, param, momentum)`).
    CUDA tensors run the Triton kernel; CPU tensors run it under `TRITON_INTERPRET=1`,
    else the twin `ibot_fast.reference.adamw_ema.adamw_ema_`.
    """
    if frozen:
        ema_(teacher, param, momentum)
        return
    if not use_triton(param, grad, exp_avg, exp_avg_sq, teacher, step, grad_scale, found_inf):
        reference.adamw_ema_(param, grad, exp_avg, exp_avg_sq, teacher, step, lr=lr,
                             weight_decay=weight_decay, momentum=momentum, beta1=beta1,
                             beta2=beta2, eps=eps, grad_scale=grad_scale, found_inf=found_inf)
        return
    adamw_ema_fwd(param, grad, exp_avg, exp_avg_sq, teacher, step, lr=lr,
                  weight_decay=weight_decay, momentum=momentum, beta1=beta1, beta2=beta2,
                  eps=eps, grad_scale=grad_scale, found_inf=found_inf)
