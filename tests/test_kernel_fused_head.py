"""The weight-normalised last layer fused with the loss (kernels/fused_head.py) against its
twin, `ibot_fast.reference.fused_head.fused_head_ce` (the head's matmuls, then the loss).

Every test compares the loss, the teacher column sums and the gradients of every student
input (features, v, g). Without a GPU the kernels run under the Triton interpreter
(tests/conftest.py), so shapes stay small; the `gpu` test adds bf16 and fp16 with the
flash-attention error rule.
"""
import pytest
import torch
import torch.nn.functional as F

from ibot_fast.kernels import fused_head as kernels
from ibot_fast.reference import fused_head as reference
from tests.test_kernel_centered_ce import STUDENT_TEMP, _close, _err, _generator, _plain_lowp

# The fused head casts W = g v / ||v|| to the matmul dtype (the twin keeps fp32) and feeds
# the gradient of the logits to a tensor-core dot in that dtype: low precision costs more.
HEAD_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 5e-3),
            torch.bfloat16: (4e-2, 4e-2)}


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """The interpreter's tl.dot is numpy.matmul; multi-threaded OpenBLAS on a 2-core runner
    is two orders of magnitude slower than one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """fp32 comparisons mean fp32 matmuls, in the twin and in the fused kernels (which
    follow torch's TF32 setting), whatever another module set."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = allowed


# --------------------------------------------------------------------------------------
# Fused weight-normalised last layer + loss
# --------------------------------------------------------------------------------------
def _head_inputs(rows, K, D, dtype, device, gen, weighted=True):
    """L2-normalised features, weight-norm parameters (g near 1, as trained), center."""
    def feat():
        return F.normalize(torch.randn(rows, D, generator=gen), dim=-1).to(dtype).to(device)

    def v_g():
        v = torch.randn(K, D, generator=gen).to(dtype).to(device)
        g = (1 + 0.2 * torch.randn(K, 1, generator=gen)).to(dtype).to(device)
        return v, g

    (student_v, student_g), (teacher_v, teacher_g) = v_g(), v_g()
    center = (torch.randn(K, generator=gen) * 0.1).to(device)
    weight = None
    if weighted:
        weight = torch.rand(rows, generator=gen) + 0.05
        weight[torch.rand(rows, generator=gen) < 0.3] = 0.0
        weight = weight.to(device)
    dloss = torch.randn(rows, generator=gen).to(device)
    return (feat(), student_v, student_g, feat(), teacher_v, teacher_g, center), weight, dloss


def _run_head(fn, tensors, teacher_temp, weight, dloss, autocast=None):
    """(loss, colsum, gradients of the student leaves); the forward under CPU autocast to
    `autocast` when given (the backward outside it, as in the trainer)."""
    student_feat, student_v, student_g, *teacher = tensors
    leaves = [x.detach().clone().requires_grad_(True)
              for x in (student_feat, student_v, student_g)]
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss, colsum = fn(*leaves, *teacher, STUDENT_TEMP, teacher_temp, weight)
    grads = torch.autograd.grad(loss, leaves, dloss.to(loss.dtype))
    return loss, colsum, grads


def _check_head(tensors, teacher_temp, weight, dloss, dtype, autocast=None):
    loss_k, colsum_k, grads_k = _run_head(kernels.fused_head_ce, tensors, teacher_temp, weight,
                                          dloss, autocast)
    loss_r, colsum_r, grads_r = _run_head(reference.fused_head_ce, tensors, teacher_temp,
                                          weight, dloss, autocast)
    tol = HEAD_TOL[dtype]
    _close(loss_k, loss_r, tol, "loss")
    _close(colsum_k, colsum_r, tol, "teacher column sum")
    for name, g_k, g_r in zip(("student_feat", "student_v", "student_g"), grads_k, grads_r):
        assert g_k.dtype == g_r.dtype and g_k.shape == g_r.shape
        # gradients are compared relative to their largest element
        _close(g_k, g_r, (tol[0] * g_r.abs().max().item(), tol[1]), f"d loss / d {name}")
    return loss_k, colsum_k, grads_k


@pytest.mark.parametrize("K, rows, D, dtype, weighted, teacher_temp", [
    (1000, 37, 256, torch.float32, True, 0.04),
    (1000, 70, 64, torch.float32, False, 0.04),
    (1000, 70, 64, torch.float32, False, 0.07),  # the second teacher temperature, once
    (1000, 37, 48, torch.float16, True, 0.04),
    (8192, 9, 256, torch.float32, True, 0.04),
    (65536, 2, 16, torch.float32, False, 0.04),
])
def test_fused_head_matches_unfused(K, rows, D, dtype, weighted, teacher_temp, device):
    gen = _generator("head", K, rows, D, str(dtype), weighted, teacher_temp)
    tensors, weight, dloss = _head_inputs(rows, K, D, dtype, device, gen, weighted)
    _check_head(tensors, teacher_temp, weight, dloss, dtype)


def test_fused_head_under_cpu_bf16_autocast(monkeypatch):
    """fp32 features and weights under CPU bf16 autocast (the trainer's setting): the fused
    kernels run their matmuls on bf16 copies (`_matmul_dtype` takes autocast's dtype), the
    twin's matmuls are autocast to bf16; values and fp32 gradients agree within the bf16
    table."""
    seen = []
    forward = kernels.fused_head_ce_fwd

    def spy(student_feat, student_w, teacher_feat, teacher_w, *args, **kwargs):
        seen.append({x.dtype for x in (student_feat, student_w, teacher_feat, teacher_w)})
        return forward(student_feat, student_w, teacher_feat, teacher_w, *args, **kwargs)

    monkeypatch.setattr(kernels, "fused_head_ce_fwd", spy)
    gen = _generator("head autocast")
    tensors, weight, dloss = _head_inputs(37, 1000, 64, torch.float32, "cpu", gen)
    _, _, grads = _check_head(tensors, 0.04, weight, dloss, torch.bfloat16,
                              autocast=torch.bfloat16)
    assert seen == [{torch.bfloat16}], "the kernels must run on autocast's dtype"
    assert all(g.dtype == torch.float32 for g in grads)  # the leaves' dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_head_backward_in_chunks(dtype, monkeypatch, device):
    """The backward walks K in chunks when [rows, K] logit gradients exceed its buffer
    budget: 2,500 columns in chunks of 1,024, 1,024 and 452 (a budget of 1 byte forces the
    smallest chunk), the same values and gradients as the twin."""
    monkeypatch.setattr(kernels, "FUSED_CHUNK_BYTES", 1)
    assert kernels._fused_chunk(37, 2500, 2) == 1024
    gen = _generator("head chunks", str(dtype))
    tensors, weight, dloss = _head_inputs(37, 2500, 64, dtype, device, gen)
    _check_head(tensors, 0.07, weight, dloss, dtype)


def test_fused_chunk_sizes():
    budget = kernels.FUSED_CHUNK_BYTES
    assert kernels._fused_chunk(7500, 8192, 2) == 8192  # 117 MiB: one chunk
    chunk = kernels._fused_chunk(7500, 65536, 2)
    assert chunk % 1024 == 0 and 7500 * chunk * 2 <= budget < 7500 * (chunk + 1024) * 2
    assert kernels._fused_chunk(10 ** 7, 65536, 4) == 1024  # never below 1,024 columns


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the NaN rows dropped
def test_fused_head_padding_rows_and_poisoned_workspaces(poisoned_empty, device):
    gen = _generator("head padding")
    tensors, weight, dloss = _head_inputs(40, 1000, 64, torch.float32, device, gen)
    weight[-6:] = 0.0
    tensors[0][-6:], tensors[3][-6:] = float("nan"), float("nan")  # padding: never read
    loss, colsum, grads = _check_head(tensors, 0.05, weight, dloss, torch.float32)
    assert (loss[-6:] == 0).all() and (grads[0][-6:] == 0).all()
    assert all(torch.isfinite(x).all() for x in (loss, colsum, *grads))


# --------------------------------------------------------------------------------------
# GPU only: bf16 and fp16 against fp64, the flash-attention error rule
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K, rows", [(8192, 300), (65536, 100)])
def test_fused_head_low_precision_gpu(K, rows, dtype, device):
    """Against the fp32 twin with the low-precision table, and the flash-attention rule
    against the plain head + loss run in the same precision."""
    gen = _generator("head gpu", K, rows, str(dtype))
    tensors, weight, dloss = _head_inputs(rows, K, 256, dtype, device, gen)
    loss_k, _, grads_k = _check_head(tensors, 0.04, weight, dloss, dtype)

    def plain(feat, v, g, teacher_feat, teacher_v, teacher_g, center, ts, tt, w):
        s = feat @ (g * v / v.norm(dim=1, keepdim=True)).t()
        t = teacher_feat @ (teacher_g * teacher_v / teacher_v.norm(dim=1, keepdim=True)).t()
        return _plain_lowp(s, t.detach(), center, ts, tt, w), None

    def fp64(feat, v, g, teacher_feat, teacher_v, teacher_g, center, ts, tt, w):
        s = feat @ (g * v / v.norm(dim=1, keepdim=True)).t()
        t = teacher_feat @ (teacher_g * teacher_v / teacher_v.norm(dim=1, keepdim=True)).t()
        p = torch.softmax((t - center) / tt, dim=-1)
        return -(p * torch.log_softmax(s / ts, dim=-1)).sum(-1) * w.double(), None

    loss_p, _, grads_p = _run_head(plain, tensors, 0.04, weight, dloss)
    loss_64, _, grads_64 = _run_head(fp64, [x.double() for x in tensors], 0.04, weight, dloss)
    assert _err(loss_k, loss_64) <= 2 * _err(loss_p, loss_64) + 1e-6
    for g_k, g_p, g_64 in zip(grads_k, grads_p, grads_64):
        assert _err(g_k, g_64) <= 2 * _err(g_p, g_64) + 1e-6
