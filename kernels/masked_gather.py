"""Gather of the masked patch tokens into a fixed-size buffer, and its backward.

    forward:   out[r, :] = tokens[index[r] // N, index[r] % N, :]   for r < n = len(index)
               out[r, :] = 0                                         for n <= r < out_rows
    backward:  grad_tokens = zeros(B, N, D);  grad_tokens[index[r] // N, index[r] % N, :] = grad_out[r, :]
               (r < n; the padding rows' gradient is ignored)

`index` holds flat positions `b * N + i` without duplicates (the True entries of a mask,
see `masked_index`), so the backward's scatter-add is a plain scatter: no atomics. The
index is not range-checked on the device (that would synchronise); the twin is, by
`index_select`.

Bytes moved, element size e: forward reads n x D x e + 8 n, writes out_rows x D x e;
backward zero-fills B x N x D x e, then reads n x D x e + 8 n and writes n x D x e.

Twin: `ibot_fast.reference.masked_gather.gather_masked` / `scatter_masked`
(`index_select` / `index_add_`).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ibot_fast.reference import masked_gather as reference
from ibot_fast.reference.masked_gather import masked_index  # noqa: F401  (re-exported)

from .utils import next_power_of_2, use_triton


@triton.jit
def _gather_masked_fwd_kernel(
    tokens_ptr,  # [B, N, D] tokens, any strides
    index_ptr,  # [n_index] int64 flat positions b * N + i
    out_ptr,  # [out_rows, D] contiguous output
    n_index,  # number of gathered rows
    out_rows,  # rows of out; rows >= n_index are written with zeros
    N,  # tokens per image
    D,  # features per token
    stride_b,  # tokens.stride(0), in elements
    stride_n,  # tokens.stride(1)
    stride_d,  # tokens.stride(2)
    BLOCK_R: tl.constexpr,  # output rows per program
    BLOCK_D: tl.constexpr,  # features per program
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    gathered = rows < n_index
    flat = tl.load(index_ptr + rows, mask=gathered, other=0).to(tl.int64)
    b = flat // N
    i = flat - b * N
    src = tokens_ptr + (b * stride_b + i * stride_n)[:, None] + cols[None, :] * stride_d
    x = tl.load(src, mask=gathered[:, None] & col_mask[None, :], other=0.0)
    dst = out_ptr + rows[:, None] * D + cols[None, :]
    tl.store(dst, x, mask=(rows < out_rows)[:, None] & col_mask[None, :])


@triton.jit
def _gather_masked_bwd_kernel(
    grad_out_ptr,  # [out_rows, D] gradient of the gathered rows, any strides
    index_ptr,  # [n_index] int64 flat positions b * N + i, no duplicates
    grad_tokens_ptr,  # [B * N, D] contiguous, zero-filled by the host
    n_index,  # number of gathered rows (padding rows are not read)
    D,  # features per token
    stride_gr,  # grad_out.stride(0), in elements
    stride_gd,  # grad_out.stride(1)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # features per program
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < n_index)[:, None] & (cols < D)[None, :]
    flat = tl.load(index_ptr + rows, mask=rows < n_index, other=0).to(tl.int64)
    g = tl.load(grad_out_ptr + rows[:, None] * stride_gr + cols[None, :] * stride_gd, mask=mask)
    tl.store(grad_tokens_ptr + flat[:, None] * D + cols[None, :], g, mask=mask)


def _blocks(D: int):
    """(BLOCK_R, BLOCK_D, num_warps): tiles of up to 4096 elements, full rows up to D=256."""
    block_d = min(next_power_of_2(D), 256)
    block_r = min(64, max(1, 4096 // block_d))
    return block_r, block_d, 4


def _check_index(index: Tensor, tokens_device: torch.device):
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"index must be 1-D int64, got {index.dtype} {tuple(index.shape)}")
    if index.device != tokens_device:
        raise ValueError(f"index is on {index.device}, tokens on {tokens_device}")


def gather_masked_fwd(tokens: Tensor, index: Tensor, out_rows: int, out: Tensor = None) -> Tensor:
    """Check shapes, launch the gather into `out` (a contiguous `[out_rows, D]` buffer of
    tokens' dtype, reusable from step to step; allocated when None) and return it."""
    if tokens.dim() != 3 or not tokens.is_floating_point():
        raise ValueError(f"tokens must be a float [B, N, D] tensor, got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    _check_index(index, tokens.device)
    n_index = index.numel()
    if not 0 <= n_index <= out_rows:
        raise ValueError(f"{n_index} indices do not fit in out_rows={out_rows}")
    _, N, D = tokens.shape
    if out is None:
        out = torch.empty(out_rows, D, dtype=tokens.dtype, device=tokens.device)
    elif (out.shape != (out_rows, D) or out.dtype != tokens.dtype or out.device != tokens.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous [{out_rows}, {D}] {tokens.dtype} on "
                         f"{tokens.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if out.numel() == 0:
        return out
    block_r, block_d, num_warps = _blocks(D)
    grid = (triton.cdiv(out_rows, block_r), triton.cdiv(D, block_d))
    _gather_masked_fwd_kernel[grid](
        tokens,
        index,
        out,
        n_index,
        out_rows,
        N,
        D,
        tokens.stride(0),
        tokens.stride(1),
        tokens.stride(2),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out


def gather_masked_bwd(grad_out: Tensor, index: Tensor, B: int, N: int) -> Tensor:
    """Check shapes, zero-fill `[B, N, D]`, launch the scatter of the first len(index) rows."""
    if grad_out.dim() != 2 or grad_out.shape[0] < index.numel():
        raise ValueError(f"grad_out {tuple(grad_out.shape)} has fewer than {index.numel()} rows")
    _check_index(index, grad_out.device)
    D = grad_out.shape[1]
    grad_tokens = torch.zeros(B, N, D, dtype=grad_out.dtype, device=grad_out.device)
    n_index = index.numel()
    if n_index == 0 or D == 0:
        return grad_tokens
    block_r, block_d, num_warps = _blocks(D)
    grid = (triton.cdiv(n_index, block_r), triton.cdiv(D, block_d))
    _gather_masked_bwd_kernel[grid](
        grad_out,
        index,
        grad_tokens,
        n_index,
        D,
        grad_out.stride(0),
        grad_out.stride(1),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return grad_tokens


class _GatherMasked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, index, out_rows):
        ctx.save_for_backward(index)
        ctx.tokens_shape = tokens.shape
        return gather_masked_fwd(tokens, index, out_rows)

    @staticmethod
    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        B, N, _ = ctx.tokens_shape
        return gather_masked_bwd(grad_out, index, B, N), None, None


def gather_masked(tokens: Tensor, index: Tensor, out_rows: int) -> Tensor:
    """Rows of `tokens` at flat positions `index`, in a fixed-size buffer.

    tokens: `[B, N, D]`, any float dtype, any strides. index: 1-D int64, flat positions
    `b * N + i` in `[0, B * N)`, no duplicates, `len(index) <= out_rows`.
    Returns `[out_rows, D]` (tokens' dtype): row r is `tokens[index[r] // N, index[r] % N]`
    for r < len(index), zero after. Differentiable w.r.t. `tokens`: the gradient is the
    output gradient's first len(index) rows scattered into zeros `[B, N, D]`.
    CUDA tensors run the Triton kernels; CPU tensors run them under `TRITON_INTERPRET=1`,
    else the twin `ibot_fast.reference.masked_gather.gather_masked`.
    """
    if use_triton(tokens, index):
        return _GatherMasked.apply(tokens, index, out_rows)
    return reference.gather_masked(tokens, index, out_rows)
