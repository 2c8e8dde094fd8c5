"""End to end: a few training steps of the fast path (Triton kernels under the interpreter,
flat buffers, fused optimizer) against the reference path; checkpoints across paths. These
run on the CPU in fp32 also where a GPU is present; the GPU-marked test at the end checks
one step's loss and gradients on the GPU, where the kernels are compiled."""
import pytest
import torch

from tests.test_train import tiny_config
from ibot_fast.train import Trainer

# no stochastic depth: packing draws its masks in another order than two passes
STEPS = ["train.stop_at_iter=4", "optim.lr=0.01", "optim.freeze_last_layer=0",
         "model.drop_path_rate=0", "train.device=cpu"]


def run(path, impl, *extra, resume=None):
    trainer = Trainer(tiny_config(path, *STEPS, *extra, impl=impl), resume)
    trainer.run()
    trainer.loss.finish_center_update()
    return trainer


def split_key_bias(name, x):
    """(x without the attention's key bias, the key bias). The key bias has no true
    gradient (it adds one constant to every score of a query, which the softmax cancels):
    its gradient is rounding noise (~1e-10), which Adam scales up to steps of up to
    lr x g / (g + eps), so the two paths move it apart by ~1e-5 after 4 steps with the
    official per-tensor clipping (global clipping shrank the noise below eps)."""
    if not name.endswith("attn.qkv.bias"):
        return x, x[:0]
    q, k, v = x.chunk(3)
    return torch.cat([q, v]), k


def assert_same_training(a, b, atol=5e-6):
    for part, net_a, net_b in (("student", a.student_module, b.student_module),
                               ("teacher", a.teacher, b.teacher)):
        for name, x in net_a.state_dict().items():
            (rest_a, key_a), (rest_b, key_b) = (split_key_bias(name, t) for t in
                                                (x, net_b.state_dict()[name]))
            torch.testing.assert_close(rest_b, rest_a, rtol=0, atol=atol,
                                       msg=f"{part} {name}")
            torch.testing.assert_close(key_b, key_a, rtol=0, atol=1e-3,
                                       msg=f"{part} {name} (key bias)")
    torch.testing.assert_close(b.loss.center, a.loss.center, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.loss.center2, a.loss.center2, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref"), "reference")


@pytest.mark.parametrize("options", [
    (),
    ("optim.fuse_ema=true", "loss.fused_last_layer=true", "model.pack_crops=true",
     "model.activation_checkpointing=selective"),
])
def test_fast_steps_match_reference(tmp_path, reference, options):
    fast = run(tmp_path, "fast", *options)
    moved = max((p - q).abs().max().item() for p, q in zip(
        fast.student_module.state_dict().values(),
        Trainer(tiny_config(tmp_path / "init", "train.device=cpu")).student_module
        .state_dict().values()))
    assert moved > 1e-4  # four steps at this lr move the weights far past the tolerance
    assert_same_training(reference, fast)


@pytest.mark.parametrize("first,second", [("reference", "fast"), ("fast", "reference")])
def test_checkpoints_cross_paths(tmp_path, reference, first, second):
    """2 steps on one path, checkpoint, 2 steps on the other: the same as 4 on one."""
    fused = ("optim.fuse_ema=true", "model.activation_checkpointing=full")
    run(tmp_path, first, "train.stop_at_iter=2", *(fused if first == "fast" else ()))
    resumed = run(tmp_path, second, *(fused if second == "fast" else ()), resume="auto")
    assert resumed.iteration == 4
    assert_same_training(reference, resumed)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [(), ("loss.fused_last_layer=true", "optim.fuse_ema=true")])
def test_fast_gradients_match_reference_gpu(tmp_path, options):
    """One step on the GPU in fp32, fast path (compiled Triton kernels, flat buffers)
    against the reference: the loss, and every student gradient within 0.5% (the fused
    last layer's tl.dot runs in tf32). Parameters after several AdamW steps are not
    compared here: Adam turns tiny gradient differences into full-size steps."""
    results = {}
    for impl in ("reference", "fast"):
        trainer = Trainer(tiny_config(
            tmp_path / impl, "train.device=cuda", "train.precision=fp32", "optim.lr=0.01",
            "optim.freeze_last_layer=0", "model.drop_path_rate=0",
            "optim.clip_grad=0",  # the fused AdamW+EMA step scales inside the kernel
            *(options if impl == "fast" else ()), impl=impl))
        trainer.loader.set_epoch(0)
        batch = next(iter(trainer.loader))
        losses = trainer.train_step(batch, 0, 0)  # warm-up's first iteration: lr 0
        grads = {n: None if p.grad is None else p.grad.detach().double().cpu()
                 for n, p in trainer.student_module.named_parameters()}
        results[impl] = float(losses["loss"].detach()), grads
    (loss_r, grads_r), (loss_f, grads_f) = results["reference"], results["fast"]
    assert loss_f == pytest.approx(loss_r, rel=1e-4)
    assert grads_r.keys() == grads_f.keys()
    for name, g_r in grads_r.items():
        g_f = grads_f[name]
        assert (g_r is None) == (g_f is None), name
        if g_r is not None:
            assert (g_f - g_r).norm() <= 5e-3 * g_r.norm() + 1e-9, name
