"""`adamw_ema_` (Triton, under the interpreter on the CPU) against its twin (bit for bit)
and against `torch.optim.AdamW(foreach=False)` followed by the official EMA loop
(parameter by parameter, every moment and step count), over several steps with changing
lr / weight decay / momentum, a weight-decay and a no-decay group, a frozen last layer,
a gradient scale and an overflow step.
"""
import copy
import math

import pytest
import torch
from torch import nn

from ibot_fast.flat import FlatParams, default_group
from ibot_fast.kernels.adamw_ema import adamw_ema_
from ibot_fast.reference import adamw_ema as reference
from ibot_fast.reference.ema import ema_loop_

# Against torch's AdamW (another rounding order: lerp, addcdiv, a double step size, a
# vectorised CPU sqrt) after several steps, |diff| <= 4 eps32 (|x| + scale): a few ulps of
# the value, or of an update (scale = 0.01 ~ lr for parameters and teacher) or of a
# gradient (scale = 1 for the moments, gradients ~ N(0, 1)). Measured after 18 steps:
# parameters 1.4 eps32 (|p| + 0.01), moments 0.3 eps32 (|m| + 1).
EPS32 = torch.finfo(torch.float32).eps
RTOL, ATOL, ATOL_MOMENTS = 4 * EPS32, 4 * EPS32 * 0.01, 4 * EPS32


class Student(nn.Module):
    """Odd sizes; biases and a norm (no decay); a last layer that gets frozen."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(13, 37)
        self.norm = nn.LayerNorm(37)
        self.proj = nn.Linear(37, 29)
        self.last_layer = nn.Linear(29, 11, bias=False)


def _group(name, p):
    return "last_layer" if name.startswith("last_layer") else default_group(name, p)


HPARAMS = [  # (lr, weight_decay, momentum, grad_scale, found_inf, last layer frozen)
    (1e-3, 0.04, 0.996, None, None, True),
    (2e-3, 0.05, 0.9965, 0.5, 0.0, True),
    (3e-3, 0.07, 0.997, None, None, False),
    (2.5e-3, 0.1, 0.998, 0.25, 1.0, False),  # overflow: AdamW skipped, EMA runs
    (2e-3, 0.2, 0.999, 2.0, 0.0, False),
    (1e-3, 0.4, 0.9995, None, None, False),
]


def _torch_step(opt, model, teacher, grads, lr, wd, momentum, scale, found_inf, frozen):
    """The official path: grads set, clip-style scale, last-layer grads dropped, AdamW,
    then the EMA loop. An overflow step skips `opt.step()` (GradScaler semantics)."""
    for (name, p), g in zip(model.named_parameters(), grads):
        p.grad = None if frozen and name.startswith("last_layer") else g.clone()
        if p.grad is not None and scale is not None:
            p.grad.mul_(scale)
    for group in opt.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd if group["name"] != "no_decay" else 0.0
    if not found_inf:
        opt.step()
    ema_loop_(teacher.parameters(), model.parameters(), momentum)


class FusedSide:
    """The fast path: flat student / teacher / moments, one adamw_ema_ call per segment."""

    def __init__(self, model, teacher, impl):
        self.model, self.teacher = model, teacher
        self.flat = FlatParams(model, _group)
        self.teacher_flat = FlatParams(teacher, like=self.flat, grads=False)
        self.exp_avg, self.exp_avg_sq = self.flat.zeros_like(), self.flat.zeros_like()
        self.device = self.flat.data[torch.float32].device
        self.steps = {seg.group: torch.zeros((), device=self.device)
                      for seg in self.flat.segments}
        self.impl = impl

    def step(self, grads, lr, wd, momentum, scale, found_inf, frozen):
        for p, g in zip(self.model.parameters(), grads):
            p.grad.copy_(g)
        scale = None if scale is None else torch.tensor(scale, device=self.device)
        found_inf = None if found_inf is None else torch.tensor(found_inf, device=self.device)
        for seg in self.flat.segments:
            self.impl(seg.of(self.flat.data), seg.of(self.flat.grad), seg.of(self.exp_avg),
                      seg.of(self.exp_avg_sq), seg.of(self.teacher_flat.data),
                      self.steps[seg.group], lr=lr,
                      weight_decay=wd if seg.group != "no_decay" else 0.0, momentum=momentum,
                      grad_scale=scale, found_inf=found_inf,
                      frozen=seg.group == "last_layer" and frozen)

    def moment(self, buffers, name):
        slot = next(s for s in self.flat.slots if s.name == name)
        return buffers[slot.dtype][slot.offset:slot.offset + slot.numel].view(slot.shape)


def _build(device):
    torch.manual_seed(0)
    model = Student().to(device)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
            p.requires_grad = False
    return model, teacher


def test_matches_torch_adamw_and_twin_over_steps(device):
    model, teacher = _build(device)
    ref_model, ref_teacher = copy.deepcopy(model), copy.deepcopy(teacher)
    groups = {}
    for name, p in ref_model.named_parameters():
        groups.setdefault("no_decay" if _group(name, p) == "no_decay" else "decay", []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "name": k} for k, ps in groups.items()],
                            lr=0.0, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    kernel = FusedSide(model, teacher, adamw_ema_)
    twin = FusedSide(copy.deepcopy(model), copy.deepcopy(teacher), reference.adamw_ema_)
    padding = ~torch.zeros_like(kernel.flat.data[torch.float32], dtype=torch.bool)
    for s in kernel.flat.slots:
        padding[s.offset:s.offset + s.numel] = False

    g = torch.Generator().manual_seed(1)
    for step, hp in enumerate(HPARAMS):
        grads = [torch.randn(p.shape, generator=g).to(device) for p in model.parameters()]
        if hp[4]:  # the overflow step's gradients hold an inf
            grads[0][0, 0] = float("inf")
        _torch_step(opt, ref_model, ref_teacher, grads, *hp)
        kernel.step(grads, *hp)
        twin.step(grads, *hp)

        for a, b in ((kernel.flat.data, twin.flat.data), (kernel.exp_avg, twin.exp_avg),
                     (kernel.exp_avg_sq, twin.exp_avg_sq),
                     (kernel.teacher_flat.data, twin.teacher_flat.data)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"kernel != twin, step {step}")
        assert {k: v.item() for k, v in kernel.steps.items()} == \
            {k: v.item() for k, v in twin.steps.items()}
        assert not kernel.flat.data[torch.float32][padding].any(), "padding must stay zero"

        for (name, p), q, t, tq in zip(model.named_parameters(), ref_model.parameters(),
                                       teacher.parameters(), ref_teacher.parameters()):
            msg = f"{name}, step {step}"
            torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=msg)
            torch.testing.assert_close(t, tq, rtol=RTOL, atol=ATOL, msg=msg)
            state = opt.state[q]
            group = _group(name, p)
            if not state:  # never updated yet (frozen last layer)
                assert kernel.steps[group] == 0
                assert not kernel.moment(kernel.exp_avg, name).any()
                continue
            assert kernel.steps[group].item() == state["step"].item(), msg
            torch.testing.assert_close(kernel.moment(kernel.exp_avg, name), state["exp_avg"],
                                       rtol=RTOL, atol=ATOL_MOMENTS, msg=msg)
            torch.testing.assert_close(kernel.moment(kernel.exp_avg_sq, name),
                                       state["exp_avg_sq"], rtol=RTOL, atol=ATOL_MOMENTS, msg=msg)
    assert {k: v.item() for k, v in kernel.steps.items()} == \
        {"decay": 5, "no_decay": 5, "last_layer": 3}


BETAS = (0.8, 0.99)
TABLE_ROWS = len(reference.bias_correction_table(*BETAS, torch.device("cpu")))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2047, 5000])
@pytest.mark.parametrize("device_momentum", [False, True])
@pytest.mark.parametrize("step_count", [0, 41, TABLE_ROWS - 2, TABLE_ROWS - 1, 10**6])
def test_segment_equals_twin(n, grad_dtype, device_momentum, step_count, device):
    """Steps done so far: 0 (the first update, row 1 of the bias-correction table), 41,
    the table's last two rows (the update k = step + 1 reads its last row, then clamps to
    it) and far past the table (10**6: clamped to the last row)."""
    g = torch.Generator().manual_seed(n)
    param, exp_avg, teacher = (torch.randn(n, generator=g).to(device) for _ in range(3))
    exp_avg_sq = torch.rand(n, generator=g).to(device)
    grad = torch.randn(n, generator=g).to(device, grad_dtype)
    momentum = torch.tensor(0.9961, device=device) if device_momentum else 0.9961
    kwargs = dict(lr=3e-3, weight_decay=0.1, momentum=momentum, beta1=BETAS[0],
                  beta2=BETAS[1], eps=1e-6, grad_scale=torch.tensor(0.7, device=device))
    outs = []
    for impl in (adamw_ema_, reference.adamw_ema_):
        state = [t.clone() for t in (param, exp_avg, exp_avg_sq, teacher)]
        step = torch.tensor(step_count, dtype=torch.int32, device=device)
        impl(state[0], grad, state[1], state[2], state[3], step, **kwargs)
        outs.append((state, step))
    (k_state, k_step), (r_state, r_step) = outs
    for a, b, before in zip(k_state, r_state, (param, exp_avg, exp_avg_sq, teacher)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (a != before).all(), "every element must be written"
    assert k_step.item() == r_step.item() == step_count + 1


def test_found_inf_skips_adamw_but_not_the_ema(device):
    g = torch.Generator().manual_seed(0)
    param, exp_avg, exp_avg_sq, teacher = (torch.rand(300, generator=g).to(device)
                                           for _ in range(4))
    grad = torch.full((300,), float("inf"), device=device)
    before = [t.clone() for t in (param, exp_avg, exp_avg_sq)]
    expected = teacher.clone()
    ema_loop_([expected], [param], 0.99)
    step = torch.tensor(3.0, device=device)
    adamw_ema_(param, grad, exp_avg, exp_avg_sq, teacher, step, lr=1.0, weight_decay=0.5,
               momentum=0.99, found_inf=torch.tensor(1.0, device=device))
    for a, b in zip((param, exp_avg, exp_avg_sq), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert step.item() == 3.0
    torch.testing.assert_close(teacher, expected, rtol=0, atol=0)


def test_bias_correction_table():
    table = reference.bias_correction_table(0.9, 0.999, torch.device("cpu"))
    for k in (1, 2, 10, 1000, len(table) - 1):
        assert table[k, 0].item() == pytest.approx(1 - 0.9 ** k, rel=1e-7)
        assert table[k, 1].item() == pytest.approx(math.sqrt(1 - 0.999 ** k), rel=1e-7)
    assert table[-1].tolist() == [1.0, 1.0]  # every later step: exactly the last row
    assert torch.tensor(1 - 0.999 ** (10 * len(table)), dtype=torch.float32).item() == 1.0


def test_rejects_bad_arguments(device):
    x = torch.randn(8, generator=torch.Generator().manual_seed(0)).to(device)
    with pytest.raises(ValueError, match="float32"):
        adamw_ema_(x.double(), x, x, x, x, torch.tensor(0, device=device), lr=1e-3,
                   weight_decay=0.0, momentum=0.9)
    with pytest.raises(ValueError, match="0-d"):
        adamw_ema_(x, x, x.clone(), x.clone(), x.clone(), torch.tensor([3], device=device),
                   lr=1e-3, weight_decay=0.0, momentum=0.9)
