"""Teacher EMA over flat parameter buffers: every parameter in one launch.

    teacher <- m * teacher + (1 - m) * student          (elementwise, in place on teacher)

Arithmetic form. `ema_` computes, in fp32, `fl(fl(t * m) + fl((1 - m) * s))`: three
roundings, with FMA contraction switched off at launch, `m` and `1 - m` rounded to fp32
from the host's doubles (a 0-d tensor `m` is read on the device as fp32 and `1 - m` is
formed there in fp32). That is exactly what the official iBOT loop
`t.mul_(m).add_((1 - m) * s)` computes on fp32 tensors, so on fp32 buffers `ema_` equals
`ibot_fast.reference.ema.ema_loop_` (and the twin `ibot_fast.reference.ema.ema_`) bit
for bit. 16-bit buffers are upcast, updated in fp32 and rounded once; fp64 buffers are
left to the twin.

Bytes per element: read 2 (teacher, student), write 1 (teacher) = 3 x element size
(12 B in fp32).

`foreach_ema_` is the multi-tensor form for parameters that cannot live in one buffer
(FSDP shards): `torch._foreach_lerp_(t, s, 1 - m)`, i.e. `t + (1 - m) * (s - t)`, one
fused pass per chunk of tensors (read 2, write 1), equal to the loop within
4 * eps32 * (|t| + |s|) per element (a different rounding order, not bit-exact).
"""
from typing import Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ibot_fast.reference import ema as reference

from .utils import use_triton

Momentum = Union[float, Tensor]


@triton.jit
def _ema_kernel(
    teacher_ptr,  # [n] teacher buffer, updated in place
    student_ptr,  # [n] student buffer, read only
    momentum_ptr,  # [] fp32 momentum on the device (read when MOMENTUM_ON_DEVICE)
    momentum,  # fp32 m (used when not MOMENTUM_ON_DEVICE)
    one_minus_momentum,  # fp32 (1 - m), rounded from the host's double
    n_elements,  # number of elements of both buffers
    MOMENTUM_ON_DEVICE: tl.constexpr,  # read m from momentum_ptr, form 1 - m in fp32
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    if MOMENTUM_ON_DEVICE:
        m = tl.load(momentum_ptr)
        c = 1.0 - m
    else:
        m = momentum
        c = one_minus_momentum
    t = tl.load(teacher_ptr + offsets, mask=mask).to(tl.float32)
    s = tl.load(student_ptr + offsets, mask=mask).to(tl.float32)
    t = t * m + s * c
    tl.store(teacher_ptr + offsets, t.to(teacher_ptr.dtype.element_ty), mask=mask)


def _launch_config(element_size: int):
    """(BLOCK, num_warps) for a streaming elementwise pass: 64 B per thread per tensor."""
    block = 16384 // element_size  # 4096 fp32 / 8192 bf16 elements
    return block, 8


def ema_fwd(teacher: Tensor, student: Tensor, momentum: Momentum) -> Tensor:
    """Check the buffers, launch `_ema_kernel` over all of them, return `teacher`."""
    if teacher.dim() != 1 or student.dim() != 1:
        raise ValueError(f"ema_ takes 1-D buffers, got {tuple(teacher.shape)} and "
                         f"{tuple(student.shape)}")
    if teacher.numel() != student.numel() or teacher.dtype != student.dtype:
        raise ValueError(f"teacher ({teacher.numel()}, {teacher.dtype}) and student "
                         f"({student.numel()}, {student.dtype}) differ in size or dtype")
    if not teacher.is_floating_point():
        raise ValueError(f"ema_ takes floating-point buffers, got {teacher.dtype}")
    if not (teacher.is_contiguous() and student.is_contiguous()):
        raise ValueError("ema_ takes contiguous buffers")
    n = teacher.numel()
    if n == 0:
        return teacher
    if isinstance(momentum, Tensor):
        momentum_ptr = momentum.to(device=teacher.device, dtype=torch.float32)
        m, c = 0.0, 0.0
    else:
        momentum_ptr = None
        m, c = float(momentum), 1.0 - float(momentum)
    block, num_warps = _launch_config(teacher.element_size())
    _ema_kernel[(triton.cdiv(n, block),)](
        teacher,
        student,
        momentum_ptr,
        m,
        c,
        n,
        MOMENTUM_ON_DEVICE=momentum_ptr is not None,
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return teacher


@torch.no_grad()
def ema_(teacher: Tensor, student: Tensor, momentum: Momentum) -> Tensor:
    """`teacher <- m * teacher + (1 - m) * student`, in place, in one pass; returns teacher.

    teacher, student: 1-D contiguous buffers of the same size and floating dtype, on one
    device (typically `FlatParams` buffers, so this updates every parameter at once).
    momentum: a Python float, or a 0-d tensor read on the device (no host sync; CUDA-graph
    friendly). Not differentiable. CUDA tensors run the Triton kernel; CPU tensors run
    it under `TRITON_INTERPRET=1`, else the twin `ibot_fast.reference.ema.ema_`. fp64
    buffers (reference checks) always take the twin: the kernel computes in fp32.
    """
    if use_triton(teacher, student) and teacher.dtype != torch.float64:
        return ema_fwd(teacher, student, momentum)
    return reference.ema_(teacher, student, momentum)


@torch.no_grad()
def foreach_ema_(teacher_tensors: Sequence[Tensor], student_tensors: Sequence[Tensor],
                 momentum: Momentum) -> None:
    """The EMA on lists of tensors (any shapes, e.g. FSDP shards) with `torch._foreach_*`.

    Float momentum: `t + (1 - m) * (s - t)` by `torch._foreach_lerp_` (read 2, write 1).
    0-d tensor momentum (no host sync): the loop's form `m * t + (1 - m) * s` in three
    multi-tensor passes (read 4, write 3 and a temporary copy of the student).
    """
    teacher_tensors, student_tensors = list(teacher_tensors), list(student_tensors)
    if len(teacher_tensors) != len(student_tensors):
        raise ValueError(f"{len(teacher_tensors)} teacher tensors but "
                         f"{len(student_tensors)} student tensors")
    if not teacher_tensors:
        return
    if isinstance(momentum, Tensor):
        momentum = momentum.to(teacher_tensors[0].device)
        torch._foreach_mul_(teacher_tensors, momentum)
        torch._foreach_add_(teacher_tensors, torch._foreach_mul(student_tensors, 1 - momentum))
    else:
        torch._foreach_lerp_(teacher_tensors, student_tensors, 1.0 - float(momentum))
