"""Masked-token gather, the pure-PyTorch truth (twin of `ibot_fast.kernels.gather_masked`).

The fast path runs the iBOT head on the masked patch tokens only. Their flat positions
`b * N + i` are built once per step from the masks (`masked_index`); the tokens at those
positions are gathered into a fixed-size `[out_rows, D]` buffer whose rows past
`len(index)` are zero, so shapes stay static from step to step.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def masked_index(masks: Tensor) -> Tensor:
    """Flat positions `b * N + i` (int64, ascending) of the True entries of `masks`.

    masks: bool `[B, N]` or `[B, h, w]` (flattened to `N = h * w` per image). On a CUDA
    tensor `nonzero` synchronises with the host: build the index where the masks are made
    (the data path, on the CPU) and move it with the batch.
    """
    if masks.dtype != torch.bool or masks.dim() < 2:
        raise ValueError(f"masks must be bool [B, N] or [B, h, w], got {masks.dtype} "
                         f"{tuple(masks.shape)}")
    return masks.reshape(-1).nonzero().squeeze(1)


def gather_masked(tokens: Tensor, index: Tensor, out_rows: int) -> Tensor:
    """`out[r] = tokens.view(B * N, D)[index[r]]` for r < len(index), zero after.

    Differentiable (autograd of `index_select` is `index_add_`, see `scatter_masked`).
    """
    B, N, D = tokens.shape
    if index.numel() > out_rows:
        raise ValueError(f"{index.numel()} indices do not fit in {out_rows} rows")
    rows = tokens.reshape(B * N, D).index_select(0, index)
    return F.pad(rows, (0, 0, 0, out_rows - index.numel()))


def scatter_masked(grad_rows: Tensor, index: Tensor, B: int, N: int) -> Tensor:
    """The backward of `gather_masked`: rows `r < len(index)` of `grad_rows [out_rows, D]`
    added into zeros `[B, N, D]` at `index[r]`; the padding rows are ignored."""
    D = grad_rows.shape[1]
    grad = grad_rows.new_zeros(B * N, D)
    grad.index_add_(0, index, grad_rows[: index.numel()])
    return grad.view(B, N, D)
