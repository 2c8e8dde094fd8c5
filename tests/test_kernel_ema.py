"""`ema_` (Triton; under the interpreter on the CPU) and `foreach_ema_` against the
official loop `t.mul_(m).add_((1 - m) * s)` and the twin.

fp32: `ema_` computes the loop's expression with the loop's three roundings, so it is
bit-exact. 16-bit buffers: fp32 math and one rounding, bit-exact against the twin (on a
GPU; the Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest even,
so there bf16 is within one ulp) and within half a 16-bit ulp (plus fp32 noise) of the
exact result. `foreach_ema_` (lerp form) is within 4 eps32 (|t| + |s|) of the loop; with
a tensor momentum it uses the loop's form and is bit-exact.
"""
import pytest
import torch

import ibot_fast.kernels.ema as kernel_module
from ibot_fast.kernels.ema import ema_, foreach_ema_
from ibot_fast.reference import ema as reference

SIZES = [1, 4095, 4097, 12_345]  # around the fp32 block (4096), and a ragged tail
MOMENTA = [0.996, 0.9995, 0.5, 0.0, 1.0]
EPS32 = torch.finfo(torch.float32).eps


def _pair(n, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g).to(device, dtype),
            torch.randn(n, generator=g).to(device, dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("momentum", MOMENTA + ["tensor"])
def test_fp32_bit_exact_against_the_official_loop(n, momentum, device):
    if momentum == "tensor":
        momentum = torch.tensor(0.9961, device=device)
    teacher, student = _pair(n, torch.float32, n, device)
    loop, twin = teacher.clone(), teacher.clone()
    out = ema_(teacher, student, momentum)
    assert out is teacher
    reference.ema_loop_([loop], [student], momentum)
    reference.ema_(twin, student, momentum)
    torch.testing.assert_close(teacher, loop, rtol=0, atol=0)
    torch.testing.assert_close(teacher, twin, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [8191, 8193])  # around the 16-bit block (8192)
@pytest.mark.parametrize("momentum", [0.996, 0.5])
def test_16bit_rounds_once(dtype, n, momentum, device):
    teacher, student = _pair(n, dtype, n, device)
    exact = momentum * teacher.double() + (1 - momentum) * student.double()
    twin = teacher.clone()
    ema_(teacher, student, momentum)
    reference.ema_(twin, student, momentum)
    ulp = exact.abs().to(dtype).double() * torch.finfo(dtype).eps
    fp32_noise = 4 * EPS32 * (teacher.double().abs() + student.double().abs())
    if dtype == torch.bfloat16 and device.type == "cpu":  # the interpreter truncates
        assert ((teacher.double() - twin.double()).abs() <= ulp).all()
        assert ((teacher.double() - exact).abs() <= ulp + fp32_noise).all()
    else:
        torch.testing.assert_close(teacher, twin, rtol=0, atol=0)
        assert ((teacher.double() - exact).abs() <= ulp / 2 + fp32_noise).all()


def test_fp64_takes_the_twin_and_equals_the_loop(device):
    teacher, student = _pair(1000, torch.float64, 5, device)
    loop = teacher.clone()
    ema_(teacher, student, 0.996)
    reference.ema_loop_([loop], [student], 0.996)
    torch.testing.assert_close(teacher, loop, rtol=0, atol=0)


def test_every_element_is_written(device):
    teacher, student = _pair(10_000, torch.float32, 0, device)
    before = teacher.clone()
    ema_(teacher, student, 0.9)
    assert (teacher != before).all()


@pytest.mark.parametrize("momentum", [0.996, 0.5, "tensor"])
def test_foreach_against_the_loop(momentum, device):
    tensor_momentum = momentum == "tensor"
    if tensor_momentum:
        momentum = torch.tensor(0.9961, device=device)
    g = torch.Generator().manual_seed(0)
    shapes = [(384, 3, 16, 16), (1, 1, 384), (197, 384), (384,), (8192, 256), (8192, 1)]
    teacher = [torch.randn(s, generator=g).to(device) for s in shapes]
    student = [torch.randn(s, generator=g).to(device) for s in shapes]
    loop = [t.clone() for t in teacher]
    before = [t.clone() for t in teacher]
    foreach_ema_(teacher, student, momentum)
    reference.ema_loop_(loop, student, momentum)
    for a, b, t0, s in zip(teacher, loop, before, student):
        if tensor_momentum:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert ((a - b).abs() <= 4 * EPS32 * (t0.abs() + s.abs())).all()


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="the interpreter is chosen when Triton is imported (CPU-only check)")
def test_cpu_dispatch_kernel_under_interpreter_twin_otherwise(monkeypatch):
    teacher, student = _pair(100, torch.float32, 1, "cpu")
    expected = teacher.clone()
    reference.ema_loop_([expected], [student], 0.9)

    def no_twin(*args):
        raise AssertionError("the twin ran instead of the kernel")

    with monkeypatch.context() as patch:
        patch.setattr(kernel_module.reference, "ema_", no_twin)
        patch.setenv("TRITON_INTERPRET", "1")
        torch.testing.assert_close(ema_(teacher.clone(), student, 0.9), expected, rtol=0, atol=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU without the interpreter: the twin
    torch.testing.assert_close(ema_(teacher.clone(), student, 0.9), expected, rtol=0, atol=0)


def test_rejects_bad_buffers(device):
    t, student = _pair(8, torch.float32, 3, device)
    with pytest.raises(ValueError, match="1-D"):
        ema_(t.view(2, 4), student.view(2, 4), 0.9)
    with pytest.raises(ValueError, match="size or dtype"):
        ema_(t, _pair(9, torch.float32, 4, device)[0], 0.9)
    with pytest.raises(ValueError, match="size or dtype"):
        ema_(t, student.double(), 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        ema_(_pair(16, torch.float32, 5, device)[0][::2], student, 0.9)
    with pytest.raises(ValueError, match="teacher tensors"):
        foreach_ema_([t], [], 0.9)
