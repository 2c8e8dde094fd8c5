"""Checkpoints that cannot run code, survive a kill at any moment, and fall back when the
latest is damaged (ibot_fast/checkpoint.py)."""
import argparse
import errno
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ibot_fast import UserError, checkpoint
from ibot_fast.config import build_config, to_dict
from ibot_fast.train import Trainer, main as train_main

from test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]


class CodeOnLoad:
    """Unpickling this writes a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.marker), "code ran")


def malicious_checkpoint(tmp_path):
    """An ibot_fast-looking checkpoint with a payload; (file, marker the payload writes)."""
    marker = tmp_path / "marker"
    cfg = tiny_config(tmp_path / "ref")
    path = tmp_path / "evil" / "checkpoint.pth"
    path.parent.mkdir(parents=True)
    torch.save({"config": to_dict(cfg), "teacher": {}, "student": {},
                "payload": CodeOnLoad(marker)}, path)
    return path, marker


def test_no_entry_point_runs_code_from_a_file(tmp_path, capsys):
    """resume (automatic and by path), model.init_from, knn, linear, export, show and the
    library functions they call: each refuses the file in one line naming the type, and
    the payload never runs; only the explicit opt-in unpickles it."""
    from ibot_fast.cli import main as cli
    from ibot_fast.eval.knn import load_backbone
    from ibot_fast.pretrained import read_weights

    path, marker = malicious_checkpoint(tmp_path)
    image = tmp_path / "digit.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(image)
    refused = []

    def expect_refusal(call):
        with pytest.raises(UserError) as e:
            call()
        message = str(e.value)
        assert "\n" not in message and "pathlib" in message and "refused" in message, message
        assert not marker.exists(), "the file's code ran"
        refused.append(message)

    expect_refusal(lambda: Trainer(tiny_config(path.parent), "auto"))
    expect_refusal(lambda: Trainer(tiny_config(tmp_path / "other"), str(path)))
    expect_refusal(lambda: Trainer(tiny_config(tmp_path / "init",
                                               f"model.init_from={path}")))
    expect_refusal(lambda: checkpoint.load(path))
    expect_refusal(lambda: read_weights(path))
    expect_refusal(lambda: load_backbone(path))
    for command in (["knn", "--checkpoint", str(path)],
                    ["linear", "--checkpoint", str(path)],
                    ["export", "--checkpoint", str(path), "--out", str(tmp_path / "x.pth")],
                    ["show", "attention", "--checkpoint", str(path), "--image", str(image),
                     "--out", str(tmp_path / "a.png")],
                    ["train", "--preset", "demo", "--output-dir", str(path.parent),
                     "--resume", "data.source=synthetic"]):
        assert cli(command) == 2, command
        err = capsys.readouterr().err
        assert "refused" in err and err.count("\n") == 1, err
        assert not marker.exists(), command
    assert len(refused) == 6
    # the only way to unpickle it: saying the file is trusted
    checkpoint.load(path, trusted=True)
    assert marker.read_text() == "code ran"


def test_an_official_checkpoint_loads_without_trust(tmp_path):
    """What the official main_ibot.py saves (student, teacher, optimizer, epoch, args as an
    argparse.Namespace, the loss state, the fp16 scaler's state) loads with weights_only,
    for model.init_from."""
    cfg = tiny_config(tmp_path / "ref")
    donor = Trainer(cfg)
    donor.close()
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {f"module.{k}": v for k, v in
                            donor.student_module.state_dict().items()},
                "teacher": donor.teacher.state_dict(),
                "optimizer": donor.optimizer.state_dict(), "epoch": 100,
                "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=8192,
                                           pred_ratio=[0.0, 0.3], lr=0.0005, seed=0),
                "ibot_loss": donor.loss.state_dict(),
                "fp16_scaler": torch.amp.GradScaler("cpu").state_dict()}, path)
    trainer = Trainer(tiny_config(tmp_path / "run", f"model.init_from={path}"))
    trainer.close()
    for name, value in donor.teacher.state_dict().items():
        assert torch.equal(trainer.teacher.state_dict()[name], value), name


def run_stopped(out_dir, stop_at, *extra):
    """A new run, saved after every iteration, stopped after `stop_at`."""
    trainer = Trainer(tiny_config(out_dir, f"train.stop_at_iter={stop_at}",
                                  "train.save_every_iters=1", *extra))
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def test_checkpoints_inside_an_epoch_and_the_previous_one(tmp_path):
    """train.save_every_iters=N writes the checkpoint every N iterations; the one before
    is kept as checkpoint_previous.pth."""
    trainer = Trainer(tiny_config(tmp_path, "train.save_every_iters=2", "train.stop_at_iter=5"))
    saved = []
    save = trainer.checkpointer.save

    def spy(state, iteration, keep=None):
        saved.append((iteration, state["batch_in_epoch"]))
        return save(state, iteration, keep)

    trainer.checkpointer.save = spy
    trainer.run()
    trainer.close()
    # 3 iterations per epoch: iteration 2 (inside), 3 (epoch end), 4 (inside), 5 (stop)
    assert saved == [(2, 2), (3, 0), (4, 1), (5, 2)]
    assert checkpoint.load(tmp_path / "checkpoint.pth")["iteration"] == 5
    assert checkpoint.load(tmp_path / "checkpoint_previous.pth")["iteration"] == 4
    with pytest.raises(UserError, match="train.save_every_iters and train.keep_every >= 0"):
        tiny_config(tmp_path, "train.save_every_iters=-1")


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "garbage", "missing"])
def test_a_damaged_latest_checkpoint_resumes_from_the_previous(tmp_path, damage, caplog):
    run_stopped(tmp_path, 2)
    latest = tmp_path / "checkpoint.pth"
    data = latest.read_bytes()
    if damage == "truncated":
        latest.write_bytes(data[:len(data) // 2])
    elif damage == "zero bytes":
        latest.write_bytes(b"")
    elif damage == "garbage":
        latest.write_bytes(os.urandom(len(data)))
    else:  # a kill between the two renames: the latest moved aside, the new one not in
        latest.unlink()
    with caplog.at_level("WARNING", logger="ibot_fast"):
        resumed = Trainer(tiny_config(tmp_path, "train.stop_at_iter=4"), "auto")
    assert resumed.iteration == 1  # the previous checkpoint's
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("resuming from checkpoint_previous.pth: ") for w in warnings)
    assert resumed.run()["iteration"] == 4
    resumed.close()


def test_with_no_readable_checkpoint_resume_is_an_error(tmp_path):
    run_stopped(tmp_path, 2)
    for name in ("checkpoint.pth", "checkpoint_previous.pth"):
        (tmp_path / name).write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="no checkpoint in .* can be resumed") as e:
        Trainer(tiny_config(tmp_path), "auto")
    assert "\n" not in str(e.value)
    # the training command refuses too, and does not start a new run over the folder
    assert train_main(["--preset", "demo", "--output-dir", str(tmp_path), "--resume",
                       "data.source=synthetic"]) == 2
    assert (tmp_path / "checkpoint.pth").read_bytes() == b"\x00" * 100


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """ENOSPC while a checkpoint is written: the run stops with a one-line error that
    says how much space it needed, and the checkpoint before it still loads."""
    run_stopped(tmp_path, 2)
    before = (tmp_path / "checkpoint.pth").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)  # part of it made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    trainer = Trainer(tiny_config(tmp_path, "train.stop_at_iter=4",
                                  "train.save_every_iters=1"), "auto")
    with pytest.raises(UserError, match=r"no space left .* it needs about [\d.]+ GiB") as e:
        trainer.run()
    trainer.close()
    assert "\n" not in str(e.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    assert checkpoint.load(tmp_path / "checkpoint.pth")["iteration"] == 2
    assert not list(tmp_path.glob(".*.tmp*"))


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    run_stopped(tmp_path, 1)
    stale = [tmp_path / ".checkpoint.pth.tmp12345", tmp_path / ".checkpoint0003.pth.tmp7"]
    for f in stale:
        f.write_bytes(b"half a checkpoint")
    mine = tmp_path / ".notes.tmp1"  # not a checkpoint's temporary: left alone
    mine.write_bytes(b"")
    Trainer(tiny_config(tmp_path), "auto").close()
    assert not any(f.exists() for f in stale) and mine.exists()


# -- killed at random moments ---------------------------------------------------------------

KILL_RUN = ["data.source=synthetic", "data.synthetic_size=24", "data.num_workers=0",
            "data.n_local=2", "train.batch_size=8", "train.epochs=4", "train.log_every=1",
            "model.out_dim=2048", "model.patch_out_dim=2048", "model.head_hidden_dim=256",
            "model.head_bottleneck_dim=64", "optim.warmup_epochs=1", "train.impl=fast",
            "train.save_every_iters=1"]


def start(out_dir):
    """The same command every time: `ibot-fast train ... --resume`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "ibot_fast.train", "--preset", "demo",
                             "--output-dir", str(out_dir), "--resume", *KILL_RUN],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def saved_iteration(out_dir):
    try:
        return checkpoint.load(out_dir / "checkpoint.pth")["iteration"]
    except UserError:
        return None


def test_killed_at_random_moments_it_ends_bit_identical(tmp_path, capsys):
    """SIGKILL during steps and during checkpoint writes, the same `--resume` command
    after each: the run ends with the networks, optimizer state and centers of an
    uninterrupted run, bit for bit, and no temporary file is left."""
    straight = start(tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()[-2000:]

    rng = random.Random(0)
    out = tmp_path / "killed"
    kills, redone = [], 0
    for attempt in range(6):
        proc = start(out)
        during_write = attempt % 2 == 1
        before = saved_iteration(out) or 0
        deadline = time.time() + 300
        landed = None
        while proc.poll() is None and time.time() < deadline:
            if during_write:
                if any(out.glob(".checkpoint*.tmp*")) and (saved_iteration(out) or 0) >= before:
                    landed = "writing a checkpoint"
                    break
            elif (saved_iteration(out) or 0) > before:  # it has trained: kill mid-step
                time.sleep(rng.uniform(0.0, 0.3))
                landed = "during steps"
                break
            time.sleep(0.0002 if during_write else 0.01)
        if proc.poll() is not None:  # finished before it could be killed
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at = saved_iteration(out)
        kills.append((landed, at))
        if during_write:
            assert landed == "writing a checkpoint"
    else:
        proc = start(out)
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    assert len(kills) >= 4 and sum(k[0] == "writing a checkpoint" for k in kills) >= 2

    a = checkpoint.load(tmp_path / "straight" / "checkpoint.pth")
    b = checkpoint.load(out / "checkpoint.pth")
    assert a["iteration"] == b["iteration"] == 12
    for part in ("student", "teacher", "loss"):
        for name, value in a[part].items():
            assert torch.equal(b[part][name], value), (part, name)
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(b["optimizer"]["state"][i][key], value), (i, key)
    assert not list(out.glob(".*.tmp*"))
    logged = [line for line in (out / "log.jsonl").read_text().splitlines()]
    redone = len(logged) - 12  # every step is logged: the steps run twice after a kill
    with capsys.disabled():
        print(f"\n  {len(kills)} kills (where, checkpoint's iteration after): {kills}; "
              f"steps redone: {redone}")
