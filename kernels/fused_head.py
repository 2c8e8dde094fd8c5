"""The head's weight-normalised last layer fused with the centred cross-entropy.

Math (docs/design.md §1.3 and §1.4). The head ends in a weight-normalised
`Linear(D, K, bias=False)`, W = g * v / ||v|| (norms of the rows of v), applied to
L2-normalised bottleneck features F [rows, D]. With student features F_s and weight W_s,
teacher features F_t and weight W_t, center c, temperatures ts and tt, row weight w:

    s = F_s W_s^T,  t = F_t W_t^T                      [rows, K] logits, never in memory
    loss_row = w * CE(softmax((t - c) / tt), softmax(s / ts))   as kernels/centered_ce.py
    dS   = w * dloss * (softmax(s / ts) - softmax((t - c) / tt)) / ts
    dF_s = dS W_s,  dW_s = dS^T F_s                    then dv, dg through the weight norm
    colsum = W_t (sum of F_t over the rows with w != 0) = the column sums of t

A row with weight exactly 0 is padding: loss and gradient 0, left out of `colsum`; its
features may hold anything (NaN included). Reference:
`ibot_fast.reference.fused_head.fused_head_ce` (the head's matmuls in fp32 PyTorch, then
`ibot_fast.reference.centered_ce.centered_softmax_ce_and_colsum`).

Forward, flash-attention style: program (i, j) of the grid (rows / BLOCK_R, n_splits)
computes the [BLOCK_R, BLOCK_K] logits tiles of row block i over its share j of the
columns on chip, from BLOCK_D slices of F and W (tl.dot, fp32 accumulation; student and
teacher share their address offsets), and folds each tile into the five online softmax
statistics of kernels/ce_stats.py, whose combine kernel then merges the shares. K is
split (n_splits > 1) only when the row blocks alone would not give about 2 programs per
SM.

Backward, K in chunks of `_fused_chunk` columns (all of K while the [rows, K] gradient of
the logits fits in FUSED_CHUNK_BYTES): a kernel recomputes the chunk's s and t tiles on
chip, as the forward does, and writes dS in the feature dtype to a [rows, chunk] buffer
that every chunk reuses; cuBLAS then adds dF_s += dS W_s[chunk] and writes
dW_s[chunk] = dS^T F_s. The two gradient matmuls are left to cuBLAS because it runs them
far faster than a Triton kernel that recomputes the logits to accumulate dF and dW itself
(benchmarks/results/README.md). The weight norm (v, g -> W, and its backward) and
`colsum` run in PyTorch on [K, D] tensors.

    FLOPs (R rows): forward 4 R K D (Triton); backward 4 R K D recomputing the logits
    (Triton) + 4 R K D (cuBLAS); the unfused head + loss: 8 R K D, all cuBLAS.
    Bytes per row (elt = bytes per matmul operand): forward reads 2 D elt of features and
    writes 20 n_splits bytes of statistics; backward reads 2 D elt and writes dS, K elt,
    which cuBLAS reads twice (3 K elt), against ~9 K elt for the unfused head + loss
    (s and t written, read twice, dS written and read). The weights, 2 K D elt, are read
    once per row block, from L2 after the first. Memory: O(rows + K D) in the forward,
    O(rows x chunk) in the backward, against O(rows x K) unfused.

Addressing: a scalar int64 base per tile and int32 offsets inside it. Rows and columns
past the ends are clamped to the last one instead of masked (their results are dropped by
the row and column masks), and D is walked in BLOCK_D slices that divide it, so the
operand loads carry no masks, which keeps ptxas from spilling registers. Padding rows are
computed like the others and dropped by the masks; the features that feed dW are zeroed
on them. The host checks D % 16 == 0, D <= 512 and K * D < 2**31.

Launch configuration (`_fused_blocks`, one for both kernels: they compute the same tiles):

    GPU bf16, fp16  BLOCK_R = BLOCK_K = 64, BLOCK_D = the largest power of 2 <= 64 that
                    divides D, 4 warps, 2 stages
    GPU fp32        32 x 32 tiles, BLOCK_D <= 32, 4 warps, 2 stages (tf32 dots only where
                    torch allows tf32 matmuls)
    interpreter     32 x 512 tiles, BLOCK_D <= 512 (D in one slice), dots in fp32 (the
                    interpreter's bf16 tl.dot is wrong): its cost is per op, not per FLOP

The GPU configurations compile for sm_90 and sm_80 without register spills at D = 256
(tests/test_kernel_compile.py); that, not timing, is what chose them.
"""
import torch
import triton
import triton.language as tl

from ibot_fast.reference import fused_head as _reference

from .ce_stats import LOG2E, combine, load_lse, row_grad_scale, use_kernels, weight_arg
from .utils import interpreter_on, target_programs

__all__ = ["fused_head_ce", "fused_head_ce_fwd", "fused_head_ce_bwd"]


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
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
    row_ok, scale = row_grad_scale(w_ptr, dloss_ptr, r, rows, inv_ts, HAS_WEIGHT, True)
    lse_s, lse_t = load_lse(lse_ptr, r, rows, row_ok)
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
def _fused_blocks(D: int, dtype: torch.dtype, device: torch.device):
    """Launch configuration of both fused kernels (see the module docstring)."""
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
    weight = weight_arg(weight)
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
    combine(stats, weight, loss, lse)
    return loss, lse


def _fused_k_splits(rows, K, cfg, device):
    """Split K across programs when there are too few row blocks to fill the GPU."""
    n_row_blocks = triton.cdiv(rows, cfg["BLOCK_R"])
    n_k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    n_splits = max(1, min(n_k_tiles, triton.cdiv(target_programs(device, 2), n_row_blocks)))
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
    weight = weight_arg(weight)
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
# Autograd wrapper and the public functional
# --------------------------------------------------------------------------------------
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
    else (and for fp64 inputs) the twin `ibot_fast.reference.fused_head.fused_head_ce`.
    """
    if not use_kernels(student_feat, student_v, student_g, teacher_feat, teacher_v,
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
