"""End to end: a few training steps of the fast path (Triton kernels under the interpreter,
flat buffers, fused optimizer) against the reference path; checkpoints across paths."""
import pytest
import torch

from tests.test_train import tiny_config
from ibot_fast.train import Trainer

# no stochastic depth: packing draws its masks in another order than two passes
STEPS = ["train.stop_at_iter=4", "optim.lr=0.01", "optim.freeze_last_layer=0",
         "model.drop_path_rate=0"]


def run(path, impl, *extra, resume=None):
    trainer = Trainer(tiny_config(path, *STEPS, *extra, impl=impl), resume)
    trainer.run()
    trainer.loss.finish_center_update()
    return trainer


def assert_same_training(a, b, atol=5e-6):
    for name, x in a.student_module.state_dict().items():
        torch.testing.assert_close(b.student_module.state_dict()[name], x, rtol=0, atol=atol,
                                   msg=f"student {name}")
    for name, x in a.teacher.state_dict().items():
        torch.testing.assert_close(b.teacher.state_dict()[name], x, rtol=0, atol=atol,
                                   msg=f"teacher {name}")
    torch.testing.assert_close(b.loss.center, a.loss.center, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.loss.center2, a.loss.center2, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref"), "reference")


@pytest.mark.parametrize("options", [
    (),
    ("optim.fuse_ema=true", "loss.fused_last_layer=true", "model.pack_crops=true"),
])
def test_fast_steps_match_reference(tmp_path, reference, options):
    fast = run(tmp_path, "fast", *options)
    moved = max((p - q).abs().max().item() for p, q in zip(
        fast.student_module.state_dict().values(),
        Trainer(tiny_config(tmp_path / "init")).student_module.state_dict().values()))
    assert moved > 1e-4  # four steps at this lr move the weights far past the tolerance
    assert_same_training(reference, fast)


@pytest.mark.parametrize("first,second", [("reference", "fast"), ("fast", "reference")])
def test_checkpoints_cross_paths(tmp_path, reference, first, second):
    """2 steps on one path, checkpoint, 2 steps on the other: the same as 4 on one."""
    fused = ("optim.fuse_ema=true",)
    run(tmp_path, first, "train.stop_at_iter=2", *(fused if first == "fast" else ()))
    resumed = run(tmp_path, second, *(fused if second == "fast" else ()), resume="auto")
    assert resumed.iteration == 4
    assert_same_training(reference, resumed)
