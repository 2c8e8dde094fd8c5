"""Where a run's numbers go, from the main process: `MetricSinks` (log.jsonl always;
TensorBoard with `train.tensorboard=true`; Weights & Biases with `train.wandb=PROJECT`),
`Progress` (tqdm's bar on a terminal, a plain line per logging step otherwise) and the
`time level message` log lines.

TensorBoard and W&B see the log.jsonl keys (but the epoch) under a group, `loss/cls`,
`schedule/lr`, `knn/knn_top1_k20`, `train/img_per_s` (`metric_tag`), with the iteration
as the step.
"""
import importlib.util
import json
import logging
import os
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import UserError


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is emitted, not to the stream that
    was current at set-up (pytest's capsys, notebooks and redirections swap it, and the
    old one may be closed by then)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(is_main: bool, level=logging.INFO):
    """Plain `time level message` lines on stdout from the main process only."""
    root = logging.getLogger()
    if getattr(root, "_ibot_fast", False):
        return
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if is_main else logging.ERROR)
    root._ibot_fast = True


_GROUPS = {"loss": "loss", "cls": "loss", "patch": "loss", "koleo": "loss",
           "lr": "schedule", "wd": "schedule", "momentum": "schedule",
           "teacher_temp": "schedule", "teacher_patch_temp": "schedule"}


def metric_tag(key: str) -> str:
    """The TensorBoard / W&B name of a log.jsonl key: `group/key` (the key is all after
    the first slash, so that `ibot-fast show curves` reads the event files back)."""
    group = "knn" if key.startswith("knn_") else _GROUPS.get(key, "train")
    return f"{group}/{key}"


def _require(module: str, setting: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{setting} needs the {module} package: {install}")


class MetricSinks:
    """Fans each record (a dict of numbers with "iter") out to <output_dir>/log.jsonl and,
    when the config asks, to TensorBoard event files in output_dir and to a W&B run.

    Built on every process, so that a missing package is the same one-line error on all
    of them; only the main process (`enabled`) writes. `start_iter` is the iteration the
    run starts (or resumes) at: TensorBoard drops the points an earlier run wrote after
    it (its `purge_step`), so that a resume from an earlier checkpoint continues the same
    curves without overlap. A W&B run keeps its id in <output_dir>/wandb_run_id and a
    resumed run continues it (W&B keeps its points at steps it has already seen and
    drops the resumed run's there).
    """

    def __init__(self, out_dir, cfg, start_iter: int = 0, enabled: bool = True):
        from .config import to_dict

        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.tensorboard = self.wandb = None
        t = cfg.train
        if t.tensorboard:
            _require("tensorboard", "train.tensorboard=true",
                     "pip install tensorboard (or 'ibot-fast[tensorboard]')")
        if t.wandb:
            _require("wandb", f"train.wandb={t.wandb}",
                     "pip install wandb (or leave train.wandb empty)")
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.out_dir), purge_step=start_iter + 1)
        if t.wandb:
            self.wandb = _start_wandb(t.wandb, self.out_dir, to_dict(cfg))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        # TensorBoard and W&B: every number but the step (the iteration) and the epoch
        step = record["iter"]
        scalars = {metric_tag(k): float(v) for k, v in record.items()
                   if k not in ("iter", "epoch") and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()  # a run killed later keeps what was logged
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close TensorBoard's writer and finish the W&B run (idempotent)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(project: str, out_dir: Path, config: dict):
    import wandb

    id_file = out_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, dir=str(out_dir), name=out_dir.resolve().name,
                      id=run_id, resume="allow", config=config)


def _draws(stream) -> bool:
    """A terminal a bar can be drawn on: a pseudo-terminal that reports no width (a job
    runner's, say) gets the plain lines."""
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError):  # no file descriptor behind it to ask
        return True


class Progress:
    """The run's progress on stderr, from the main process. On a terminal, tqdm's bar over
    all iterations: `epoch 3/12 step 10/22` and its last loss and images/sec, with tqdm's
    rate and ETA; log lines are printed above the bar while it is open. Otherwise (a
    cluster's log file) one plain line per logging step, with the ETA from the average
    rate since the start."""

    def __init__(self, epochs: int, steps_per_epoch: int, start_iter: int = 0,
                 enabled: bool = True, stream=None):
        self.epochs, self.steps = epochs, steps_per_epoch
        self.total = epochs * steps_per_epoch
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.started = (time.monotonic(), start_iter)
        self._open = ExitStack()
        self.bar = None
        if enabled and _draws(self.stream):
            self.bar = self._open.enter_context(tqdm(
                total=self.total, initial=start_iter, file=self.stream, unit="it",
                dynamic_ncols=True))
            self._open.enter_context(logging_redirect_tqdm([logging.getLogger()]))

    def update(self, epoch: int, step: int, iteration: int, record: dict = None) -> None:
        """After each iteration; `record` (with "loss" and "img_per_s") on logging steps."""
        if not self.enabled:
            return
        where = f"epoch {epoch + 1}/{self.epochs} step {step}/{self.steps}"
        if self.bar is not None:
            self.bar.set_description_str(where, refresh=False)
            if record is not None:
                self.bar.set_postfix_str(f"loss {record['loss']:.4f}, "
                                         f"{record['img_per_s']:.0f} img/s", refresh=False)
            self.bar.update(iteration - self.bar.n)
        elif record is not None:
            t0, it0 = self.started
            rate = (iteration - it0) / max(time.monotonic() - t0, 1e-9)
            eta = tqdm.format_interval((self.total - iteration) / rate) if rate > 0 else "?"
            self.stream.write(f"{where}  loss {record['loss']:.4f}  "
                              f"{record['img_per_s']:.0f} img/s  eta {eta}\n")
            self.stream.flush()

    def close(self) -> None:
        self._open.close()
