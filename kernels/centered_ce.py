"""Centred, sharpened softmax cross-entropy over the head outputs: iBOT's loss, row by row.

Math (DESIGN.md section 1.4), for one row of student logits s and teacher logits t over K
outputs, center c, temperatures ts (student) and tt (teacher), row weight w:

    p        = softmax((t - c) / tt)                          (no gradient)
    loss_row = w * ( logsumexp(s / ts) - sum_k p_k s_k / ts )  = w * CE(p, softmax(s / ts))
    d loss_row / d s = w * (softmax(s / ts) - p) / ts
    colsum   = sum over rows with w != 0 of t                 (feeds the center update)

A row with weight exactly 0 is padding: its inputs may hold anything (NaN included), its
loss and gradient are 0 and it is left out of `colsum`; the logits kernels do not even
read it. Twins, the truth the tests compare against: `ibot_fast.reference.centered_ce`
(same function names, plain fp32 PyTorch).

Forward, one pass over K per row, fp32 accumulation, no [rows, K] intermediate in memory.
The grid is (row groups) x (column blocks of BLOCK_K): a program owns one column block and
walks its group's rows in [BLOCK_R, BLOCK_K] tiles, writing for every row the block's
softmax statistics (student max and sum of exp, teacher max, sum of exp and sum of
exp * s/ts; in base-2 units, exp2 with log2(e) folded into the temperature) and keeping
the teacher column sums of its block in registers. A small
combine kernel merges the per-block statistics of a row with the online-softmax
rescaling (flash-decoding's split-K), giving the loss and both log-normalisers.

    Bytes per row (elt = bytes per logit): forward reads 2 K elt (s, t) and writes
    20 ceil(K / BLOCK_K) bytes of statistics; backward reads 2 K elt and writes K elt.
    Forward + backward: 5 K elt per row (in-place mode: 7 K elt). The center (4 K bytes)
    is read once per program and the partial column sums (4 K bytes) written once per row
    group, not per row.

Column sums: each row group writes its partial sums [n_groups, K] (every element written
once, no atomics) and one `torch.sum` over the groups finishes them: deterministic,
bitwise reproducible, and with n_groups ~ (4 x SMs) / (K / BLOCK_K) the buffer stays a
few MB. Atomics were rejected: every row would add into the same K addresses
(contention) and the result would depend on the order of arrival.

Backward recomputes both softmaxes from the saved logits and the two saved
log-normalisers: an elementwise kernel over [BLOCK_R, BLOCK_K] tiles. In-place mode
(`inplace_grad=True`, as Liger-Kernel's cross-entropy): the forward also writes the
gradient (for an upstream gradient of 1) into the student buffer, so neither the teacher
logits nor a separate gradient buffer outlive the forward, and the backward scales it by
the upstream gradient in place. The student logits are destroyed, and the graph can be
backpropagated once: use it only where nothing else reads those logits (in iBOT, student
rows that enter one loss term only).

Fused last layer (`fused_head_ce`): the head ends in a weight-normalised
`Linear(D, K, bias=False)`, W = g * v / ||v|| (row norms), applied to L2-normalised
features F [rows, D]. Forward: the logits s = F_s W_s^T and t = F_t W_t^T are computed
tile by tile on chip ([BLOCK_R, BLOCK_K] tiles from BLOCK_D slices of F and W, tl.dot with
fp32 accumulation) and fed to the same online statistics, flash-attention style: no
[rows, K] tensor exists in memory. Backward, K in chunks (all of K when [rows, K] fits
in FUSED_CHUNK_BYTES): a kernel recomputes the chunk's s and t tiles on chip and writes
dS = w (softmax(s/ts) - p) / ts * dloss in the feature dtype to a [rows, chunk] buffer
reused by every chunk; cuBLAS then gives dF += dS W_s[chunk] and dW_s[chunk] = dS^T F_s.
(A first backward accumulated dF and dW inside two Triton kernels, each recomputing the
logits: 12 R K D FLOPs at ~50 TFLOP/s on an H100, 9-10x slower than the unfused backward.)
The weight-norm chain (dW_s -> dv, dg) and the teacher column sums,
colsum = W_t (sum of the kept teacher feature rows), run in PyTorch on [K, D] tensors.

    FLOPs (R rows): forward 4 R K D (Triton); backward 4 R K D recomputing the logits
    (Triton) + 4 R K D (cuBLAS), against 8 R K D for the unfused head, all cuBLAS. HBM
    traffic: the features and weights (re-read per tile from L2), O(R D + K D) bytes, and
    in the backward dS written once and read twice (3 R K elt), against ~9 R K elt for
    the unfused head + loss (write s and t, read them twice, write and read dS). Memory:
    O(R + K D) in the forward, O(R x chunk) in the backward, against O(R K) unfused.

Launch configurations are chosen by the host functions (no autotuning, so the
interpreter runs the same code). Every GPU configuration compiles for sm_90 without
register spills (`python -m benchmarks.ptxas_report`, run by tests/test_kernel_compile.py
on any machine); they are not yet tuned by timing on a GPU.
"""
import functools

import torch
import triton
import triton.language as tl

from ibot_fast.reference import centered_ce as _reference

from .utils import interpreter_on, next_power_of_2, num_warps_for, use_triton

__all__ = [
    "centered_softmax_ce",
    "centered_softmax_ce_and_colsum",
    "fused_head_ce",
    "centered_ce_fwd",
    "centered_ce_bwd",
    "fused_head_ce_fwd",
    "fused_head_ce_bwd",
]


LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): one multiply folded in
LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------
# Kernels: centred cross-entropy on logits
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
def _row_grad_scale(
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
def _load_lse(
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
    row_ok, scale = _row_grad_scale(w_ptr, dloss_ptr, r, rows, inv_ts, HAS_WEIGHT, HAS_DLOSS)
    lse_s, lse_t = _load_lse(lse_ptr, r, rows, row_ok)

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
# Kernels: weight-normalised last layer fused with the loss
# --------------------------------------------------------------------------------------
# Addressing: a scalar int64 base per tile, int32 offsets inside it. Rows and columns past
# the ends are clamped to the last one instead of masked (their results are dropped by the
# row and column masks), and D is walked in BLOCK_D slices that divide it: the operand
# loads carry no masks, which keeps ptxas from spilling (sm_90). Padding rows (weight 0)
# are computed like the others and dropped by the masks; features that feed the dot into
# dW are zeroed on them. The host checks D % 16 == 0 and K * D < 2**31.
@triton.jit
def _clamped_offsets(start, n, BLOCK: tl.constexpr):
    """arange(BLOCK) from `start`, indices past n - 1 replaced by n - 1, relative to start."""
    return (tl.minimum(start + tl.arange(0, BLOCK), n - 1) - start).to(tl.int32)


@triton.jit
def _logits_tiles(
    fs_ptr,     # student features at the tile's first row; rows of D elements
    ws_ptr,     # student weight at the tile's first column; rows of D elements
    ft_ptr,     # teacher features, likewise
    wt_ptr,     # teacher weight, likewise
    rr,         # [BLOCK_R] row offsets from the feature pointers (clamped in range)
    kk,         # [BLOCK_K] column offsets from the weight pointers (clamped in range)
    D,          # feature dimension, a multiple of BLOCK_D
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,        # slice of D per tl.dot
    UPCAST: tl.constexpr,         # feed tl.dot fp32 (interpreter, or fp32 inputs)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 operands only)
):
    """(s, t): student and teacher logits [BLOCK_R, BLOCK_K] of the tile, fp32
    accumulation, one walk over D for both (shared address offsets)."""
    d = tl.arange(0, BLOCK_D)
    f_off = rr[:, None] * D + d[None, :]
    w_off = kk[None, :] * D + d[:, None]
    s = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    t = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        fs = tl.load(fs_ptr + d0 + f_off)
        ws = tl.load(ws_ptr + d0 + w_off)
        ft = tl.load(ft_ptr + d0 + f_off)
        wt = tl.load(wt_ptr + d0 + w_off)
        if UPCAST:
            fs, ws = fs.to(tl.float32), ws.to(tl.float32)
            ft, wt = ft.to(tl.float32), wt.to(tl.float32)
        s = tl.dot(fs, ws, s, input_precision=DOT_PRECISION)
        t = tl.dot(ft, wt, t, input_precision=DOT_PRECISION)
    return s, t


@triton.jit
def _head_grad_tile(
    fs_ptr, ws_ptr,   # student features / weight at the tile's first row / column
    ft_ptr, wt_ptr,   # teacher features / weight at the tile's first row / column
    c_ptr,            # center at the tile's first column, fp32
    rr, kk,           # [BLOCK_R], [BLOCK_K] clamped row / column offsets
    row_ok, col_ok,   # [BLOCK_R] rows (in range, not padding), [BLOCK_K] columns
    lse_s, lse_t,     # [BLOCK_R] log-normalisers from the forward
    scale,            # [BLOCK_R] w * dloss / ts
    D,                # feature dimension
    inv_ts,           # 1 / student temperature
    inv_tt,           # 1 / teacher temperature
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """d loss / d logits for one tile, fp32, zero outside the valid rows and columns."""
    s, t = _logits_tiles(fs_ptr, ws_ptr, ft_ptr, wt_ptr, rr, kk, D,
                         BLOCK_R, BLOCK_K, BLOCK_D, UPCAST, DOT_PRECISION)
    c = tl.load(c_ptr + kk)
    q = tl.exp2(s * (inv_ts * LOG2E) - lse_s[:, None])
    p = tl.exp2((t - c[None, :]) * (inv_tt * LOG2E) - lse_t[:, None])
    return tl.where(row_ok[:, None] & col_ok[None, :], scale[:, None] * (q - p), 0.0)


@triton.jit
def _fused_head_ce_fwd_kernel(
    fs_ptr,        # student features [rows, D]
    ws_ptr,        # student last-layer weight [K, D] (weight norm applied)
    ft_ptr,        # teacher features [rows, D]
    wt_ptr,        # teacher last-layer weight [K, D]
    c_ptr,         # center [K] fp32
    stats_ptr,     # out: per-split row statistics [5, n_splits, rows] fp32
    rows,          # number of rows
    K,             # number of outputs
    D,             # feature dimension, a multiple of BLOCK_D
    k_per_split,   # columns walked by one program, a multiple of BLOCK_K
    inv_ts,        # 1 / student temperature
    inv_tt,        # 1 / teacher temperature
    BLOCK_R: tl.constexpr,        # rows per program
    BLOCK_K: tl.constexpr,        # columns per tile
    BLOCK_D: tl.constexpr,        # slice of D per tl.dot
    UPCAST: tl.constexpr,         # feed tl.dot fp32
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 operands only)
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    split = tl.program_id(1)
    plane = tl.num_programs(1).to(tl.int64) * rows
    r = row0 + tl.arange(0, BLOCK_R)
    rr = _clamped_offsets(row0, rows, BLOCK_R)
    fs_ptr += row0 * D
    ft_ptr += row0 * D

    # online softmax statistics over this split's columns (merged by the combine kernel)
    a_s = inv_ts * LOG2E
    a_t = inv_tt * LOG2E
    s_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    s_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    z_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    zs_dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        col_ok = k0 + tl.arange(0, BLOCK_K) < k_end
        kk = _clamped_offsets(k0, k_end, BLOCK_K)
        s, t = _logits_tiles(fs_ptr, ws_ptr + k0 * D, ft_ptr, wt_ptr + k0 * D, rr, kk, D,
                             BLOCK_R, BLOCK_K, BLOCK_D, UPCAST, DOT_PRECISION)
        s = s * a_s  # base-2 units, as in the logits kernel (the combine kernel is shared)
        c = tl.load(c_ptr + k0 + kk)

        s_m = tl.where(col_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(s_max, tl.max(s_m, axis=1))
        s_sum = s_sum * tl.exp2(s_max - new_max) + \
            tl.sum(tl.exp2(s_m - new_max[:, None]), axis=1)
        s_max = new_max

        z = tl.where(col_ok[None, :], (t - c[None, :]) * a_t, float("-inf"))
        new_max = tl.maximum(z_max, tl.max(z, axis=1))
        rescale = tl.exp2(z_max - new_max)
        e = tl.exp2(z - new_max[:, None])
        z_sum = z_sum * rescale + tl.sum(e, axis=1)
        zs_dot = zs_dot * rescale + tl.sum(e * s, axis=1)
        z_max = new_max

    out = stats_ptr + split.to(tl.int64) * rows + r
    in_range = r < rows
    tl.store(out, s_max, mask=in_range)
    tl.store(out + plane, s_sum, mask=in_range)
    tl.store(out + 2 * plane, z_max, mask=in_range)
    tl.store(out + 3 * plane, z_sum, mask=in_range)
    tl.store(out + 4 * plane, zs_dot, mask=in_range)


@triton.jit
def _fused_head_ce_dlogits_kernel(
    fs_ptr,        # student features [rows, D]
    ws_ptr,        # student last-layer weight of the chunk [K, D]
    ft_ptr,        # teacher features [rows, D]
    wt_ptr,        # teacher last-layer weight of the chunk [K, D]
    c_ptr,         # center of the chunk [K] fp32
    w_ptr,         # row weights [rows] fp32 (read only if HAS_WEIGHT)
    lse_ptr,       # [2, rows] fp32 log-normalisers from the forward
    dloss_ptr,     # upstream gradient [rows] fp32
    ds_ptr,        # out: d loss / d student logits of the chunk [rows, K], the feature dtype
    rows,          # number of rows
    K,             # columns in the chunk
    D,             # feature dimension, a multiple of BLOCK_D
    stride_ds,     # row stride of ds
    inv_ts,        # 1 / student temperature
    inv_tt,        # 1 / teacher temperature
    HAS_WEIGHT: tl.constexpr,     # rows with weight 0 are padding (zero gradient)
    BLOCK_R: tl.constexpr,        # rows per program
    BLOCK_K: tl.constexpr,        # columns per program
    BLOCK_D: tl.constexpr,        # slice of D per tl.dot of the logits
    UPCAST: tl.constexpr,         # feed tl.dot fp32
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 operands only)
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    r = row0 + tl.arange(0, BLOCK_R)
    cols = col0 + tl.arange(0, BLOCK_K)
    row_ok, scale = _row_grad_scale(w_ptr, dloss_ptr, r, rows, inv_ts, HAS_WEIGHT, True)
    lse_s, lse_t = _load_lse(lse_ptr, r, rows, row_ok)
    rr = _clamped_offsets(row0, rows, BLOCK_R)
    kk = _clamped_offsets(col0, K, BLOCK_K)
    ds = _head_grad_tile(fs_ptr + row0 * D, ws_ptr + col0 * D, ft_ptr + row0 * D,
                         wt_ptr + col0 * D, c_ptr + col0, rr, kk, row_ok, cols < K,
                         lse_s, lse_t, scale, D, inv_ts, inv_tt,
                         BLOCK_R, BLOCK_K, BLOCK_D, UPCAST, DOT_PRECISION)
    tl.store(ds_ptr + r[:, None] * stride_ds + cols[None, :], ds.to(ds_ptr.dtype.element_ty),
             mask=(r < rows)[:, None] & (cols < K)[None, :])


# --------------------------------------------------------------------------------------
# Host functions: check, choose blocks, allocate, launch
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device, per_sm: int) -> int:
    """Programs to aim for: a few per SM on a GPU. Under the interpreter (which runs
    programs one after another) a small number that still exercises the split paths."""
    if device.type == "cuda":
        return per_sm * _sm_count(device.index if device.index is not None else
                                  torch.cuda.current_device())
    return 16


def _ce_blocks(K: int, dtype: torch.dtype, device: torch.device, backward: bool = False):
    """(BLOCK_R, BLOCK_K, num_warps) of the logits kernels.

    GPU forward: a tile row is exactly one warp's 32 lanes x one 16-byte load (256
    columns of bf16/fp16, 128 of fp32) and the warps stack along rows (16 rows, 4 warps),
    so each of the five row statistics is reduced inside one warp (shuffles) and the
    teacher column sums accumulate elementwise, reduced across warps once per program.
    Storing the statistics still moves each from the reduction's layout to the store's
    through shared memory (5 small round trips per tile, as before; Triton picks the
    store layout). The first configuration (4 x 1024 tiles, 8 warps)
    spread a row over 4 warps: five shared-memory reductions per tile, and the forward
    reached 28-30% of the H100's copy bandwidth (the elementwise backward ~70%). The new
    one is not yet timed on a GPU: `bench_centered_ce --tiles` compares configurations.
    ptxas (sm_90, bf16): 168 registers, no spills (3 programs of 4 warps per SM), against
    146 for the 4 x 1024 tiles; the layout is [1, 8] per thread, warps [4, 1].
    GPU backward (elementwise): 4 x 1024 tiles, 8 warps. Interpreter: large tiles, since
    its cost is per program and per op."""
    if device.type != "cuda":
        return 16, min(next_power_of_2(K), 4096), 4
    if backward:
        block_k = min(next_power_of_2(K), 1024)
        block_r = max(1, 4096 // block_k)
        return block_r, block_k, num_warps_for(block_r * block_k // 2)
    lane_cols = 16 // dtype.itemsize
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


def _weight_arg(weight):
    return None if weight is None else weight.reshape(-1).float().contiguous()


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
    weight = _weight_arg(weight)
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
    n_groups = max(1, min(n_tiles, _target_programs(device, 4) // n_blocks))
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
    _combine(stats, weight, loss, lse)
    if with_colsum:
        colsum = partial[0] if n_groups == 1 else partial.sum(dim=0)
    return loss, colsum, lse


def _combine(stats, weight, loss, lse):
    """Merge per-block statistics [5, n_blocks, rows] into loss [rows] and lse [2, rows]."""
    n_blocks, rows = stats.shape[1], stats.shape[2]
    block_r, block_n, num_warps = _combine_blocks(n_blocks)
    _centered_ce_combine_kernel[(triton.cdiv(rows, block_r),)](
        stats, weight if weight is not None else stats, loss, lse, rows, n_blocks,
        HAS_WEIGHT=weight is not None, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )


def _combine_blocks(n_blocks: int):
    """(BLOCK_R, BLOCK_N, num_warps) of the combine kernel for n_blocks column blocks: at
    most 2048 statistics of each kind per program (5 x 16 per thread), which ptxas (sm_90)
    compiles without spills up to 2048 blocks (K = 262,144 in 128-column fp32 tiles)."""
    block_n = max(2, next_power_of_2(n_blocks))
    return max(1, min(128, 2048 // block_n)), block_n, 4


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
    weight = _weight_arg(weight)
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


def _fused_blocks(D: int, dtype: torch.dtype, device: torch.device):
    """Launch configuration of the fused kernels (the forward's statistics and the
    backward's gradient of the logits: the same logits tiles).

    GPU, bf16/fp16: 64 x 64 tiles, 4 warps; fp32 operands: 32 x 32. D is walked in slices
    of BLOCK_D (a power of 2 dividing D, at most 64). Chosen so that ptxas (sm_90, Triton
    3.6) reports no register spills at D = 256; not yet tuned by timing on a GPU.
    Interpreter: large column tiles and D in one slice, since its cost is per op rather
    than per FLOP."""
    largest_slice = 64 if device.type == "cuda" else 512
    block_d = 16
    while block_d * 2 <= largest_slice and D % (block_d * 2) == 0:
        block_d *= 2
    if device.type != "cuda":
        return dict(BLOCK_R=32, BLOCK_K=512, BLOCK_D=block_d, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_R=32, BLOCK_K=32, BLOCK_D=min(block_d, 32), num_warps=4,
                    num_stages=2)
    return dict(BLOCK_R=64, BLOCK_K=64, BLOCK_D=block_d, num_warps=4, num_stages=2)


def _dot_args(dtype: torch.dtype):
    """(UPCAST, DOT_PRECISION): fp32 dots under the interpreter (its bf16 dot is wrong);
    for fp32 operands follow torch's matmul setting (tf32 only where torch allows it)."""
    upcast = interpreter_on() or dtype == torch.float32
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return upcast, "tf32" if tf32 else "ieee"


def _check_head(student_feat, student_w, teacher_feat, teacher_w, center, weight):
    rows, D = student_feat.shape
    K = student_w.shape[0]
    if (teacher_feat.shape != (rows, D) or student_w.shape != (K, D)
            or teacher_w.shape != (K, D)):
        raise ValueError(
            f"features must be [rows, D] and weights [K, D]; got {tuple(student_feat.shape)}, "
            f"{tuple(teacher_feat.shape)}, {tuple(student_w.shape)}, {tuple(teacher_w.shape)}")
    if len({student_feat.dtype, student_w.dtype, teacher_feat.dtype, teacher_w.dtype}) != 1:
        raise TypeError("features and weights must share one dtype (the matmul dtype)")
    if center.numel() != K:
        raise ValueError(f"center must have K = {K} elements, got {tuple(center.shape)}")
    if weight is not None and weight.numel() != rows:
        raise ValueError(f"weight must have one element per row ({rows})")
    if D % 16 or D > 512 or K * D >= 2**31:
        raise ValueError(f"fused_head_ce needs D a multiple of 16, D <= 512 and K * D < 2**31 "
                         f"(D={D}, K={K})")


def fused_head_ce_fwd(student_feat, student_w, teacher_feat, teacher_w, center,
                      student_temp, teacher_temp, weight=None):
    """Forward of the fused last layer + loss.

    student_feat, teacher_feat: [rows, D]; student_w, teacher_w: [K, D] (weight norm
    applied), all one dtype. Returns (loss [rows] fp32, lse [2, rows] fp32).
    """
    _check_head(student_feat, student_w, teacher_feat, teacher_w, center, weight)
    student_feat, teacher_feat = student_feat.contiguous(), teacher_feat.contiguous()
    student_w, teacher_w = student_w.contiguous(), teacher_w.contiguous()
    center = center.reshape(-1).float().contiguous()
    weight = _weight_arg(weight)
    rows, D = student_feat.shape
    K = student_w.shape[0]
    device = student_feat.device
    loss = torch.empty(rows, device=device, dtype=torch.float32)
    lse = torch.empty(2, rows, device=device, dtype=torch.float32)
    if rows == 0:
        return loss, lse

    cfg = _fused_blocks(D, student_feat.dtype, device)
    k_per_split, n_splits = _fused_k_splits(rows, K, cfg, device)
    upcast, precision = _dot_args(student_feat.dtype)
    stats = torch.empty(5, n_splits, rows, device=device, dtype=torch.float32)
    _fused_head_ce_fwd_kernel[(triton.cdiv(rows, cfg["BLOCK_R"]), n_splits)](
        student_feat, student_w, teacher_feat, teacher_w, center, stats,
        rows, K, D, k_per_split, 1.0 / student_temp, 1.0 / teacher_temp,
        UPCAST=upcast, DOT_PRECISION=precision, **cfg,
    )
    _combine(stats, weight, loss, lse)
    return loss, lse


def _fused_k_splits(rows, K, cfg, device):
    """Split K across programs when there are too few row blocks to fill the GPU."""
    n_row_blocks = triton.cdiv(rows, cfg["BLOCK_R"])
    n_k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    n_splits = max(1, min(n_k_tiles, triton.cdiv(_target_programs(device, 2), n_row_blocks)))
    k_per_split = cfg["BLOCK_K"] * triton.cdiv(n_k_tiles, n_splits)
    return k_per_split, triton.cdiv(K, k_per_split)


FUSED_CHUNK_BYTES = 256 << 20  # the backward's buffer of logit gradients, at most


def _fused_chunk(rows: int, K: int, itemsize: int) -> int:
    """Columns per chunk of the fused backward: all of K when [rows, K] logit gradients
    fit in FUSED_CHUNK_BYTES, else the largest multiple of 1024 that does (at least 1024)."""
    if rows * K * itemsize <= FUSED_CHUNK_BYTES:
        return K
    return max(1024, FUSED_CHUNK_BYTES // (rows * itemsize) // 1024 * 1024)


def fused_head_ce_bwd(student_feat, student_w, teacher_feat, teacher_w, center, lse,
                      student_temp, teacher_temp, weight, dloss, chunk=None):
    """Backward of the fused last layer + loss, K in chunks.

    Inputs as `fused_head_ce_fwd` (already contiguous, one dtype), lse [2, rows] from it,
    dloss [rows]; chunk: columns per chunk instead of `_fused_chunk`'s choice. For each
    chunk of columns, a kernel recomputes the student and teacher logits on chip (as the
    forward did, fp32 accumulation) and writes dS, the gradient of the student logits, in
    the feature dtype to a [rows, chunk] buffer reused by every chunk; two matmuls then
    give dF += dS W_s[chunk] and dW_s[chunk] = dS^T F_s. Returns (d student_feat [rows, D]
    fp32, d student_w [K, D] fp32).
    """
    student_feat, teacher_feat = student_feat.contiguous(), teacher_feat.contiguous()
    student_w, teacher_w = student_w.contiguous(), teacher_w.contiguous()
    center = center.reshape(-1).float().contiguous()
    weight = _weight_arg(weight)
    dloss = dloss.reshape(-1).float().contiguous()
    rows, D = student_feat.shape
    K = student_w.shape[0]
    device = student_feat.device
    dfeat = torch.zeros(rows, D, device=device, dtype=torch.float32)
    dweight = torch.empty(K, D, device=device, dtype=torch.float32)
    if rows == 0:
        return dfeat, dweight.zero_()

    cfg = _fused_blocks(D, student_feat.dtype, device)
    upcast, precision = _dot_args(student_feat.dtype)
    chunk = min(K, chunk or _fused_chunk(rows, K, student_feat.element_size()))
    ds = torch.empty(rows, chunk, device=device, dtype=student_feat.dtype)
    # padding rows (weight 0) get dS = 0, but may hold anything, even NaN: 0 x NaN in dW
    kept = student_feat if weight is None else \
        torch.where(weight[:, None] != 0, student_feat, 0.0)
    for k0 in range(0, K, chunk):
        n = min(chunk, K - k0)
        ds_chunk = ds[:, :n]
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(n, cfg["BLOCK_K"]))
        _fused_head_ce_dlogits_kernel[grid](
            student_feat, student_w[k0:], teacher_feat, teacher_w[k0:], center[k0:],
            weight if weight is not None else center, lse, dloss, ds_chunk,
            rows, n, D, ds.stride(0), 1.0 / student_temp, 1.0 / teacher_temp,
            HAS_WEIGHT=weight is not None, UPCAST=upcast, DOT_PRECISION=precision, **cfg,
        )
        dfeat += ds_chunk @ student_w[k0:k0 + n]  # matmuls in the feature dtype
        dweight[k0:k0 + n] = ds_chunk.t() @ kept
    return dfeat, dweight


# --------------------------------------------------------------------------------------
# Autograd wrappers and the public functionals
# --------------------------------------------------------------------------------------
def _use_kernels(*tensors):
    """Triton per `kernels.utils.use_triton`; fp64 inputs always take the (fp64) twin."""
    return use_triton(*tensors) and not any(
        t is not None and t.dtype == torch.float64 for t in tensors)


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
    if not _use_kernels(student, teacher, center, weight):
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
    if not _use_kernels(student, teacher, center, weight):
        return _reference.centered_softmax_ce(student, teacher, center, student_temp,
                                              teacher_temp, weight)
    inplace_grad = inplace_grad and student.requires_grad and torch.is_grad_enabled()
    loss, _ = _CenteredSoftmaxCE.apply(student, teacher.detach(), center.detach(),
                                       float(student_temp), float(teacher_temp), weight,
                                       False, inplace_grad)
    return loss


class _FusedHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_feat, student_w, teacher_feat, teacher_w, center,
                student_temp, teacher_temp, weight, dtype):
        # the weights arrive in fp32 and their gradient leaves in fp32 (each chunk of dW is
        # one matmul in the matmul dtype, as in the unfused head); the kernels read copies
        # in the matmul dtype
        student_feat = student_feat.to(dtype).contiguous()
        teacher_feat = teacher_feat.to(dtype).contiguous()
        student_w, teacher_w = student_w.to(dtype).contiguous(), teacher_w.to(dtype).contiguous()
        loss, lse = fused_head_ce_fwd(student_feat, student_w, teacher_feat, teacher_w,
                                      center, student_temp, teacher_temp, weight)
        ctx.save_for_backward(student_feat, student_w, teacher_feat, teacher_w, center,
                              weight, lse)
        ctx.temps = (student_temp, teacher_temp)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        student_feat, student_w, teacher_feat, teacher_w, center, weight, lse = \
            ctx.saved_tensors
        dfeat, dweight = fused_head_ce_bwd(student_feat, student_w, teacher_feat, teacher_w,
                                           center, lse, *ctx.temps, weight, dloss)
        return (dfeat.to(student_feat.dtype), dweight,
                None, None, None, None, None, None, None)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fused_head_ce(student_feat, student_v, student_g, teacher_feat, teacher_v, teacher_g,
                  center, student_temp, teacher_temp, weight=None):
    """The head's weight-normalised last layer fused with the loss, no logits in memory.

    student_feat, teacher_feat: [rows, D] L2-normalised bottleneck features;
    student_v, teacher_v: [K, D] and student_g, teacher_g: [K, 1] or [K], the weight-norm
    parameters of each `Linear(D, K, bias=False)` (W = g * v / ||v||, row norms);
    center: [K]; weight: [rows] or None (0 = padding row).
    Equals `centered_softmax_ce_and_colsum(student_feat @ W_s^T, teacher_feat @ W_t^T, ...)`.
    Returns (loss [rows] fp32, colsum [K] fp32). Differentiable with respect to
    student_feat, student_v and student_g. The matmuls run in autocast's dtype when
    autocast is on, else in student_feat's dtype, with fp32 accumulation.
    CUDA tensors run the Triton kernels; CPU tensors run them under TRITON_INTERPRET=1,
    else (and for fp64 inputs) the twin `ibot_fast.reference.centered_ce.fused_head_ce`.
    """
    if not _use_kernels(student_feat, student_v, student_g, teacher_feat, teacher_v,
                        teacher_g, center, weight):
        return _reference.fused_head_ce(student_feat, student_v, student_g, teacher_feat,
                                        teacher_v, teacher_g, center, student_temp,
                                        teacher_temp, weight)
    K = student_v.shape[0]
    dtype = _matmul_dtype(student_feat)
    # weight norm in fp32 PyTorch: autograd carries d W_s back to v and g
    student_w = torch._weight_norm(student_v.float(), student_g.float().reshape(K, 1), 0)
    with torch.no_grad():
        teacher_w = torch._weight_norm(teacher_v.float(), teacher_g.float().reshape(K, 1), 0)
        teacher_feat = teacher_feat.detach()
        kept = teacher_feat.float()
        if weight is not None:  # padding rows may hold anything: select, don't multiply
            kept = torch.where(weight.reshape(-1, 1) != 0, kept, 0.0)
        colsum = teacher_w @ kept.sum(dim=0)
    loss = _FusedHeadCE.apply(student_feat.to(dtype), student_w, teacher_feat, teacher_w,
                              center.detach(), float(student_temp), float(teacher_temp), weight,
                              dtype)
    return loss, colsum
