"""Progress bar and JSON-lines log (main process only)."""
import json
import logging
import sys
import time
from pathlib import Path


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


class JsonLog:
    """Appends one JSON object per line to <output_dir>/log.jsonl."""

    def __init__(self, path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class ProgressBar:
    """`epoch 3/12 [######----] 10/22  loss 7.12  412 img/s` on a terminal (redrawn in
    place), or a line per update when stdout is not a terminal."""

    def __init__(self, total_epochs: int, steps_per_epoch: int, enabled: bool = True,
                 stream=None):
        self.total_epochs, self.steps = total_epochs, steps_per_epoch
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_draw = 0.0

    def update(self, epoch: int, step: int, info: str, force: bool = False):
        if not self.enabled:
            return
        now = time.time()
        if not force and self.tty and now - self.last_draw < 0.2:
            return
        if not self.tty and not force:
            return
        self.last_draw = now
        width = 20
        done = int(width * step / max(self.steps, 1))
        line = (f"epoch {epoch + 1}/{self.total_epochs} [{'#' * done}{'-' * (width - done)}] "
                f"{step}/{self.steps}  {info}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            if step == self.steps:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
