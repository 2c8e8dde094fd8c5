"""The centred cross-entropy kernels on logits (kernels/centered_ce.py) against their twins.

Every test compares the forward values and every gradient with the twin in
`ibot_fast.reference.centered_ce`. Without a GPU the kernels run under the Triton
interpreter (tests/conftest.py), so shapes stay small; the `gpu` tests add bf16, the
flash-attention error rule and 64-bit indexing. The fused last layer + loss, which shares
the combine kernel, is tested in tests/test_kernel_fused_head.py.
"""
import math
import zlib

import pytest
import torch

from ibot_fast.kernels import centered_ce as kernels
from ibot_fast.reference import centered_ce as reference

STUDENT_TEMP = 0.1

# (atol, rtol) of kernel against twin, by input dtype. Both compute in fp32 from the same
# inputs (the kernel multiplies by 1/T where the twin divides by T, and sums in another
# order): losses and column sums agree to ~1e-6 relative. Gradients w/ts (q - p) reach
# ~10, so fp32 rounding of the exponents leaves ~1e-5 absolute, and a low-precision
# student dtype rounds the result once more in each (one unit in the last place apart).
LOSS_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-5, 2e-5),
            torch.bfloat16: (2e-5, 2e-5)}
GRAD_TOL = {torch.float32: (5e-5, 2e-5), torch.float16: (5e-5, 2e-3),
            torch.bfloat16: (2e-4, 1.6e-2)}


def _generator(*key):
    """A generator seeded from the test case: fresh data per case, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _inputs(rows, K, dtype, device, gen, scale=2.0, weighted=True):
    """Random logits (std `scale`), center, weights with some exact zeros, upstream grad."""
    student = (torch.randn(rows, K, generator=gen) * scale).to(dtype)
    teacher = (torch.randn(rows, K, generator=gen) * scale).to(dtype)
    center = torch.randn(K, generator=gen) * 0.3
    weight = None
    if weighted:
        weight = torch.rand(rows, generator=gen) + 0.05
        weight[torch.rand(rows, generator=gen) < 0.3] = 0.0
    dloss = torch.randn(rows, generator=gen)
    to = dict(device=device)
    return (student.to(**to), teacher.to(**to), center.to(**to),
            None if weight is None else weight.to(**to), dloss.to(**to))


def _strided(x, extra):
    """x's values as the column slice [:, :K] of a wider buffer [rows, K + extra] whose
    other columns hold NaN: any row stride is accepted, and a read past the slice shows."""
    big = torch.full((x.shape[0], x.shape[1] + extra), float("nan"), dtype=x.dtype,
                     device=x.device)
    big[:, :x.shape[1]] = x
    return big[:, :x.shape[1]]


def _layout(student, teacher, layout):
    """(student, teacher) as given, or row-strided with different row strides."""
    if layout == "contiguous":
        return student, teacher
    assert layout == "strided"
    return _strided(student, 13), _strided(teacher, 29)


def _leaf(x):
    """A fresh leaf with x's values and row stride (clone() would make a column slice
    contiguous)."""
    x = x.detach()
    leaf = x.clone() if x.is_contiguous() else _strided(x, x.stride(0) - x.shape[1])
    return leaf.requires_grad_(True)


def _run(fn, student, *args, dloss, **kwargs):
    """(outputs, d student) of fn(student, *args) for upstream gradient dloss."""
    student = _leaf(student)
    out = fn(student, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss, student, dloss.to(loss.dtype))
    return out, grad


def _close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def _check_against_twin(student, teacher, center, teacher_temp, weight, dloss, dtype):
    args = (teacher, center, STUDENT_TEMP, teacher_temp, weight)
    (loss_k, colsum_k), grad_k = _run(kernels.centered_softmax_ce_and_colsum, student, *args,
                                      dloss=dloss)
    (loss_r, colsum_r), grad_r = _run(reference.centered_softmax_ce_and_colsum, student,
                                      *args, dloss=dloss)
    assert loss_k.dtype == torch.float32 and colsum_k.dtype == torch.float32
    assert grad_k.dtype == student.dtype
    _close(loss_k, loss_r, LOSS_TOL[dtype], "loss")
    _close(colsum_k, colsum_r, LOSS_TOL[dtype], "teacher column sum")
    _close(grad_k, grad_r, GRAD_TOL[dtype], "d loss / d student")
    return loss_k, colsum_k, grad_k


# --------------------------------------------------------------------------------------
# Logits kernel
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher_temp, layout", [
    (0.04, "contiguous"), (0.07, "contiguous"), (0.07, "strided")])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("K", [1000, 8192])
def test_matches_twin(K, rows, dtype, weighted, teacher_temp, layout, device):
    """Also with row-strided student and teacher (column slices of wider NaN-padded
    buffers, different row strides), which the kernels read at their row stride."""
    gen = _generator("twin", K, rows, str(dtype), weighted, teacher_temp)
    student, teacher, center, weight, dloss = _inputs(rows, K, dtype, device, gen,
                                                      weighted=weighted)
    student, teacher = _layout(student, teacher, layout)
    loss, _, grad = _check_against_twin(student, teacher, center, teacher_temp, weight, dloss,
                                        dtype)
    # the loss-only functional is the same computation
    loss_only, grad_only = _run(kernels.centered_softmax_ce, student, teacher, center,
                                STUDENT_TEMP, teacher_temp, weight, dloss=dloss)
    torch.testing.assert_close(loss_only, loss, atol=0, rtol=0)
    torch.testing.assert_close(grad_only, grad, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_k_few_rows(dtype, device):
    gen = _generator("large", str(dtype))
    student, teacher, center, weight, dloss = _inputs(3, 65536, dtype, device, gen)
    weight[0], weight[1] = 0.0, 0.5  # one padding row, one real row at least
    _check_against_twin(student, teacher, center, 0.07, weight, dloss, dtype)


@pytest.mark.parametrize("teacher_temp", [0.04 + 0.005 * i for i in range(7)])
def test_teacher_temperature_schedule(teacher_temp, device):
    """The warm-up schedule's teacher temperatures, 0.04 to 0.07, student at 0.1."""
    gen = _generator("schedule", teacher_temp)
    student, teacher, center, weight, dloss = _inputs(19, 1000, torch.float32, device, gen)
    _check_against_twin(student, teacher, center, teacher_temp, weight, dloss,
                        torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logits_of_1e4_stay_finite(dtype, device):
    """Logits spread over [-1e4, 1e4] (each row a shuffled grid from -1e4 to 1e4, steps of
    20): s/ts and (t - c)/tt reach 1e5 and 2.5e5. On a grid the softmaxes are one-hot, so
    the loss is well conditioned; where two logits nearly tie, fp32 rounding of exponents
    ~1e5 moves p by percents, in the twin as in the kernel."""
    gen = _generator("extreme", str(dtype))
    rows, K = 9, 1001
    grid = torch.linspace(-1e4, 1e4, K)

    def shuffled():
        return torch.stack([grid[torch.randperm(K, generator=gen)] for _ in range(rows)])

    student = shuffled().to(dtype).to(device)
    teacher = shuffled().to(dtype).to(device)
    center = torch.randn(K, generator=gen).to(device)
    dloss = torch.randn(rows, generator=gen).to(device)
    args = (teacher, center, STUDENT_TEMP, 0.04, None)
    (loss_k, colsum_k), grad_k = _run(kernels.centered_softmax_ce_and_colsum, student, *args,
                                      dloss=dloss)
    (loss_r, colsum_r), grad_r = _run(reference.centered_softmax_ce_and_colsum, student,
                                      *args, dloss=dloss)
    assert torch.isfinite(loss_k).all() and torch.isfinite(grad_k).all()
    assert loss_k.abs().max() > 1e4  # the test is about large values
    torch.testing.assert_close(loss_k, loss_r, atol=0.05, rtol=1e-6)  # ulp(2e5) = 0.016
    torch.testing.assert_close(colsum_k, colsum_r, atol=0.05, rtol=1e-6)
    # The gradient's non-zero entries are the one-hot softmax entries, +-dloss/ts. The twin
    # rounds s/ts ~ 1e5 to its ulp (0.0078) before exponentiating, so its own p is off by up
    # to e^0.0078 - 1 = 0.8% (teacher, 2.5e5: 1.6%); on a GPU the kernel's FMA-contracted
    # x * c - m rounds differently from the twin (seen on an H100: 0.7% on 8 of 9009
    # entries). Against the twin, then: 3% of the largest entry; a wrong or missing entry
    # is off by 100%.
    scale = grad_r.abs().max().item()
    assert scale > 1  # the entries are there
    _close(grad_k, grad_r, (0.03 * scale, 0.0), "d loss / d student")
    # and everywhere the softmaxes are exactly 0 the kernel writes exactly 0
    assert torch.equal(grad_k[grad_r == 0], grad_r[grad_r == 0]) or \
        (grad_k[grad_r == 0].abs().max() < 1e-6 * scale)


def test_padding_rows_are_never_read(device):
    """Rows with weight 0 may hold anything (NaN here): loss 0, gradient 0, no colsum."""
    gen = _generator("padding")
    student, teacher, center, weight, dloss = _inputs(21, 1000, torch.float32, device, gen)
    weight[-5:] = 0.0
    pad = weight == 0
    student[pad], teacher[pad] = float("nan"), float("nan")
    loss, colsum, grad = _check_against_twin(student, teacher, center, 0.04, weight, dloss,
                                             torch.float32)
    assert (loss[pad] == 0).all() and (grad[pad] == 0).all()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(colsum, teacher[~pad].sum(0), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_every_output_and_workspace_is_written(poisoned_empty, weighted, device):
    gen = _generator("poison", weighted)
    student, teacher, center, weight, dloss = _inputs(37, 3000, torch.float32, device, gen,
                                                      weighted=weighted)
    loss, colsum, grad = _check_against_twin(student, teacher, center, 0.04, weight, dloss,
                                             torch.float32)
    assert torch.isfinite(loss).all() and torch.isfinite(colsum).all()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("blocks, rows, K", [
    *((blocks, 37, K) for blocks in [(16, 256, 4), (16, 128, 4), (4, 1024, 8)]
      for K in (1000, 1024)),
    ((2, 64, 1), 9, 200), ((2, 64, 1), 9, 192),  # small tiles: many programs, small shape
])
def test_every_tiling_matches_twin(blocks, rows, K, device):
    """The GPU tilings (`_ce_blocks`: 16 x 256 and 16 x 128, 4 warps, forward; 4 x 1024, 8
    warps, backward; the interpreter otherwise uses other tiles) and an odd one give the
    twin's loss, column sums and gradient, with and without column masks (K = 1000, 1024;
    200, 192 for 64-column tiles) and with rows not a multiple of the tile (37; 9)."""
    gen = _generator("tiling", blocks, K)
    student, teacher, center, weight, dloss = _inputs(rows, K, torch.float16, device, gen)
    loss, colsum, lse = kernels.centered_ce_fwd(student, teacher, center, STUDENT_TEMP, 0.05,
                                                weight, with_colsum=True, blocks=blocks)
    grad = kernels.centered_ce_bwd(student, teacher, center, lse, STUDENT_TEMP, 0.05, weight,
                                   dloss, blocks=blocks)
    (loss_r, colsum_r), grad_r = _run(reference.centered_softmax_ce_and_colsum, student,
                                      teacher, center, STUDENT_TEMP, 0.05, weight, dloss=dloss)
    _close(loss, loss_r, LOSS_TOL[torch.float16], "loss")
    _close(colsum, colsum_r, LOSS_TOL[torch.float16], "column sums")
    _close(grad, grad_r, GRAD_TOL[torch.float16], "d loss / d student")


def test_gpu_tiles_keep_a_row_inside_one_warp():
    """The forward's GPU tile row is one warp's 32 lanes x 16 bytes (so row statistics
    reduce within a warp); the backward keeps its 4 x 1024 elementwise tiles."""
    cuda = torch.device("cuda")
    assert kernels._ce_blocks(8192, torch.bfloat16, cuda) == (16, 256, 4)
    assert kernels._ce_blocks(8192, torch.float32, cuda) == (16, 128, 4)
    assert kernels._ce_blocks(100, torch.float16, cuda) == (16, 128, 4)
    assert kernels._ce_blocks(8192, torch.bfloat16, cuda, backward=True) == (4, 1024, 8)


def test_backward_overwrites_a_given_buffer(device):
    gen = _generator("out")
    student, teacher, center, weight, dloss = _inputs(37, 1000, torch.float16, device, gen)
    loss, _, lse = kernels.centered_ce_fwd(student, teacher, center, STUDENT_TEMP, 0.05, weight)
    out = torch.full_like(student, float("nan"))
    grad = kernels.centered_ce_bwd(student, teacher, center, lse, STUDENT_TEMP, 0.05, weight,
                                   dloss, out=out)
    assert grad.data_ptr() == out.data_ptr()
    _, grad_r = _run(reference.centered_softmax_ce, student, teacher, center, STUDENT_TEMP,
                     0.05, weight, dloss=dloss)
    _close(out, grad_r, GRAD_TOL[torch.float16], "d loss / d student")


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inplace_grad_mode(dtype, layout, device):
    """The forward writes the gradient into the student buffer; loss, column sums and
    gradient as the twin's. Row-strided: the gradient goes into the column slice at its
    stride, and the buffer's other columns (NaN) are neither read nor written."""
    gen = _generator("inplace", str(dtype), layout)
    student, teacher, center, weight, dloss = _inputs(37, 1000, dtype, device, gen)
    student, teacher = _layout(student, teacher, layout)
    (loss_r, colsum_r), grad_r = _run(reference.centered_softmax_ce_and_colsum, student,
                                      teacher, center, STUDENT_TEMP, 0.04, weight, dloss=dloss)
    buffer = _leaf(student)
    assert buffer.stride() == student.stride()
    loss, colsum = kernels.centered_softmax_ce_and_colsum(buffer, teacher, center,
                                                          STUDENT_TEMP, 0.04, weight,
                                                          inplace_grad=True)
    _close(loss, loss_r, LOSS_TOL[dtype], "loss")
    _close(colsum, colsum_r, LOSS_TOL[dtype], "teacher column sum")
    assert not torch.equal(buffer.detach(), student)  # the logits were overwritten
    loss.backward(dloss)
    _close(buffer.grad, grad_r, GRAD_TOL[dtype], "d loss / d student (in place)")
    if layout == "strided":
        whole = buffer.detach().as_strided((37, buffer.stride(0)), buffer.stride())
        assert whole[:, 1000:].isnan().all(), "columns past the slice must stay untouched"
        _close(buffer.detach(), grad_r, GRAD_TOL[dtype], "gradient written in the slice")


def test_column_sums_are_deterministic(device):
    """300 rows: several row groups each write partial sums, one torch.sum finishes them
    (no atomics): bitwise the same on every call, and the twin's sums."""
    gen = _generator("determinism")
    student, teacher, center, weight, _ = _inputs(300, 2048, torch.float32, device, gen)
    first = kernels.centered_softmax_ce_and_colsum(student, teacher, center, 0.1, 0.04, weight)
    second = kernels.centered_softmax_ce_and_colsum(student, teacher, center, 0.1, 0.04, weight)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    loss_r, colsum_r = reference.centered_softmax_ce_and_colsum(student, teacher, center, 0.1,
                                                                0.04, weight)
    _close(first[0], loss_r, LOSS_TOL[torch.float32], "loss")
    _close(first[1], colsum_r, LOSS_TOL[torch.float32], "teacher column sum")
    kept = teacher.double()[weight != 0]
    _close(first[1], kept.sum(0), (1e-4, 1e-5), "teacher column sum against fp64")


def test_no_gradient_reaches_teacher_or_center(device):
    gen = _generator("nograd")
    student, teacher, center, _, _ = _inputs(5, 1000, torch.float32, device, gen)
    student.requires_grad_(True), teacher.requires_grad_(True), center.requires_grad_(True)
    kernels.centered_softmax_ce(student, teacher, center, 0.1, 0.04).sum().backward()
    assert student.grad is not None and teacher.grad is None and center.grad is None


def test_cpu_without_interpreter_runs_the_twin(monkeypatch):
    gen = _generator("dispatch")
    student, teacher, center, weight, _ = _inputs(7, 100, torch.float32, "cpu", gen)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    loss, colsum = kernels.centered_softmax_ce_and_colsum(student, teacher, center, 0.1, 0.04,
                                                          weight)
    loss_r, colsum_r = reference.centered_softmax_ce_and_colsum(student, teacher, center, 0.1,
                                                                0.04, weight)
    assert torch.equal(loss, loss_r) and torch.equal(colsum, colsum_r)


def test_bad_arguments_raise(device):
    s = torch.randn(4, 10, device=device)
    with pytest.raises(ValueError, match="center"):
        kernels.centered_softmax_ce(s, s, torch.zeros(9, device=device), 0.1, 0.04)
    with pytest.raises(ValueError, match="weight"):
        kernels.centered_softmax_ce(s, s, torch.zeros(10, device=device), 0.1, 0.04,
                                    torch.ones(3, device=device))
    with pytest.raises(ValueError, match="\\[rows, K\\]"):
        kernels.centered_softmax_ce(s, s[:, :5], torch.zeros(10, device=device), 0.1, 0.04)


# --------------------------------------------------------------------------------------
# GPU only: bf16, the flash-attention error rule, 64-bit indexing
# --------------------------------------------------------------------------------------
def _plain_lowp(student, teacher, center, student_temp, teacher_temp, weight):
    """The loss written the plain PyTorch way, in the inputs' own (low) precision."""
    p = torch.softmax((teacher - center.to(teacher.dtype)) / teacher_temp, dim=-1)
    loss = -(p * torch.log_softmax(student / student_temp, dim=-1)).sum(-1)
    return loss if weight is None else loss * weight.to(loss.dtype)


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("K, rows", [(8192, 1000), (65536, 256), (1000, 7500)])
def test_bf16_matches_twin_gpu(K, rows, device):
    gen = _generator("bf16", K, rows)
    student, teacher, center, weight, dloss = _inputs(rows, K, torch.bfloat16, device, gen)
    _check_against_twin(student, teacher, center, 0.04, weight, dloss, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attention_error_rule_gpu(dtype, device):
    """Kernel error against an fp64 reference <= 2x the error of plain PyTorch run in the
    same low precision (loss and gradient)."""
    gen = _generator("rule", str(dtype))
    student, teacher, center, weight, dloss = _inputs(512, 8192, dtype, device, gen)
    args = (teacher, center, STUDENT_TEMP, 0.04, weight)
    loss_k, grad_k = _run(kernels.centered_softmax_ce, student, *args, dloss=dloss)
    loss_p, grad_p = _run(_plain_lowp, student, *args, dloss=dloss)
    # the twin computes in fp32 by design: the truth here is the same formula in fp64
    s64 = student.double().requires_grad_(True)
    p = torch.softmax((teacher.double() - center.double()) / 0.04, dim=-1)
    loss_64 = -(p * torch.log_softmax(s64 / STUDENT_TEMP, dim=-1)).sum(-1) * weight.double()
    (grad_64,) = torch.autograd.grad(loss_64, s64, dloss.double())
    loss_64 = loss_64.detach()
    assert _err(loss_k, loss_64) <= 2 * _err(loss_p, loss_64) + 1e-6
    assert _err(grad_k, grad_64) <= 2 * _err(grad_p, grad_64) + 1e-6


@pytest.mark.gpu
def test_more_than_2_to_the_31_elements_gpu(device):
    """rows * K > 2**31: the row offsets must be 64-bit. Checks the last rows."""
    K = 65536
    rows = 2**31 // K + 3
    if torch.cuda.mem_get_info()[0] < 8 * rows * K * 2:
        pytest.skip("not enough GPU memory")
    gen = torch.Generator(device=device).manual_seed(31)
    student = torch.randn(rows, K, device=device, dtype=torch.bfloat16, generator=gen)
    teacher = torch.randn(rows, K, device=device, dtype=torch.bfloat16, generator=gen)
    center = torch.randn(K, device=device, generator=gen) * 0.1
    student.requires_grad_(True)
    loss, colsum = kernels.centered_softmax_ce_and_colsum(student, teacher, center, 0.1, 0.04)
    loss[-4:].sum().backward()
    tail = slice(rows - 4, rows)
    s_tail = student.detach()[tail].clone().requires_grad_(True)
    loss_r = reference.centered_softmax_ce(s_tail, teacher[tail], center, 0.1, 0.04)
    loss_r.sum().backward()
    _close(loss[tail], loss_r, LOSS_TOL[torch.bfloat16], "loss of the last rows")
    _close(student.grad[tail], s_tail.grad, GRAD_TOL[torch.bfloat16], "grad of the last rows")
    assert (student.grad[:-4] == 0).all()
    _close(colsum, teacher.float().sum(0), (1e-2, 1e-4), "teacher column sum")
    assert math.isfinite(colsum.sum().item())
