"""Centred, sharpened softmax cross-entropy on logits: iBOT's loss, row by row.

Math (docs/design.md §1.4), for one row of student logits s and teacher logits t over K
outputs, center c, temperatures ts (student) and tt (teacher), row weight w:

    p        = softmax((t - c) / tt)                          (no gradient)
    loss_row = w * ( logsumexp(s / ts) - sum_k p_k s_k / ts )  = w * CE(p, softmax(s / ts))
    d loss_row / d s = w * (softmax(s / ts) - p) / ts
    colsum   = sum over rows with w != 0 of t                 (feeds the center update)

A row with weight exactly 0 is padding: its inputs may hold anything (NaN included), its
loss and gradient are 0, it is left out of `colsum`, and the kernels do not read it.
Reference, the truth the tests compare against: `ibot_fast.reference.centered_ce`
(`centered_softmax_ce_and_colsum`, `centered_softmax_ce`; plain fp32 PyTorch).

Forward: one pass over K per row, fp32 accumulation, no [rows, K] intermediate. Program
(g, b) of the grid (n_groups, n_blocks) owns column block b (BLOCK_K columns) and walks
row group g in [BLOCK_R, BLOCK_K] tiles. For every row it writes the block's five softmax
statistics (kernels/ce_stats.py: base-2 units, log2(e) folded into the temperature), and
it keeps the block's teacher column sums in registers, written once per group as partial
sums [n_groups, K]. The combine kernel of ce_stats.py merges each row's blocks into the
loss and the two log-normalisers lse [2, rows] (flash-decoding's split-K); one `torch.sum`
over the groups finishes `colsum`. Every element is written once and nothing is added
atomically: all rows would add into the same K addresses (contention), in an order that
changes from run to run. The column sums are bitwise reproducible instead.

Backward: elementwise over [BLOCK_R, BLOCK_K] tiles, grid (rows / BLOCK_R, K / BLOCK_K):
both softmaxes recomputed from the logits and lse, the gradient written in the student's
dtype. In-place mode (`inplace_grad=True`, as Liger-Kernel's cross-entropy): the forward
also runs the backward kernel for an upstream gradient of 1, writing into the student
buffer, and the backward scales that by the upstream gradient in place. Neither the
teacher logits nor a gradient buffer outlive the forward; the student logits are
destroyed and the graph can be backpropagated once, so the caller opts in only where
nothing else reads them (in iBOT, student rows that enter one loss term only).

    Bytes per row (elt = bytes per logit): forward reads 2 K elt (s, t) and writes
    20 ceil(K / BLOCK_K) bytes of statistics; backward reads 2 K elt and writes K elt.
    Forward + backward: 5 K elt (in-place mode: 7 K elt). The center (4 K bytes) is read
    once per program and the partial column sums (4 K bytes) written once per row group.

Launch configuration (`_ce_blocks`; no autotuning, so the interpreter runs the same code):

    GPU forward   BLOCK_R = 16, BLOCK_K = 256 (bf16, fp16) or 128 (fp32), 4 warps: a tile
                  row is one warp's 32 lanes x one 16-byte load each, and the warps stack
                  along rows (per thread [1, 8], warps [4, 1]; tests/test_kernel_compile.py
                  pins it). Each row's statistics reduce inside one warp (shuffles); the
                  column sums accumulate elementwise and reduce across warps once per
                  program. n_groups = min(row tiles, 4 x SMs / n_blocks), at least 1.
    GPU backward  4 x 1024 tiles, 8 warps (elementwise: no reductions to place).
    interpreter   16 x min(K, 4096) tiles (K rounded up to a power of 2), 16 programs
                  aimed for: its cost is per program and per op, not per element.

Every GPU configuration compiles for sm_90 and sm_80 without register spills
(tests/test_kernel_compile.py). They follow from the layout argument above, not from
timing: `python -m benchmarks.bench_centered_ce --tiles ...` times other tilings, and
benchmarks/results/README.md holds what has been measured.
"""
import torch
import triton
import triton.language as tl

from ibot_fast.reference import centered_ce as _reference

from .ce_stats import LOG2E, combine, load_lse, row_grad_scale, use_kernels, weight_arg
from .utils import next_power_of_2, num_warps_for, target_programs

__all__ = ["centered_softmax_ce", "centered_softmax_ce_and_colsum", "centered_ce_fwd",
           "centered_ce_bwd"]


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _centered_ce_fwd_kernel(
    s_ptr,           # student logits [rows, K], fp32 / fp16 / bf16, row stride stride_s
    t_ptr,           # teacher logits [rows, K], same dtypes, row stride stride_t
    c_ptr,           # center [K] fp32
    w_ptr,           # row weights [rows] fp32 (read only if HAS_WEIGHT)
    stats_ptr,       # out: per-block row statistics [5, n_blocks, rows] fp32
    colsum_ptr,      # out: per-group teacher column sums [n_groups, K] fp32 (if COLSUM)
    rows,            # number of rows
    K,               # number of outputs
    stride_s,        # row stride of the student logits, in elements
    stride_t,        # row stride of the teacher logits, in elements
    rows_per_group,  # rows walked by one program, a multiple of BLOCK_R
    inv_ts,          # 1 / student temperature
    inv_tt,          # 1 / teacher temperature
    HAS_WEIGHT: tl.constexpr,  # rows with weight 0 are padding: not read, not summed
    COLSUM: tl.constexpr,      # also produce the teacher column sums
    EVEN_K: tl.constexpr,      # K % BLOCK_K == 0: no column masks
    BLOCK_R: tl.constexpr,     # rows per tile
    BLOCK_K: tl.constexpr,     # columns per program (one block of K)
):
    group = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    plane = tl.num_programs(1).to(tl.int64) * rows  # elements per statistic
    a_s = inv_ts * LOG2E  # logits to base-2 exponents: exp(x / T) = exp2(x * LOG2E / T)
    a_t = inv_tt * LOG2E

    cols = block * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    colsum = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)  # summed over rows at the end

    row_start = group * rows_per_group
    for r0 in range(row_start, row_start + rows_per_group, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        in_range = r < rows
        row_ok = in_range
        if HAS_WEIGHT:
            w = tl.load(w_ptr + r, mask=in_range, other=0.0)
            row_ok = row_ok & (w != 0.0)
        mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & col_ok[None, :]
        s = tl.load(s_ptr + r[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
        t = tl.load(t_ptr + r[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
        t = t.to(tl.float32)
        s = s.to(tl.float32) * a_s  # s/ts in base-2 units
        z = (t - c[None, :]) * a_t  # (t - c)/tt in base-2 units; t - c first, as the twin
        s_m = s
        if not EVEN_K:
            s_m = tl.where(col_ok[None, :], s, float("-inf"))
            z = tl.where(col_ok[None, :], z, float("-inf"))

        # student: max and sum of exp2 over this block; teacher: the same for z, and the
        # sum of exp2(z) * s (s is 0, not -inf, in masked columns: e * s stays 0 there)
        s_max = tl.max(s_m, axis=1)
        s_sum = tl.sum(tl.exp2(s_m - s_max[:, None]), axis=1)
        z_max = tl.max(z, axis=1)
        e = tl.exp2(z - z_max[:, None])
        z_sum = tl.sum(e, axis=1)
        zs_dot = tl.sum(e * s, axis=1)

        out = stats_ptr + block.to(tl.int64) * rows + r
        tl.store(out, s_max, mask=in_range)
        tl.store(out + plane, s_sum, mask=in_range)
        tl.store(out + 2 * plane, z_max, mask=in_range)
        tl.store(out + 3 * plane, z_sum, mask=in_range)
        tl.store(out + 4 * plane, zs_dot, mask=in_range)
        if COLSUM:
            colsum += t  # padding rows were loaded as 0

    if COLSUM:
        tl.store(colsum_ptr + group * K + cols, tl.sum(colsum, axis=0), mask=col_ok)


@triton.jit
def _centered_ce_bwd_kernel(
    s_ptr,       # student logits [rows, K], row stride stride_s
    t_ptr,       # teacher logits [rows, K], row stride stride_t
    c_ptr,       # center [K] fp32
    w_ptr,       # row weights [rows] fp32 (read only if HAS_WEIGHT)
    lse_ptr,     # [2, rows] fp32 log-normalisers from the forward
    dloss_ptr,   # upstream gradient [rows] fp32 (read only if HAS_DLOSS)
    ds_ptr,      # out: gradient [rows, K] in the student dtype (may be s_ptr: in place)
    rows,        # number of rows
    K,           # number of outputs
    stride_s,    # row stride of the student logits
    stride_t,    # row stride of the teacher logits
    stride_ds,   # row stride of the gradient
    inv_ts,      # 1 / student temperature
    inv_tt,      # 1 / teacher temperature
    HAS_WEIGHT: tl.constexpr,  # rows with weight 0 get a zero gradient, unread
    HAS_DLOSS: tl.constexpr,   # False: upstream gradient 1 (in-place forward)
    EVEN_K: tl.constexpr,      # K % BLOCK_K == 0: no column masks
    BLOCK_R: tl.constexpr,     # rows per program
    BLOCK_K: tl.constexpr,     # columns per program
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    row_ok, scale = row_grad_scale(w_ptr, dloss_ptr, r, rows, inv_ts, HAS_WEIGHT, HAS_DLOSS)
    lse_s, lse_t = load_lse(lse_ptr, r, rows, row_ok)

    mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & col_ok[None, :]
    s = tl.load(s_ptr + r[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
    t = tl.load(t_ptr + r[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    q = tl.exp2(s.to(tl.float32) * (inv_ts * LOG2E) - lse_s[:, None])
    p = tl.exp2((t.to(tl.float32) - c[None, :]) * (inv_tt * LOG2E) - lse_t[:, None])
    ds = tl.where(mask, scale[:, None] * (q - p), 0.0)
    out_mask = (r < rows)[:, None] if EVEN_K else (r < rows)[:, None] & col_ok[None, :]
    tl.store(ds_ptr + r[:, None] * stride_ds + cols[None, :],
             ds.to(ds_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------
# Host functions: check, choose blocks, allocate, launch
# --------------------------------------------------------------------------------------
def _ce_blocks(K: int, dtype: torch.dtype, device: torch.device, backward: bool = False):
    """(BLOCK_R, BLOCK_K, num_warps) of the logits kernels (see the module docstring)."""
    if device.type != "cuda":
        return 16, min(next_power_of_2(K), 4096), 4
    if backward:
        block_k = min(next_power_of_2(K), 1024)
        block_r = max(1, 4096 // block_k)
        return block_r, block_k, num_warps_for(block_r * block_k // 2)
    lane_cols = 16 // dtype.itemsize  # one 16-byte load per lane
    return 16, min(next_power_of_2(K), 32 * lane_cols), 4


def _check_logits(student, teacher, center, student_temp, teacher_temp, weight):
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student and teacher must both be [rows, K]; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    K = student.shape[1]
    if center.numel() != K:
        raise ValueError(f"center must have K = {K} elements, got {tuple(center.shape)}")
    if weight is not None and weight.numel() != student.shape[0]:
        raise ValueError(f"weight must have one element per row ({student.shape[0]}), "
                         f"got {tuple(weight.shape)}")
    if not (student_temp > 0 and teacher_temp > 0):
        raise ValueError(f"temperatures must be > 0, got {student_temp}, {teacher_temp}")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be fp32, fp16 or bf16, got {x.dtype}")


def _rows_contiguous(x):
    """x itself when its last dimension is contiguous (any row stride), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def centered_ce_fwd(student, teacher, center, student_temp, teacher_temp, weight=None,
                    with_colsum=False, blocks=None):
    """Forward of the logits kernel.

    student, teacher: [rows, K]; center: [K]; weight: [rows] or None; blocks: (BLOCK_R,
    BLOCK_K, num_warps) instead of `_ce_blocks`' choice (benchmarks compare tilings).
    Returns (loss [rows] fp32, colsum [K] fp32 or None, lse [2, rows] fp32), lse holding
    logsumexp(s / ts) and logsumexp((t - c) / tt) for the backward.
    """
    _check_logits(student, teacher, center, student_temp, teacher_temp, weight)
    student, teacher = _rows_contiguous(student), _rows_contiguous(teacher)
    center = center.reshape(-1).float().contiguous()
    weight = weight_arg(weight)
    rows, K = student.shape
    device = student.device

    loss = torch.empty(rows, device=device, dtype=torch.float32)
    lse = torch.empty(2, rows, device=device, dtype=torch.float32)
    colsum = torch.zeros(K, device=device, dtype=torch.float32) if with_colsum else None
    if rows == 0:
        return loss, colsum, lse

    block_r, block_k, num_warps = blocks or _ce_blocks(K, student.dtype, device)
    n_blocks = triton.cdiv(K, block_k)
    n_tiles = triton.cdiv(rows, block_r)
    n_groups = max(1, min(n_tiles, target_programs(device, 4) // n_blocks))
    rows_per_group = block_r * triton.cdiv(n_tiles, n_groups)
    n_groups = triton.cdiv(rows, rows_per_group)

    stats = torch.empty(5, n_blocks, rows, device=device, dtype=torch.float32)
    partial = (torch.empty(n_groups, K, device=device, dtype=torch.float32)
               if with_colsum else stats)
    _centered_ce_fwd_kernel[(n_groups, n_blocks)](
        student, teacher, center, weight if weight is not None else center, stats, partial,
        rows, K, student.stride(0), teacher.stride(0), rows_per_group,
        1.0 / student_temp, 1.0 / teacher_temp,
        HAS_WEIGHT=weight is not None, COLSUM=with_colsum, EVEN_K=K % block_k == 0,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
    )
    combine(stats, weight, loss, lse)
    if with_colsum:
        colsum = partial[0] if n_groups == 1 else partial.sum(dim=0)
    return loss, colsum, lse


def centered_ce_bwd(student, teacher, center, lse, student_temp, teacher_temp,
                    weight=None, dloss=None, out=None, blocks=None):
    """Backward of the logits kernel: d loss / d student, in the student's dtype.

    lse: [2, rows] from `centered_ce_fwd`; dloss: [rows] upstream gradient, or None for 1;
    out: where to write it ([rows, K], the student's dtype; may be `student` itself);
    blocks: (BLOCK_R, BLOCK_K, num_warps) instead of `_ce_blocks`' choice.
    """
    rows, K = student.shape
    student, teacher = _rows_contiguous(student), _rows_contiguous(teacher)
    center = center.reshape(-1).float().contiguous()
    weight = weight_arg(weight)
    if dloss is not None:
        dloss = dloss.reshape(-1).float().contiguous()
    if out is None:
        out = torch.empty((rows, K), device=student.device, dtype=student.dtype)
    if out.shape != student.shape or out.dtype != student.dtype or out.stride(-1) != 1:
        raise ValueError("out must be [rows, K] in the student's dtype, last dim contiguous")
    if rows == 0:
        return out

    block_r, block_k, num_warps = blocks or _ce_blocks(K, student.dtype, student.device,
                                                       backward=True)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(K, block_k))
    _centered_ce_bwd_kernel[grid](
        student, teacher, center, weight if weight is not None else lse, lse,
        dloss if dloss is not None else lse, out,
        rows, K, student.stride(0), teacher.stride(0), out.stride(0),
        1.0 / student_temp, 1.0 / teacher_temp,
        HAS_WEIGHT=weight is not None, HAS_DLOSS=dloss is not None, EVEN_K=K % block_k == 0,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------
# Autograd wrapper and the public functionals
# --------------------------------------------------------------------------------------
class _CenteredSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, student_temp, teacher_temp, weight,
                with_colsum, inplace_grad):
        loss, colsum, lse = centered_ce_fwd(student, teacher, center, student_temp,
                                            teacher_temp, weight, with_colsum)
        ctx.inplace_grad = inplace_grad
        if inplace_grad:
            grad = centered_ce_bwd(student, teacher, center, lse, student_temp, teacher_temp,
                                   weight, dloss=None, out=_rows_contiguous(student))
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(student, teacher, center, weight, lse)
            ctx.temps = (student_temp, teacher_temp)
        if colsum is not None:
            ctx.mark_non_differentiable(colsum)
        return loss, colsum

    @staticmethod
    def backward(ctx, dloss, _dcolsum):
        if ctx.inplace_grad:
            (grad,) = ctx.saved_tensors
            grad = grad.mul_(dloss[:, None])
        else:
            student, teacher, center, weight, lse = ctx.saved_tensors
            grad = centered_ce_bwd(student, teacher, center, lse, *ctx.temps, weight, dloss)
        return grad, None, None, None, None, None, None, None


def centered_softmax_ce_and_colsum(student, teacher, center, student_temp, teacher_temp,
                                   weight=None, *, inplace_grad=False):
    """Per-row centred, sharpened cross-entropy and the teacher logits' column sum.

    student, teacher: [rows, K] fp32 / fp16 / bf16 logits; center: [K] (fp32);
    student_temp, teacher_temp: floats; weight: [rows] or None (rows with weight 0 are
    padding: loss 0, gradient 0, left out of the column sum).
    Returns (loss [rows] fp32, colsum [K] fp32 = sum of `teacher` over non-padding rows).
    Differentiable with respect to `student` only.
    inplace_grad: the caller allows the kernel to overwrite `student` with its gradient
    during the forward (saves memory; `student` must not be read afterwards, and the
    graph can be backpropagated once). Ignored where the twin runs and where no gradient
    is wanted (no_grad, or `student` does not require one).
    CUDA tensors run the Triton kernels; CPU tensors run them under TRITON_INTERPRET=1,
    else (and for fp64 inputs) the twin
    `ibot_fast.reference.centered_ce.centered_softmax_ce_and_colsum`.
    """
    if not use_kernels(student, teacher, center, weight):
        return _reference.centered_softmax_ce_and_colsum(student, teacher, center,
                                                         student_temp, teacher_temp, weight)
    inplace_grad = inplace_grad and student.requires_grad and torch.is_grad_enabled()
    return _CenteredSoftmaxCE.apply(student, teacher.detach(), center.detach(),
                                    float(student_temp), float(teacher_temp), weight,
                                    True, inplace_grad)


def centered_softmax_ce(student, teacher, center, student_temp, teacher_temp, weight=None,
                        *, inplace_grad=False):
    """Per-row loss `w * CE(softmax((t - c)/tt), softmax(s/ts))`, fp32 [rows].

    Same arguments as `centered_softmax_ce_and_colsum`, without the column sum.
    """
    if not use_kernels(student, teacher, center, weight):
        return _reference.centered_softmax_ce(student, teacher, center, student_temp,
                                              teacher_temp, weight)
    inplace_grad = inplace_grad and student.requires_grad and torch.is_grad_enabled()
    loss, _ = _CenteredSoftmaxCE.apply(student, teacher.detach(), center.detach(),
                                       float(student_temp), float(teacher_temp), weight,
                                       False, inplace_grad)
    return loss
