"""Where a run's numbers go: log.jsonl, TensorBoard (across a resume), W&B, the progress
bar, and `show curves` from either log."""
import io
import json
import logging
import sys

import pytest

from ibot_fast import UserError
from ibot_fast.config import build_config
from ibot_fast.logger import MetricSinks, Progress, metric_tag
from ibot_fast.show import curve_panels, read_log
from ibot_fast.train import Trainer


def tiny_config(out, *extra):
    """The demo model on 16 synthetic images: 2 iterations per epoch at batch 8."""
    return build_config("demo", [
        "data.source=synthetic", "data.synthetic_size=16", "data.num_workers=0",
        "data.n_local=1", "train.batch_size=8", "train.epochs=2", "train.log_every=1",
        "model.out_dim=128", "model.patch_out_dim=128", "model.head_hidden_dim=64",
        "model.head_bottleneck_dim=32", "optim.warmup_epochs=0", "train.impl=reference",
        f"train.output_dir={out}", *extra])


def tensorboard_scalars(run_dir) -> dict:
    """{tag: [(step, value)]} as TensorBoard's own reader sees the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(p.step, p.value) for p in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_curves_go_on_across_a_resume(tmp_path):
    """A run stopped at iteration 3 after a checkpoint at 2, resumed from that checkpoint
    with another lr: the event files hold one point per iteration, the resumed run's
    from 3 on (TensorBoard's purge step), the same values as log.jsonl; the resolved
    config.yaml reads back to the run's config."""
    pytest.importorskip("tensorboard")
    from ibot_fast.train import train

    out = tmp_path / "run"
    first = tiny_config(out, "train.tensorboard=true", "train.stop_at_iter=3",
                        "train.keep_every=1")  # keeps checkpoint0001.pth (iteration 2)
    train(first)
    assert build_config(config_file=out / "config.yaml") == first
    tags = tensorboard_scalars(out)
    assert [s for s, _ in tags["loss/loss"]] == [1, 2, 3]
    for tag in ("loss/cls", "loss/patch", "schedule/lr", "schedule/wd", "schedule/momentum",
                "schedule/teacher_temp", "schedule/teacher_patch_temp", "train/grad_norm",
                "train/img_per_s", "train/nonfinite_total", "train/cls_target_entropy",
                "train/cls_target_batch_entropy"):
        assert len(tags[tag]) == 3, tag

    # the same run, from its epoch-1 checkpoint (iteration 2), with another lr
    resumed = tiny_config(out, "train.tensorboard=true", "optim.lr=0.004")
    trainer = Trainer(resumed, resume=str(out / "checkpoint0001.pth"))
    assert trainer.iteration == 2
    trainer.run()
    tags = tensorboard_scalars(out)
    assert [s for s, _ in tags["loss/loss"]] == [1, 2, 3, 4]
    records = [json.loads(line) for line in (out / "log.jsonl").open()]
    logged = {r["iter"]: r for r in records}  # the later record of an iteration
    stale = next(r for r in records if r["iter"] == 3)
    assert logged[3]["lr"] > 1.5 * stale["lr"]  # the lr doubled
    for step, value in tags["schedule/lr"]:
        assert value == pytest.approx(logged[step]["lr"])
    for step, value in tags["loss/loss"]:
        assert value == pytest.approx(logged[step]["loss"])


def test_show_curves_reads_tensorboard_events(tmp_path):
    """Without log.jsonl, `show curves` reads the event files: the same panels."""
    pytest.importorskip("tensorboard")
    cfg = build_config("demo", ["train.tensorboard=true", f"train.output_dir={tmp_path}"])
    sinks = MetricSinks(tmp_path, cfg)
    for it in (1, 2, 3):
        sinks.write({"iter": it, "epoch": 0, "loss": 9.0 - it, "cls": 5.0, "patch": 4.0 - it,
                     "lr": 1e-4 * it, "teacher_temp": 0.04, "teacher_patch_temp": 0.05})
    sinks.write({"iter": 3, "epoch": 1, "knn_top1_k10": 12.5, "knn_top1_k20": 15.0})
    sinks.close()
    from_json = curve_panels(read_log(tmp_path))
    (tmp_path / "log.jsonl").unlink()
    from_events = curve_panels(read_log(tmp_path))
    assert [title for title, _ in from_events] == [title for title, _ in from_json] == [
        "loss", "learning rate", "teacher temperature", "k-NN top-1 (%)"]
    for (_, a), (_, b) in zip(from_json, from_events):
        assert a.keys() == b.keys()
        for label in a:
            assert a[label][0] == b[label][0]
            assert a[label][1] == pytest.approx(b[label][1])
    from ibot_fast.show import cmd_show
    assert cmd_show(["curves", "--run", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0


def test_metric_tags():
    assert metric_tag("cls") == "loss/cls" and metric_tag("lr") == "schedule/lr"
    assert metric_tag("knn_top1_k20") == "knn/knn_top1_k20"
    assert metric_tag("img_per_s") == "train/img_per_s"


def test_wandb_offline(tmp_path, monkeypatch):
    """train.wandb=PROJECT in W&B's offline mode: a local run with the same numbers,
    whose id a resumed run reuses."""
    wandb = pytest.importorskip("wandb")
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_DIR", tmp_path), ("WANDB_CONFIG_DIR", tmp_path / "config"),
                       ("WANDB_CACHE_DIR", tmp_path / "cache"),
                       ("WANDB_DATA_DIR", tmp_path / "data")):
        monkeypatch.setenv(var, str(value))
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(run, data, step=None, **kwargs):
        logged.append((step, dict(data)))
        return real_log(run, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    out = tmp_path / "run"
    cfg = build_config("demo", ["train.wandb=ibot-test", f"train.output_dir={out}"])
    sinks = MetricSinks(out, cfg)
    sinks.write({"iter": 5, "epoch": 0, "loss": 7.0, "lr": 1e-3, "img_per_s": 100.0})
    sinks.close()
    assert logged == [(5, {"loss/loss": 7.0, "schedule/lr": 1e-3, "train/img_per_s": 100.0})]
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # W&B names a run's folder by its start time to the second and its id, so a resume
    # within the same second would reuse the folder: the first one is moved aside
    runs[0].rename(out / "wandb" / "first")
    MetricSinks(out, cfg, start_iter=5).close()  # a resumed run: the same id
    assert (out / "wandb_run_id").read_text().strip() == run_id
    again = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(again) == 1 and list(again[0].glob("*.wandb"))


@pytest.mark.parametrize("setting,module", [("train.wandb=proj", "wandb"),
                                            ("train.tensorboard=true", "tensorboard")])
def test_missing_package_is_a_one_line_error(tmp_path, monkeypatch, setting, module):
    """On every process (`enabled=False` too), so that all stop alike."""
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    cfg = build_config("demo", [setting, f"train.output_dir={tmp_path}"])
    for enabled in (True, False):
        with pytest.raises(UserError, match=f"^{setting} needs the {module} package: pip "
                           f"install {module}") as e:
            MetricSinks(tmp_path, cfg, enabled=enabled)
        assert "\n" not in str(e.value)


def test_progress_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    bar = Progress(2, 3, start_iter=0, stream=stream)
    bar.update(0, 1, 1)
    bar.update(0, 2, 2, {"loss": 7.123456, "img_per_s": 412.3})
    bar.update(0, 3, 3)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1  # logging steps only
    assert lines[0].startswith("epoch 1/2 step 2/3  loss 7.1235  412 img/s  eta ")
    assert "\r" not in stream.getvalue()
    silent = io.StringIO()
    Progress(2, 3, stream=silent, enabled=False).update(0, 2, 2, {"loss": 1, "img_per_s": 1})
    assert silent.getvalue() == ""


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal(capsys):
    """tqdm's bar: epoch, step, loss, images/sec, ETA; log lines go above it."""
    from ibot_fast.logger import setup_logging

    setup_logging(True)
    root_handlers = list(logging.getLogger().handlers)
    stream = FakeTerminal()
    bar = Progress(2, 3, start_iter=3, stream=stream)
    bar.update(1, 1, 4, {"loss": 7.123456, "img_per_s": 412.3})
    logging.getLogger("ibot_fast").info("checkpoint: somewhere")
    bar.update(1, 2, 5)
    bar.close()
    drawn = stream.getvalue()
    assert "\r" in drawn and "epoch 2/2 step 2/3" in drawn
    assert "loss 7.1235, 412 img/s" in drawn
    assert "5/6" in drawn and "<" in drawn  # position and tqdm's elapsed<remaining
    assert "checkpoint: somewhere" in capsys.readouterr().out
    assert logging.getLogger().handlers == root_handlers  # restored
