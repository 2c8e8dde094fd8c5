"""Run control: how a run ends (`Status`) and the signals that end it (`Signals`).

    SIGTERM   (pre-emption, scancel): checkpoint at the next step boundary, exit: PREEMPTED
    SIGUSR2   (SLURM, before the time limit): checkpoint, requeue the job, exit: REQUEUED
    SIGUSR1   checkpoint at the next step boundary and go on

With several processes a signal reaches them at different steps, so the flags are
all-reduced and acted on only where every process looks at them together (`agreed`).
"""
import enum
import logging
import signal

import torch

from . import dist

log = logging.getLogger("ibot_fast")


class Status(str, enum.Enum):
    """How `Trainer.run` ended (a str, so it prints and compares as its value)."""
    FINISHED = "finished"  # every epoch trained
    STOPPED = "stopped"  # train.stop_at_iter reached, or SIGUSR2 outside SLURM
    PREEMPTED = "preempted"  # SIGTERM
    REQUEUED = "requeued"  # SIGUSR2: the command requeues the SLURM job
    NOT_REQUEUED = "not requeued"  # the requeue failed (the checkpoint is saved)

    def __str__(self):
        return self.value

    @property
    def exit_code(self) -> int:
        return 1 if self is Status.NOT_REQUEUED else 0


class Signals:
    """The three signals' flags, while the handlers are installed (`with signals:`)."""

    WATCHED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.stop = self.requeue = self.save = False
        self._previous = {}

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._on_signal) for s in self.WATCHED}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGTERM:
            log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
            self.stop = True
        elif signum == signal.SIGUSR2:
            log.warning("SIGUSR2 (the SLURM time limit is near): saving a checkpoint at the "
                        "next step boundary, then requeueing the job")
            self.requeue = True
        else:
            log.info("SIGUSR1: saving a checkpoint at the next step boundary")
            self.save = True

    def agreed(self, world_size: int, device) -> tuple:
        """(stop, requeue, save): this process's flags, or any process's (every process
        must call it); the save request is consumed."""
        flags = (self.stop, self.requeue, self.save)
        self.save = False
        if world_size == 1:
            return flags
        t = torch.tensor([float(f) for f in flags], device=device)
        return tuple(bool(v > 0) for v in dist.all_reduce_(t).tolist())
