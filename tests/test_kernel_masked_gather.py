"""`gather_masked` (Triton, under the interpreter on the CPU) against its twin.

A gather is a copy: forward and backward must equal the twin exactly, in every dtype.
"""
import pytest
import torch

from ibot_fast.kernels.masked_gather import gather_masked, gather_masked_bwd, gather_masked_fwd
from ibot_fast.reference import masked_gather as reference

# (B, N, D): ViT patch grids (196 global, 36 local), odd widths, a single feature.
SHAPES = [(2, 196, 384), (3, 36, 37), (4, 36, 1), (5, 7, 300)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _random_index(B, N, n, device, generator):
    """n distinct flat positions in [0, B * N), in random order (not sorted: the kernel
    must not rely on order)."""
    return torch.randperm(B * N, generator=generator)[:n].to(device)


def _tokens(B, N, D, dtype, device, transposed, generator):
    """Random tokens; `transposed` gives a non-contiguous [B, N, D] view (stride_d != 1)."""
    if transposed:
        return torch.randn(B, D, N, generator=generator).to(device, dtype).transpose(1, 2)
    return torch.randn(B, N, D, generator=generator).to(device, dtype)


GRAD_LAYOUTS = ["contiguous", "transposed", "row_strided", "expanded"]


def _grad_out(out_rows, D, n, dtype, device, layout, generator):
    """A random [out_rows, D] output gradient, NaN in the padding rows (their gradient must
    be ignored), laid out as: contiguous; transposed (strides (1, out_rows)); a column
    slice of a wider buffer whose other columns are NaN (row stride D + 5); one column
    expanded over D (strides (1, 0), as autograd hands out for a broadcast product)."""
    if layout == "expanded":
        grad = torch.randn(out_rows, 1, generator=generator).to(device, dtype)
        grad[n:] = float("nan")
        return grad.expand(out_rows, D)
    if layout == "transposed":
        grad = torch.randn(D, out_rows, generator=generator).to(device, dtype).t()
    else:
        grad = torch.randn(out_rows, D + 5, generator=generator).to(device, dtype)
        grad[:, D:] = float("nan")
        grad = grad if layout == "row_strided" else grad[:, :D].contiguous()
        grad = grad[:, :D]
    grad[n:] = float("nan")
    if D > 1 and out_rows > 1:
        assert grad.is_contiguous() == (layout == "contiguous")
    return grad


@pytest.mark.parametrize("B,N,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fraction", [0.0, 0.13, 1.0])
@pytest.mark.parametrize("padding", [0, 11])
def test_forward_and_backward_equal_twin(B, N, D, dtype, fraction, padding, device):
    g = torch.Generator().manual_seed(B * 1000 + D)
    n = int(fraction * B * N)
    out_rows = n + padding
    index = _random_index(B, N, n, device, g)
    tokens = _tokens(B, N, D, dtype, device, transposed=(D == 37), generator=g)

    out = torch.full((out_rows, D), float("nan"), dtype=dtype, device=device)
    gather_masked_fwd(tokens, index, out_rows, out=out)
    expected = reference.gather_masked(tokens, index, out_rows)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not out[n:].any(), "padding rows must be zero"

    for layout in GRAD_LAYOUTS:
        grad_out = _grad_out(out_rows, D, n, dtype, device, layout, g)
        grad = gather_masked_bwd(grad_out, index, B, N)
        torch.testing.assert_close(grad, reference.scatter_masked(grad_out, index, B, N),
                                   rtol=0, atol=0, msg=lambda m: f"{layout} grad_out: {m}")


@pytest.mark.parametrize("B,N,D", [(2, 196, 384), (3, 36, 37)])
@pytest.mark.parametrize("loss_kind", ["weighted", "transposed", "broadcast"])
def test_autograd_equals_twin(B, N, D, loss_kind, device):
    """Through autograd, also where the output gradient autograd hands the backward is not
    contiguous: `out * w.t()` (transposed) and `out.sum(0) * w` (expanded over rows)."""
    g = torch.Generator().manual_seed(7)
    n = B * N // 7
    index = _random_index(B, N, n, device, g)
    tokens = torch.randn(B, N, D, generator=g).to(device).requires_grad_()
    weight = {"weighted": lambda: torch.randn(n + 5, D, generator=g),
              "transposed": lambda: torch.randn(D, n + 5, generator=g).t(),
              "broadcast": lambda: torch.randn(D, generator=g)}[loss_kind]().to(device)

    def loss_of(out):
        return ((out.sum(0) if loss_kind == "broadcast" else out) * weight).sum()

    out = gather_masked(tokens, index, n + 5)
    layouts = []
    out.register_hook(lambda grad: layouts.append(grad.stride()))
    loss_of(out).backward()
    grad, tokens.grad = tokens.grad, None
    out_ref = reference.gather_masked(tokens, index, n + 5)
    loss_of(out_ref).backward()

    expected_stride = {"weighted": (D, 1), "transposed": (1, n + 5), "broadcast": (0, 1)}
    assert layouts == [expected_stride[loss_kind]]  # the layout the kernel is handed
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, tokens.grad, rtol=0, atol=0)


def test_gradcheck_fp64(device):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 5, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    index = _random_index(2, 5, 4, device, g)
    assert torch.autograd.gradcheck(lambda x: gather_masked(x, index, 6), (tokens,))


def test_masked_index_matches_mask():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 14, 14, generator=g) < 0.3
    index = reference.masked_index(masks)
    expected = [b * 196 + i for b in range(3) for i in range(196) if masks[b].flatten()[i]]
    assert index.dtype == torch.int64 and index.tolist() == expected
    tokens = torch.randn(3, 196, 8, generator=g)
    rows = gather_masked(tokens, index, index.numel())
    torch.testing.assert_close(rows, tokens[masks.flatten(1)], rtol=0, atol=0)


def test_rejects_bad_arguments(device):
    tokens = torch.randn(2, 4, 3, device=device)
    with pytest.raises(ValueError, match="do not fit"):
        gather_masked_fwd(tokens, torch.arange(5, device=device), 4)
    with pytest.raises(ValueError, match="int64"):
        gather_masked_fwd(tokens, torch.arange(2, device=device, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="masks must be bool"):
        reference.masked_index(torch.ones(2, 4))
