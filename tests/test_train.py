"""The training loop: EMA, frozen last layer, resume, non-finite steps, pre-emption."""
import os
import signal
import sys

import pytest
import torch

from ibot_fast import UserError, checkpoint
from ibot_fast.config import build_config
from ibot_fast.data.cpu import EpochBatchSampler
from ibot_fast.data.datasets import build_dataset
from ibot_fast.train import Trainer, TrainingDiverged, main


def tiny_config(tmp_path, *extra, impl="reference"):
    """A small model on 24 synthetic images: 3 iterations per epoch at batch 8."""
    return build_config("demo", [
        "data.source=synthetic", "data.synthetic_size=24", "data.num_workers=0",
        "data.n_local=2", "train.batch_size=8", "train.epochs=3", "train.log_every=1",
        "model.out_dim=128", "model.patch_out_dim=128", "model.head_hidden_dim=64",
        "model.head_bottleneck_dim=32", "optim.warmup_epochs=1", f"train.impl={impl}",
        f"train.output_dir={tmp_path}", *extra])


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_one_step_moves_teacher_by_ema(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "optim.freeze_last_layer=0"))
    teacher_before = params(trainer.teacher)
    trainer.loader.set_epoch(0)
    batch = next(iter(trainer.loader))
    trainer.train_step(batch, 0, 0)
    # first iteration of warm-up has lr 0: take the second one
    trainer.train_step(batch, 1, 0)
    teacher_mid = params(trainer.teacher)
    student_before = params(trainer.student_module)
    trainer.train_step(batch, 2, 0)
    m = trainer.sched.momentum[2]
    student_after = params(trainer.student_module)
    moved = 0
    for name, t_after in params(trainer.teacher).items():
        expected = teacher_mid[name] + (1 - m) * (student_after[name] - teacher_mid[name])
        torch.testing.assert_close(t_after, expected, rtol=0, atol=1e-6)
        moved += int(not torch.equal(student_after[name], student_before[name]))
    assert moved > 10
    assert any(not torch.equal(teacher_before[n], p) for n, p in params(trainer.teacher).items())


def test_last_layer_frozen_during_first_epoch(tmp_path):
    cfg = tiny_config(tmp_path, "optim.freeze_last_layer=1", "train.stop_at_iter=5")
    trainer = Trainer(cfg)
    before = params(trainer.student_module)
    trainer.loader.set_epoch(0)
    for it, batch in enumerate(trainer.loader):
        trainer.train_step(batch, it, 0)
    after = params(trainer.student_module)
    for name in before:
        if "last_layer" in name:
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["head.mlp.0.weight"], after["head.mlp.0.weight"])
    # in epoch 1 the last layer trains
    for it, batch in enumerate(trainer.loader):
        trainer.train_step(batch, 3 + it, 1)
    assert not torch.equal(before["head.last_layer.weight_v"],
                           trainer.student_module.head.last_layer.weight_v)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_global_clipping_counts_the_frozen_last_layer(tmp_path, impl):
    """The official order: clip, then drop the frozen last layer's gradients, so a global
    norm (and the logged grad_norm) includes them."""
    trainer = Trainer(tiny_config(tmp_path, "optim.clip_mode=global", "optim.clip_grad=1e-4",
                                  "optim.freeze_last_layer=1", impl=impl))
    seen = {}
    clip_ = trainer.params.clip_

    def spy(*args):  # the gradients before clipping
        seen["norm"] = torch.linalg.vector_norm(torch.stack(
            [p.grad.float().norm() for p in trainer.params.trainable if p.grad is not None]))
        seen["last_layer"] = [p.grad.float().norm() for p in trainer.params.last_layer]
        return clip_(*args)

    trainer.params.clip_ = spy
    before = params(trainer.student_module)
    trainer.loader.set_epoch(0)
    trainer.train_step(next(iter(trainer.loader)), 1, 0)
    without = (seen["norm"] ** 2 - sum(n ** 2 for n in seen["last_layer"])).sqrt()
    assert seen["norm"] - without > 2e-5 * seen["norm"]  # the check below can tell them apart
    torch.testing.assert_close(trainer.grad_norm, seen["norm"], rtol=1e-5, atol=0)
    after = params(trainer.student_module)
    for name in before:
        assert torch.equal(before[name], after[name]) == ("last_layer" in name), name


def run(cfg, resume=None):
    trainer = Trainer(cfg, resume)
    result = trainer.run()
    return trainer, result


@pytest.mark.parametrize("impl", ["reference"])
def test_resume_is_bit_exact(tmp_path, impl):
    straight, _ = run(tiny_config(tmp_path / "a", "train.stop_at_iter=5", impl=impl))
    run(tiny_config(tmp_path / "b", "train.stop_at_iter=2", impl=impl))
    resumed, result = run(tiny_config(tmp_path / "b", "train.stop_at_iter=5", impl=impl),
                          resume="auto")
    assert result["iteration"] == 5 and resumed.epoch == 1
    for a, b in ((straight.student_module, resumed.student_module),
                 (straight.teacher, resumed.teacher)):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), name
    assert torch.equal(straight.loss.center, resumed.loss.center)
    assert torch.equal(straight.loss.center2, resumed.loss.center2)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])


def test_checkpoint_contents_and_config(tmp_path):
    trainer, result = run(tiny_config(tmp_path, "train.stop_at_iter=2"))
    assert result["status"] == "stopped"
    ckpt = checkpoint.load(tmp_path / "checkpoint.pth")
    for key in ("student", "teacher", "optimizer", "loss", "scaler", "epoch", "iteration",
                "config", "rng", "counters"):
        assert key in ckpt
    assert ckpt["iteration"] == 2 and "center" in ckpt["loss"]
    assert (tmp_path / "config.json").exists() and (tmp_path / "log.jsonl").exists()
    assert not list(tmp_path.glob(".*.tmp*"))  # the atomic write left no temporary file
    # memory-mapped loading (multi-GPU resumes) reads the same; a file in torch's old
    # (non-zip) format, which cannot be mapped, still loads
    mapped = checkpoint.load(tmp_path / "checkpoint.pth", mmap=True)
    for key, value in ckpt["student"].items():
        assert torch.equal(mapped["student"][key], value)
    torch.save(ckpt, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    old = checkpoint.load(tmp_path / "old.pth", mmap=True)
    assert old["iteration"] == 2 and torch.equal(old["loss"]["center"], ckpt["loss"]["center"])


def test_resume_other_architecture_is_one_line_error(tmp_path):
    run(tiny_config(tmp_path, "train.stop_at_iter=1"))
    with pytest.raises(UserError, match="another model: model.out_dim=128"):
        Trainer(tiny_config(tmp_path, "model.out_dim=256", "model.patch_out_dim=256"),
                resume="auto")
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(tiny_config(tmp_path / "nothing"), resume="auto")


@pytest.mark.parametrize("new_batch, batch_in_epoch", [(4, 2), (12, 0), (8, 1)])
def test_a_resume_at_another_global_batch_goes_on_from_the_epoch(tmp_path, caplog, new_batch,
                                                                 batch_in_epoch):
    """Stopped at epoch 1 after one batch of 8 (image 8 of the epoch's order), resumed
    at another global batch (as on another number of GPUs): the epoch counts, the
    iteration is recomputed with the new epoch length, the lr follows the new batch, the
    run finishes its schedules exactly (at 12 the old iteration 4 would run past the
    6-step schedule), and the first new step starts where the image order stopped."""
    run(tiny_config(tmp_path, "train.stop_at_iter=4"))  # 3 batches of 8 per epoch
    assert checkpoint.load(tmp_path / "checkpoint.pth")["global_batch"] == 8
    trainer = Trainer(tiny_config(tmp_path, f"train.batch_size={new_batch}"), resume="auto")
    per_epoch = 24 // new_batch
    assert (trainer.epoch, trainer.batch_in_epoch) == (1, batch_in_epoch)
    assert trainer.iteration == per_epoch + batch_in_epoch
    assert trainer.derived["lr"] == pytest.approx(trainer.cfg.optim.lr * new_batch / 256)
    seen, real_step = [], trainer.train_step

    def step(batch, it, epoch):
        out = real_step(batch, it, epoch)  # which sets the step's lr
        seen.append((it, trainer.optimizer.param_groups[0]["lr"], batch["labels"].tolist()))
        return out

    trainer.train_step = step
    try:
        result = trainer.run()
    finally:
        trainer.close()
    assert result["status"] == "finished" and result["iteration"] == 3 * per_epoch
    assert [it for it, _, _ in seen] == list(range(per_epoch + batch_in_epoch, 3 * per_epoch))
    assert seen[-1][1] == pytest.approx(float(trainer.sched.lr[3 * per_epoch - 1]))
    # the epoch's order, as the sampler deals it: the resumed batch's images are next
    sampler = EpochBatchSampler(24, new_batch, seed=trainer.cfg.train.seed)
    sampler.set_epoch(1, batch_in_epoch)
    targets = build_dataset(trainer.cfg).targets  # synthetic: i % 10
    first = [int(targets[i]) for i, _ in next(iter(sampler))]
    assert seen[0][2] == first
    said = [r.getMessage() for r in caplog.records if "another global batch" in r.getMessage()]
    assert len(said) == (new_batch != 8)


def test_an_older_checkpoint_or_a_larger_batch_at_the_epochs_end(tmp_path):
    """A checkpoint without its global batch (as older versions wrote) has it from its config
    and RNG states; a position rounded down to the epoch's end stops at its last batch,
    so the epoch's end (checkpoint, k-NN) still runs, even on the last epoch."""
    run(tiny_config(tmp_path, "train.stop_at_iter=8"))  # epoch 2 (the last), batch 2 of 3
    ckpt = checkpoint.load(tmp_path / "checkpoint.pth")
    del ckpt["global_batch"]
    checkpoint.save(tmp_path / "checkpoint.pth", ckpt)
    other = Trainer(tiny_config(tmp_path, "train.batch_size=4"), resume="auto")
    other.close()
    assert (other.epoch, other.batch_in_epoch, other.iteration) == (2, 4, 16)  # image 16
    larger = Trainer(tiny_config(tmp_path, "train.batch_size=16"), resume="auto")
    assert (larger.epoch, larger.batch_in_epoch, larger.iteration) == (2, 0, 2)  # of 1
    saved = []
    larger.save = lambda also=None, real=larger.save: (saved.append(larger.iteration),
                                                        real(also))
    try:
        result = larger.run()
    finally:
        larger.close()
    assert result["status"] == "finished" and saved == [3]
    assert checkpoint.load(tmp_path / "checkpoint.pth")["epoch"] == 3


def test_non_finite_loss_is_skipped_then_aborts(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_nonfinite=3", impl="fast")
    trainer = Trainer(cfg)
    calls = {"n": 0}

    def poisoned(real):
        def loss(*args, **kwargs):
            out = real(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] >= 2:  # from the second step on, the loss is NaN
                out = {k: v * float("nan") for k, v in out.items()}
            return out
        return loss

    # the fast path's masked-token loss, the full-token one too should the config change
    for name in ("forward", "forward_masked"):
        monkeypatch.setattr(trainer.loss, name, poisoned(getattr(trainer.loss, name)))
    trainer.loader.set_epoch(0)
    batches = list(trainer.loader)
    trainer.train_step(batches[0], 1, 1)
    before = params(trainer.student_module)
    trainer.train_step(batches[1], 2, 1)
    assert calls["n"] == 2
    assert all(torch.equal(before[n], p) for n, p in params(trainer.student_module).items())
    assert int(trainer.nonfinite_total) == 1
    with pytest.raises(TrainingDiverged, match="non-finite losses in a row"):
        trainer.run()
    assert (tmp_path / "checkpoint.pth").exists()


def official_clip_(params, clip):
    """The official iBOT/DINO `clip_gradients`, as written there: each tensor alone."""
    for p in params:
        if p.grad is not None:
            norm = p.grad.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


@pytest.mark.parametrize("impl, fused", [("reference", False), ("fast", False),
                                         ("fast", True)])
def test_clipping_is_the_official_per_tensor_rule_by_default(tmp_path, impl, fused):
    """Default optim.clip_mode=per_param clips each gradient tensor to the max norm on its
    own, as the official code does (on the fast path's flat buffers too, and with the
    fused AdamW + EMA step, which then gets no scale of its own); `global` scales all of
    them by one coefficient, as torch's clip_grad_norm_ does."""
    trainer = Trainer(tiny_config(tmp_path, "optim.clip_grad=0.01",
                                  f"optim.fuse_ema={str(fused).lower()}", impl=impl))
    assert trainer.cfg.optim.clip_mode == "per_param"
    torch.manual_seed(0)
    params = trainer.params
    for p in params.trainable:  # some above the max norm, some not; written into
        g = torch.randn_like(p) * torch.rand(()) * 0.02  # the flat buffers' views if any
        p.grad = g if p.grad is None else p.grad.copy_(g)
    grads = [p.grad.clone() for p in params.trainable]
    expected = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for e, g in zip(expected, grads):
        e.grad = g.clone()
    official_clip_(expected, 0.01)
    norm = params.clip_(trainer.scaler, 0.01, "per_param")
    for p, e in zip(params.trainable, expected):
        torch.testing.assert_close(p.grad, e.grad)
    assert sum(not torch.equal(g, e.grad) for g, e in zip(grads, expected)) > 10
    if fused:
        assert params.grad_scale is None  # already applied to the gradients
    torch.testing.assert_close(norm, torch.linalg.vector_norm(
        torch.stack([g.norm() for g in grads])))

    for p, g in zip(params.trainable, grads):
        p.grad.copy_(g)
    for e, g in zip(expected, grads):
        e.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(expected, 0.01)
    params.clip_(trainer.scaler, 0.01, "global")
    if fused:  # the kernel applies the scale inside its pass: check the scale it gets
        scaled = [p.grad * params.grad_scale for p in params.trainable]
    else:
        scaled = [p.grad for p in params.trainable]
    for g, e in zip(scaled, expected):
        torch.testing.assert_close(g, e.grad)


def test_sigterm_saves_and_exits_cleanly(tmp_path, caplog):
    cfg = tiny_config(tmp_path)
    trainer = Trainer(cfg)
    real_step = trainer.train_step

    def step_then_signal(batch, it, epoch):
        out = real_step(batch, it, epoch)
        if it == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_signal
    result = trainer.run()
    assert result["status"] == "preempted" and result["iteration"] == 2
    ckpt = checkpoint.load(tmp_path / "checkpoint.pth")
    assert ckpt["iteration"] == 2
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or \
        callable(signal.getsignal(signal.SIGTERM))
    caplog.clear()
    resumed, result = run(tiny_config(tmp_path, "train.stop_at_iter=4", "optim.lr=0.001"),
                          resume="auto")
    assert result["iteration"] == 4
    # what the resumed run sets differently is said, not refused: a warning for what
    # changes the method, a line for where and how it runs
    said = {r.levelname: r.getMessage() for r in caplog.records if "resuming" in r.getMessage()}
    assert said["WARNING"].endswith("differ from its own: optim.lr: 0.002 -> 0.001")
    assert said["INFO"].endswith("changed: train.stop_at_iter: 0 -> 4")


def test_changed_settings_lists_new_changed_and_gone_keys_but_not_the_architecture():
    saved = {"config": {"optim": {"clip_mode": "global", "lr": 5e-4, "old_knob": 1},
                        "data": {"global_scale": [0.25, 1.0], "path": "/a"},
                        "train": {"compile": False, "precision": "bf16"},
                        "model": {"arch": "vit_small"},
                        "masks": {"max_masked_fraction": 0.5}}}  # removed: never read
    now = {"optim": {"clip_mode": "per_param", "lr": 5e-4},
           "data": {"global_scale": (0.25, 1.0), "path": "/b"},
           "train": {"compile": True, "precision": "fp16"},
           "masks": {"pred_shape": "block"}, "model": {"arch": "vit_base"}}
    assert checkpoint.changed_settings(saved, now) == (
        ["optim.clip_mode: global -> per_param", "optim.old_knob: 1 -> (no such key now)",
         "train.precision: bf16 -> fp16", "masks.pred_shape: (not saved) -> block"],
        ["data.path: /a -> /b", "train.compile: False -> True",
         "masks.max_masked_fraction: 0.5 -> (no such key now)"])


def test_stop_at_iter_on_an_epochs_last_batch_does_the_epochs_end(tmp_path):
    """train.stop_at_iter on an epoch's last batch: the epoch ends first (k-NN, kept
    copy) and the checkpoint says so, or the resumed run would skip them. A kept copy
    does not wait for a save_every epoch."""
    trainer = Trainer(tiny_config(tmp_path, "train.stop_at_iter=3", "eval.knn_every=1",
                                  "train.keep_every=1", "train.save_every=2"))
    events, real_save = [], trainer.save
    trainer.evaluate_knn = lambda: events.append("knn")
    trainer.save = lambda also=None: (events.append(("save", also)), real_save(also))
    result = trainer.run()
    assert result["status"] == "stopped" and result["iteration"] == 3
    assert events == [("save", "checkpoint0001.pth"), "knn"]
    ckpt = checkpoint.load(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 0)
    assert (tmp_path / "checkpoint0001.pth").exists()


def test_main_prints_one_line_errors(tmp_path, capsys):
    assert main(["--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["--preset", "demo", "train.bach_size=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.bach_size'" in err and "train.batch_size" in err
    assert main(["--preset", "demo", "--data", str(tmp_path / "none"),
                 f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


def test_the_command_resumes_when_it_can_and_never_overwrites(tmp_path, capsys):
    """`--resume` in an empty output folder starts a run (a job's first start), then
    continues it (its requeue); without `--resume` a folder holding a checkpoint is a
    one-line error and the checkpoint is untouched. (`--resume key=value`: argparse
    takes the key for a path; main gives it back to the overrides.)"""
    args = ["--preset", "demo", "--output-dir", str(tmp_path), "data.source=synthetic",
            "data.synthetic_size=16", "data.num_workers=0", "data.n_local=2",
            "train.batch_size=8", "model.out_dim=128", "model.patch_out_dim=128",
            "model.head_hidden_dim=64", "model.head_bottleneck_dim=32"]
    assert main(args + ["--resume", "train.stop_at_iter=1"]) == 0
    assert checkpoint.load(tmp_path / "checkpoint.pth")["iteration"] == 1
    assert f"--resume: no checkpoint in {tmp_path} yet, starting a new run" in \
        capsys.readouterr().out
    assert main(args + ["--resume", "train.stop_at_iter=2"]) == 0
    written = (tmp_path / "checkpoint.pth").read_bytes()
    assert checkpoint.load(tmp_path / "checkpoint.pth")["iteration"] == 2
    capsys.readouterr()
    assert main(args + ["train.stop_at_iter=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ibot-fast: error: {tmp_path / 'checkpoint.pth'} holds an earlier run: "
                   "add --resume to continue it, or pass another --output-dir (nothing was "
                   "written)")
    assert (tmp_path / "checkpoint.pth").read_bytes() == written


def test_resume_refuses_to_overwrite_another_run_or_to_split_the_processes(tmp_path,
                                                                          monkeypatch):
    """`--resume OTHER` into a folder that holds its own checkpoint would overwrite it;
    processes that disagree on resuming (an output folder not shared by every node)
    are stopped before anything is built."""
    from ibot_fast import dist
    from ibot_fast.train import resume_choice

    cfg = tiny_config(tmp_path)
    (tmp_path / "checkpoint.pth").write_bytes(b"x")
    other = tmp_path / "other.pth"
    with pytest.raises(UserError, match="holds another run, which continuing"):
        resume_choice(cfg, str(other))
    assert resume_choice(cfg, str(tmp_path / "checkpoint.pth")) == str(tmp_path /
                                                                       "checkpoint.pth")
    assert resume_choice(cfg, "auto") == "auto"
    monkeypatch.setattr(dist, "init", lambda device: (0, 2, torch.device("cpu")))
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj, "None"])
    with pytest.raises(UserError, match="the processes disagree on whether to resume"):
        Trainer(cfg, resume="auto")
    # the command decides before building anything: a refusal on one process is an
    # error on all (not some failing and the others waiting for them)
    from ibot_fast.train import agreed_resume_choice
    monkeypatch.setattr(dist, "all_gather_object",
                        lambda obj: [obj, ("None", "x holds an earlier run")])
    with pytest.raises(UserError, match="^x holds an earlier run$"):
        agreed_resume_choice(cfg, "auto", 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj, ("None", None)])
    with pytest.raises(UserError, match="the processes disagree"):
        agreed_resume_choice(cfg, "auto", 2)
    assert agreed_resume_choice(cfg, "auto", 1) == "auto"


def test_log_lines_follow_the_current_stdout(monkeypatch, capsys):
    """A run's log handler outlives the stdout it was set up under (a test's capsys, a
    notebook cell): records go to the stdout of the moment, not to a closed stream."""
    import io
    import logging

    from ibot_fast.logger import _StdoutHandler
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    handler = _StdoutHandler()
    first.close()
    monkeypatch.setattr(sys, "stdout", second)
    handler.emit(logging.LogRecord("ibot_fast", logging.INFO, __file__, 1, "hello", None, None))
    assert second.getvalue() == "hello\n"
    assert "Logging error" not in capsys.readouterr().err


def test_sigusr1_saves_and_goes_on(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.stop_at_iter=4", "train.save_every=100"))
    real_step = trainer.train_step

    def step_then_signal(batch, it, epoch):
        out = real_step(batch, it, epoch)
        if it == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    trainer.train_step = step_then_signal
    saved = []
    real_save = trainer.save
    trainer.save = lambda *args: (saved.append(trainer.iteration), real_save(*args))
    result = trainer.run()
    assert result["status"] == "stopped" and result["iteration"] == 4
    assert saved == [1, 4]  # on demand after the first step, then at the stop


def test_corrupt_image_is_skipped_and_the_run_goes_on(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"\x89PNG broken")
    cfg = tiny_config(tmp_path / "run", "data.source=folder", f"data.path={tmp_path / 'data'}",
                      "train.epochs=1")
    result = Trainer(cfg).run()
    assert result["status"] == "finished" and result["iteration"] == 2
    assert result["bad_images"] == 1


def test_apex_requested_but_absent_is_one_line_error(tmp_path):
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip("apex is installed here: the error path cannot be shown")
    except ImportError:
        pass
    with pytest.raises(UserError, match="optim.name=apex_lamb needs NVIDIA apex"):
        Trainer(tiny_config(tmp_path, "optim.name=apex_lamb"))


def test_periodic_knn_is_logged(tmp_path):
    import json

    cfg = tiny_config(tmp_path, "eval.knn_every=1", "train.epochs=1", "data.source=digits",
                      "train.stop_at_iter=0", "data.synthetic_size=24")
    trainer = Trainer(cfg)
    trainer.iters_per_epoch = 1  # one step of the digits epoch is enough here
    trainer.loader.batch_sampler.batches_per_epoch = 1
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1_k20" in r]
    assert len(knn) == 1 and 0 <= knn[0]["knn_top1_k20"] <= 100


@pytest.mark.parametrize("pipeline", ["cpu", "dali"])
def test_process_exits_with_persistent_workers(tmp_path, pipeline):
    """The workers ignore SIGTERM (pre-emption safety): they must still be shut down at
    interpreter exit, even when nobody calls Trainer.close()."""
    import subprocess
    import sys

    if pipeline == "dali":
        pytest.importorskip("nvidia.dali")
    script = ("import logging; logging.disable(logging.WARNING)\n"
              "from ibot_fast.config import build_config\n"
              "from ibot_fast.train import Trainer\n"
              f"cfg = build_config('demo', ['train.output_dir={tmp_path}', 'train.batch_size=16',"
              f" 'train.stop_at_iter=2', 'data.num_workers=2', 'data.pipeline={pipeline}'])\n"
              "Trainer(cfg).run()\n")
    proc = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_koleo_term_on_the_global_cls_tokens(tmp_path, impl):
    """loss.koleo_weight: the step's loss is the iBOT loss + weight x KoLeo, KoLeo taken
    per global crop over the batch on the student's backbone CLS tokens (after the final
    norm), and it is logged; the gradient reaches the backbone through it."""
    from ibot_fast.loss import koleo_loss

    trainer = Trainer(tiny_config(tmp_path, "loss.koleo_weight=0.5", "model.drop_path_rate=0",
                                  "optim.freeze_last_layer=0", impl=impl))
    trainer.loader.set_epoch(0)
    batch = next(iter(trainer.loader))
    with torch.no_grad():
        cls = trainer.student_module.backbone(batch["globals"], mask=batch["masks"])[:, 0]
    expected = sum(koleo_loss(crop) for crop in cls.chunk(2))
    losses = trainer.train_step(batch, 0, 0)
    torch.testing.assert_close(losses["koleo"].detach(), expected)
    torch.testing.assert_close(losses["loss"].detach(),
                               (losses["cls"] + losses["patch"] + 0.5 * expected).detach())
    trainer.close()

    # the step's gradient with lambda1 = lambda2 = 0 (only KoLeo left) is the KoLeo
    # term's, computed by hand at the same weights: the backbone gets it, the head none
    trainer = Trainer(tiny_config(tmp_path / "only", "loss.koleo_weight=0.5", "loss.lambda1=0",
                                  "loss.lambda2=0", "model.drop_path_rate=0", "optim.clip_grad=0",
                                  "optim.freeze_last_layer=0", impl=impl))
    trainer.close()
    net = trainer.student_module
    tokens = net(batch["globals"], batch["masks"], batch["locals"]).backbone_cls
    expected = torch.autograd.grad(0.5 * sum(koleo_loss(crop) for crop in tokens.chunk(2)),
                                   [net.backbone.pos_embed, net.backbone.blocks[0].mlp.fc1.weight])
    trainer.train_step(batch, 0, 0)
    for p, g in zip([net.backbone.pos_embed, net.backbone.blocks[0].mlp.fc1.weight], expected):
        assert g.abs().sum() > 0
        torch.testing.assert_close(p.grad, g)
    assert not net.head.mlp[0].weight.grad.any()


def test_koleo_weight_is_checked(tmp_path):
    for bad in ("-1", "nan"):
        with pytest.raises(UserError, match="loss.koleo_weight must be >= 0"):
            tiny_config(tmp_path, f"loss.koleo_weight={bad}")
    with pytest.raises(UserError, match="needs train.batch_size >= 2"):
        tiny_config(tmp_path, "loss.koleo_weight=0.1", "train.batch_size=1")


def test_fsdp_with_one_process_trains_unsharded(tmp_path, caplog):
    """train.parallel=fsdp (the ViT-L preset's) in one process: nothing to shard, so the
    run is the plain one, flat buffers and what sharding refuses included
    (tests/test_ddp.py runs it sharded)."""
    with caplog.at_level("INFO", logger="ibot_fast"):
        trainer = Trainer(tiny_config(tmp_path, "train.parallel=fsdp", "train.stop_at_iter=1",
                                      "optim.fuse_ema=true", impl="fast"))
    assert not trainer.sharded and trainer.params.flat_student is not None
    assert "train.parallel=fsdp with one process: nothing to shard" in caplog.text
    assert trainer.run()["iteration"] == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_resume_leaves_no_checkpoint_file_mapped(tmp_path):
    """Checkpoints are loaded memory-mapped; what stays on the CPU after the load (here
    every optimizer moment) is copied out, so once the next save replaces the file no
    mapping keeps the old one alive on disk."""
    run(tiny_config(tmp_path, "train.stop_at_iter=2"))
    trainer = Trainer(tiny_config(tmp_path, "train.stop_at_iter=4"), resume="auto")
    trainer.run()
    assert trainer.optimizer.state  # moments were loaded
    maps = open("/proc/self/maps").read()
    assert f"{tmp_path / 'checkpoint.pth'} (deleted)" not in maps


def test_a_step_copies_its_batch_without_waiting(tmp_path):
    """Every tensor of the batch goes to the device with non_blocking=True: both pipelines
    hand over pinned memory, from which a blocking copy makes the host wait for the
    GPU's whole queue (the previous step) at every step. Recorded here on the CPU."""
    from torch.overrides import TorchFunctionMode

    trainer = Trainer(tiny_config(tmp_path, impl="fast"))
    trainer.loader.set_epoch(0)
    batch = next(iter(trainer.loader))
    names = {id(v): k for k, v in batch.items() if isinstance(v, torch.Tensor)}
    copies = {}

    class RecordCopies(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to and args and id(args[0]) in names:
                copies[names[id(args[0])]] = kwargs.get("non_blocking", False)
            return func(*args, **kwargs)

    with RecordCopies():
        trainer.train_step(batch, 1, 0)
    assert {"globals", "locals", "masks", "mask_index"} <= set(copies), copies
    assert all(copies.values()), copies


@pytest.mark.gpu
def test_a_step_fed_from_pinned_memory_never_synchronises(tmp_path):
    """On a GPU: steps of the fast path on a batch as the CPU pipeline hands it over
    (pinned host memory) make no synchronising CUDA call (torch's sync debug mode raises
    on one), so the host can queue the next step while the GPU runs this one."""
    trainer = Trainer(tiny_config(tmp_path, "train.device=cuda", "train.compile=false",
                                  impl="fast"))
    trainer.loader.set_epoch(0)
    batch = next(iter(trainer.loader))
    assert batch["globals"].is_pinned() and batch["mask_index"].is_pinned()
    trainer.train_step(batch, 1, 0)  # the first step's allocations and launches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2):
            trainer.train_step(batch, 2 + i, 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    trainer.close()
