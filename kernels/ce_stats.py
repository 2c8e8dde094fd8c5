"""Row statistics shared by the two centred cross-entropy ops, and the kernel that merges them.

Used by `kernels/centered_ce.py` (the loss on logits) and `kernels/fused_head.py` (the
weight-normalised last layer fused with the loss). Both forwards split K across programs
(flash-decoding's split-K): each program reduces its columns of a row to five statistics,
in base-2 units (a logit x becomes x * LOG2E / T, so that exp(x / T) = exp2 of it):

    s_max  = max_k a_k                  a = s / ts       (student, block k only)
    s_sum  = sum_k exp2(a_k - s_max)
    z_max  = max_k z_k                  z = (t - c) / tt (teacher, centred)
    z_sum  = sum_k exp2(z_k - z_max)
    zs_dot = sum_k exp2(z_k - z_max) a_k

stored as stats [5, n_blocks, rows] fp32. The combine kernel rescales the blocks to a
common maximum (online softmax) and gives, in natural units,

    lse_s = logsumexp(s / ts),  lse_t = logsumexp((t - c) / tt)
    loss  = w * (lse_s - sum_k p_k s_k / ts),   p = softmax((t - c) / tt)

Bytes per row: reads 20 n_blocks, writes 4 (loss) + 8 (lse). Launch: one program per
BLOCK_R rows, BLOCK_N = the power of 2 >= n_blocks, BLOCK_R = min(128, 2048 / BLOCK_N)
and 4 warps: at most 2048 statistics of each kind per program, 16 of each per thread,
which compiles without register spills up to 2048 blocks (K = 262,144 in 128-column fp32
tiles; tests/test_kernel_compile.py). The loss it gives must match
`ibot_fast.reference.centered_ce.centered_softmax_ce`.

The backwards of both ops recompute the two softmaxes from the saved lse [2, rows]
(`load_lse`) and scale each row's gradient by w * dloss / ts (`row_grad_scale`). A row
with weight exactly 0 is padding: its loss and gradient are exactly 0, whatever its
statistics hold (NaN included).
"""
import torch
import triton
import triton.language as tl

from .utils import next_power_of_2, use_triton

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): one multiply folded in
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _centered_ce_combine_kernel(
    stats_ptr,   # per-block row statistics [5, n_blocks, rows] fp32
    w_ptr,       # row weights [rows] fp32 (read only if HAS_WEIGHT)
    loss_ptr,    # out: loss [rows] fp32
    lse_ptr,     # out: [2, rows] fp32, logsumexp(s/ts) and logsumexp((t - c)/tt)
    rows,        # number of rows
    n_blocks,    # number of column blocks that wrote statistics
    HAS_WEIGHT: tl.constexpr,  # multiply by the row weight (0 for padding rows)
    BLOCK_R: tl.constexpr,     # rows per program
    BLOCK_N: tl.constexpr,     # power of 2 >= n_blocks
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_N)
    row_ok = r < rows
    mask = (j < n_blocks)[None, :]
    plane = tl.cast(n_blocks, tl.int64) * rows
    # rows past the end read the last row (no -inf - -inf there); their stores are masked
    ptrs = stats_ptr + j[None, :].to(tl.int64) * rows + tl.minimum(r, rows - 1)[:, None]

    s_max = tl.load(ptrs, mask=mask, other=float("-inf"))
    s_sum = tl.load(ptrs + plane, mask=mask, other=0.0)
    z_max = tl.load(ptrs + 2 * plane, mask=mask, other=float("-inf"))
    z_sum = tl.load(ptrs + 3 * plane, mask=mask, other=0.0)
    zs_dot = tl.load(ptrs + 4 * plane, mask=mask, other=0.0)

    # statistics are in base-2 units (exp2 of logits * LOG2E / T); lse leaves in natural ones
    m_s = tl.max(s_max, axis=1)
    lse_s = m_s + tl.log2(tl.sum(s_sum * tl.exp2(s_max - m_s[:, None]), axis=1))
    m_t = tl.max(z_max, axis=1)
    rescale = tl.exp2(z_max - m_t[:, None])
    d_t = tl.sum(z_sum * rescale, axis=1)
    n_t = tl.sum(zs_dot * rescale, axis=1)
    loss = (lse_s - n_t / d_t) * LN2  # = -sum_k p_k log_softmax(s/ts)_k
    if HAS_WEIGHT:
        w = tl.load(w_ptr + r, mask=row_ok, other=0.0)
        loss = tl.where(w != 0.0, w * loss, 0.0)

    tl.store(loss_ptr + r, loss, mask=row_ok)
    tl.store(lse_ptr + r, lse_s * LN2, mask=row_ok)
    tl.store(lse_ptr + rows + r, (m_t + tl.log2(d_t)) * LN2, mask=row_ok)


@triton.jit
def row_grad_scale(
    w_ptr,       # row weights [rows] fp32 (read only if HAS_WEIGHT)
    dloss_ptr,   # upstream gradient of the loss [rows] fp32 (read only if HAS_DLOSS)
    r,           # [BLOCK_R] row indices
    rows,        # number of rows
    inv_ts,      # 1 / student temperature
    HAS_WEIGHT: tl.constexpr,
    HAS_DLOSS: tl.constexpr,
):
    """(rows to read: in range and not padding, w * dloss / ts for each row)."""
    row_ok = r < rows
    scale = tl.where(row_ok, inv_ts, 0.0)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + r, mask=row_ok, other=0.0)
        row_ok = row_ok & (w != 0.0)
        scale = scale * w
    if HAS_DLOSS:
        scale = scale * tl.load(dloss_ptr + r, mask=row_ok, other=0.0)
    return row_ok, scale


@triton.jit
def load_lse(
    lse_ptr,    # [2, rows] fp32 log-normalisers from the forward
    r,          # [BLOCK_R] row indices
    rows,       # number of rows
    row_ok,     # [BLOCK_R] rows in range and not padding
):
    """(logsumexp(s/ts), logsumexp((t - c)/tt)) of the rows in base-2 units (times
    LOG2E); +inf on the other rows, so that every exp2(x - lse) there is 0 rather than an
    overflow."""
    lse_s = tl.load(lse_ptr + r, mask=row_ok, other=float("inf"))
    lse_t = tl.load(lse_ptr + rows + r, mask=row_ok, other=float("inf"))
    return lse_s * LOG2E, lse_t * LOG2E


def combine_blocks(n_blocks: int):
    """(BLOCK_R, BLOCK_N, num_warps) of the combine kernel for n_blocks column blocks."""
    block_n = max(2, next_power_of_2(n_blocks))
    return max(1, min(128, 2048 // block_n)), block_n, 4


def combine(stats, weight, loss, lse):
    """Merge per-block statistics [5, n_blocks, rows] into loss [rows] and lse [2, rows]."""
    n_blocks, rows = stats.shape[1], stats.shape[2]
    block_r, block_n, num_warps = combine_blocks(n_blocks)
    _centered_ce_combine_kernel[(triton.cdiv(rows, block_r),)](
        stats, weight if weight is not None else stats, loss, lse, rows, n_blocks,
        HAS_WEIGHT=weight is not None, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )


def weight_arg(weight):
    """Row weights as the kernels read them: None, or [rows] fp32 contiguous."""
    return None if weight is None else weight.reshape(-1).float().contiguous()


def use_kernels(*tensors) -> bool:
    """Triton per `kernels.utils.use_triton`; fp64 inputs always take the (fp64) twin."""
    return use_triton(*tensors) and not any(
        t is not None and t.dtype == torch.float64 for t in tensors)
