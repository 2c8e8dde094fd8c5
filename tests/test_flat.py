"""Flat parameter buffers: aliasing, gradients, checkpoints by name, optimizers, DDP."""
import copy
import io
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ibot_fast.flat import FlatParams, Slot, default_group, ema_flat_
from ibot_fast.reference.ema import ema_loop_


class WeightNormLinear(nn.Module):
    """The iBOT last layer: weight-normalised, no bias, `weight_g` [K, 1] frozen at 1."""

    def __init__(self, dim, k):
        super().__init__()
        self.weight_v = nn.Parameter(torch.randn(k, dim))
        self.weight_g = nn.Parameter(torch.ones(k, 1), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class TinyViT(nn.Module):
    """Every kind of parameter of the iBOT student, at toy size."""

    def __init__(self, dim=12, k=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 3 * dim)
        self.fc2 = nn.Linear(3 * dim, dim)
        self.head = nn.Linear(dim, 7)
        self.last_layer = WeightNormLinear(7, k)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1) + self.pos_embed
        t = t + self.fc2(F.gelu(self.fc1(self.norm1(t))))
        return self.last_layer(F.normalize(self.head(t[:, 0]), dim=-1))


def _images(seed, n=4):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_layout_groups_alignment_and_aliasing():
    torch.manual_seed(0)
    model = TinyViT()
    before = _state(model)
    names = [n for n, _ in model.named_parameters()]
    flat = FlatParams(model)

    assert [n for n, _ in model.named_parameters()] == names
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    groups = {s.name: s.group for s in flat.slots}
    assert groups["fc1.bias"] == groups["norm1.weight"] == "no_decay"
    assert groups["fc1.weight"] == groups["cls_token"] == groups["last_layer.weight_v"] == "decay"
    assert groups["last_layer.weight_g"] == "frozen"
    buffer = flat.data[torch.float32]
    for slot in flat.slots:
        assert slot.offset % 16 == 0  # 64 bytes
    segments = flat.segments
    assert segments[0].start == 0 and segments[-1].end == buffer.numel()
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
    used = torch.zeros(buffer.numel(), dtype=torch.bool)
    for slot in flat.slots:
        used[slot.offset:slot.offset + slot.numel] = True
    assert not buffer[~used].any(), "padding must be zero"
    flat.check()

    with torch.no_grad():  # the buffer *is* the parameters
        buffer.mul_(2)
    torch.testing.assert_close(model.fc1.weight, 2 * before["fc1.weight"], rtol=0, atol=0)


def test_forward_backward_fill_the_flat_grad_buffer():
    torch.manual_seed(0)
    plain = TinyViT()
    model = copy.deepcopy(plain)
    flat = FlatParams(model)
    x = _images(1)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    for step in range(2):  # the second backward accumulates, in place
        model(_images(step)).square().sum().backward()
        plain(_images(step)).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if not p.requires_grad:
            assert p.grad is None
            continue
        slot = next(s for s in flat.slots if s.name == name)
        in_buffer = flat.grad[torch.float32][slot.offset:slot.offset + slot.numel]
        torch.testing.assert_close(in_buffer.view(slot.shape), q.grad, rtol=0, atol=0)
    grad_norm = torch.linalg.vector_norm(flat.grad[torch.float32])
    expected = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(q.grad) for q in plain.parameters() if q.grad is not None]))
    torch.testing.assert_close(grad_norm, expected)

    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()  # set_to_none detaches...
    assert model.fc1.weight.grad is None
    flat.check()  # (a None grad is allowed: the official last-layer freezing does that)
    flat.zero_grad()  # ... and zero_grad re-attaches
    flat.check()
    assert not flat.grad[torch.float32].any()
    model(x).sum().backward()
    assert flat.grad[torch.float32].any()


def test_state_dict_round_trips_by_name():
    torch.manual_seed(0)
    source = TinyViT()
    flat_model = TinyViT()  # different random values
    flat = FlatParams(flat_model)
    saved = io.BytesIO()
    torch.save(source.state_dict(), saved)
    saved.seek(0)
    flat_model.load_state_dict(torch.load(saved))
    flat.check()
    for name, value in source.state_dict().items():
        torch.testing.assert_close(flat_model.state_dict()[name], value, rtol=0, atol=0)

    with torch.no_grad():
        flat.data[torch.float32].add_(1.0)
    saved = io.BytesIO()
    torch.save(flat_model.state_dict(), saved)
    saved.seek(0)
    back = TinyViT()
    back.load_state_dict(torch.load(saved))
    for name, value in back.state_dict().items():
        torch.testing.assert_close(value, flat_model.state_dict()[name], rtol=0, atol=0)


def test_check_detects_broken_aliasing():
    flat = FlatParams(TinyViT())
    flat.module.double()
    with pytest.raises(RuntimeError, match="no longer views"):
        flat.check()


def test_teacher_like_student_and_flat_ema_equal_the_loop():
    torch.manual_seed(0)
    student, teacher = TinyViT(), TinyViT()
    for p in teacher.parameters():
        p.requires_grad = False
    loop_teacher = copy.deepcopy(teacher)
    s_flat = FlatParams(student)
    t_flat = FlatParams(teacher, like=s_flat, grads=False)
    assert t_flat.same_layout(s_flat) and t_flat.grad is None
    for m in (0.996, 0.5, torch.tensor(0.9)):
        ema_flat_(t_flat, s_flat, m)  # Triton under the interpreter on the CPU
        ema_loop_(loop_teacher.parameters(), student.parameters(), m)
        for a, b in zip(teacher.parameters(), loop_teacher.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    with pytest.raises(ValueError, match="does not match"):
        FlatParams(nn.Linear(3, 4), like=s_flat)
    other = FlatParams(TinyViT(), group_fn=lambda name, p: "all")
    with pytest.raises(ValueError, match="different layouts"):
        ema_flat_(other, s_flat, 0.9)


def test_mixed_dtypes_get_one_buffer_each():
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2).to(torch.bfloat16))
    flat = FlatParams(model, grads=False)
    assert set(flat.data) == {torch.float32, torch.bfloat16}
    assert flat.data[torch.bfloat16].numel() % 32 == 0
    assert {(s.dtype, s.group) for s in flat.segments} == {
        (torch.float32, "decay"), (torch.float32, "no_decay"),
        (torch.bfloat16, "decay"), (torch.bfloat16, "no_decay")}
    assert isinstance(flat.slots[0], Slot)


def _groups_like(model, flat, weight_decay):
    """The flat model's param groups, with the same parameters of an ordinary model."""
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in g["names"]],
             "weight_decay": weight_decay if g["group"] == "decay" else 0.0}
            for g in flat.param_groups()]


def _optimizer(kind, groups):
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999))


def _train_both(kind, rank=0, ddp=False, steps=3):
    """Train an ordinary and a flattened copy of one model side by side; return both."""
    torch.manual_seed(0)
    plain = TinyViT()
    model = copy.deepcopy(plain)
    flat = FlatParams(model)
    opt_flat = _optimizer(kind, _groups_like(model, flat, 0.04))
    opt_plain = _optimizer(kind, _groups_like(plain, flat, 0.04))
    run_flat = nn.parallel.DistributedDataParallel(model) if ddp else model
    run_plain = nn.parallel.DistributedDataParallel(plain) if ddp else plain
    for step in range(steps):
        x = _images(100 * step + rank)  # each rank its own data
        flat.zero_grad()
        run_flat(x).square().mean().backward()
        opt_flat.step()
        opt_plain.zero_grad()
        run_plain(x).square().mean().backward()
        opt_plain.step()
    flat.check()
    return plain, model, flat


def _assert_trained_equal(plain, model, flat):
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.last_layer.weight_g, torch.ones(10, 1), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_steps_equal_an_ordinary_model(kind):
    _assert_trained_equal(*_train_both(kind))


def _ddp_worker(rank, world_size, init_file):
    passed = False
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        for kind in ("sgd", "adamw"):
            plain, model, flat = _train_both(kind, rank=rank, ddp=True)
            _assert_trained_equal(plain, model, flat)
            gathered = [torch.empty_like(flat.data[torch.float32]) for _ in range(world_size)]
            dist.all_gather(gathered, flat.data[torch.float32])
            torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)
        # both ranks get here before either tears gloo down: a rank that exits while its
        # peer still talks to it aborts in gloo's threads (SIGABRT, about 1 run in 3)
        dist.barrier()
        passed = True
    finally:
        dist.destroy_process_group()
    if passed:
        # Nothing is left to do, and the interpreter's own exit can still abort in a gloo
        # thread's C++ teardown ("terminate called without an active exception"): leave
        # without it, exit code 0 as spawn expects.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def test_ddp_two_cpu_processes(tmp_path):
    """Flattened and ordinary models under DDP (gloo, 2 processes, different data per
    rank) stay equal through SGD and AdamW steps; ranks stay in sync."""
    init_file = tmp_path / "rendezvous"
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(_ddp_worker, args=(2, str(init_file)), nprocs=2, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_default_group_rule():
    assert default_group("blocks.0.attn.qkv.bias", torch.zeros(3, requires_grad=True)) == "no_decay"
    assert default_group("norm.weight", torch.zeros(3, requires_grad=True)) == "no_decay"
    assert default_group("pos_embed", torch.zeros(1, 2, 3, requires_grad=True)) == "decay"
    assert default_group("last_layer.weight_g", torch.zeros(3, 1)) == "frozen"
