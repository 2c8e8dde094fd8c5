"""Checkpoints: read without running code, written so that no kill loses more than the
steps since the last save, and a damaged latest file falls back to the one before it.

Reading (`load`). Every file a command reads (`--resume`, `model.init_from`, knn,
linear, export, show) goes through `torch.load(weights_only=True)`: tensors, numbers,
strings, lists, dicts and, for the official iBOT/DINO checkpoints, `argparse.Namespace`
(their `args`), plus NumPy arrays and dtypes (a NumPy RNG state as NumPy gives it; ibot_fast
writes it as a tensor). None of these can run code when unpickled. A file that needs any
other type is refused with a one-line error naming it; `trusted=True` (`train.trust_pickle`
/ `--trust-pickle`) is the only way to unpickle it, for a file one trusts.

Writing (`save`). The state goes to a temporary file in the same folder, which is
flushed and fsynced, then renamed over the target, and the folder is fsynced: after a
crash or power loss the target is the old file or the new one, whole. A full disk
(ENOSPC) removes the temporary file, leaves the target as it was and raises a one-line
error with the size that was needed.

A run's folder (`Checkpointer`): `checkpoint.pth` (the latest) and
`checkpoint_previous.pth` (the one before it, moved aside at each save), the kept copies
`checkpointNNNN.pth` (`train.keep_every`), `config.json`, `log.jsonl`. `--resume` takes
the latest if it reads and fits the config, else (a kill between the two renames, a
truncated or zero-byte file) the previous one, with a warning; neither is an error,
never a silent fresh start over the folder.
"""
import argparse
import errno
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from . import UserError
from .config import REMOVED_KEYS

log = logging.getLogger("ibot_fast")

LATEST, PREVIOUS = "checkpoint.pth", "checkpoint_previous.pth"

# Keys that fix the shapes of the parameters: a checkpoint loads only where they agree.
ARCH_KEYS = ("model.arch", "model.patch_size", "model.out_dim", "model.patch_out_dim",
             "model.shared_head", "model.head_hidden_dim", "model.head_bottleneck_dim",
             "model.head_layers", "data.global_size")


def _safe_globals() -> list:
    """Types allowed in a weights_only load beyond torch's own: none can run code."""
    allowed = [argparse.Namespace, np.ndarray, np.dtype]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            allowed.append(getattr(__import__(module, fromlist=["_reconstruct"]),
                                   "_reconstruct"))
        except (ImportError, AttributeError):
            pass
    allowed += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return allowed


def _unsafe_types(path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001: only used to word the error
        return "a type that is not plain data"
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in _safe_globals()}
    names = [n for n in names if n not in allowed]
    return ", ".join(names[:3]) if names else "a type that is not plain data"


def load(path, map_location="cpu", mmap: bool = False, trusted: bool = False) -> dict:
    """The file's object, read with `weights_only=True` (module docstring) unless
    `trusted`. mmap: tensors are read from the file as they are used (the processes of a
    multi-GPU resume do not each hold a whole copy); a tensor kept on the CPU then keeps
    the file mapped until it is copied (as `Trainer.load` does)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): a write was cut short")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=not trusted,
                                  mmap=mmap)
            except RuntimeError as e:
                if not (mmap and "mmap" in str(e)):
                    raise
                # written without the zip format: no mmap
                return torch.load(path, map_location=map_location, weights_only=not trusted)
    except Exception as e:
        if not trusted and "Weights only load failed" in str(e):
            raise UserError(
                f"{path} holds {_unsafe_types(path)}, which loading would have to run code "
                "for; refused. Only for a file you trust: train.trust_pickle=true (train, "
                "model.init_from) or --trust-pickle (knn, linear, export, show)") from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                        f"{first[:200]})") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _write_durably(write, path: Path, size_hint: int = 0, previous: Path = None) -> None:
    """write(file object) into a temporary file beside `path`, fsync it, rename it over
    `path` (first moving `path` to `previous`, when given), fsync the folder. ENOSPC:
    the temporary file goes, `path` stays as it was."""
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            need = max(size_hint, written)
            raise UserError(f"no space left on the device of {path.parent} while writing "
                            f"{path.name}: it needs about {need / 2**30:.2f} GiB, "
                            f"{free / 2**30:.2f} GiB are free; {path.name} is as it was "
                            "before: free some space, then resume") from None
        raise
    if previous is not None and path.is_file():
        os.replace(path, previous)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _nbytes(state) -> int:
    """Bytes of the tensors in a (nested) state: the size of its file, roughly."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_nbytes(v) for v in state)
    return 0


def save(path, state: dict) -> Path:
    """torch.save `state` to `path`, atomically and durably (module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_durably(lambda f: torch.save(state, f), path, _nbytes(state))
    return path


def copy(src, dst) -> Path:
    """Copy a written checkpoint to another name, atomically and durably as `save`."""
    dst = Path(dst)
    with open(src, "rb") as source:
        _write_durably(lambda f: shutil.copyfileobj(source, f, 16 << 20), dst,
                       Path(src).stat().st_size)
    return dst


class Checkpointer:
    """A run's checkpoint files and when to write them (module docstring).

    Saves happen at the end of every `save_every`-th epoch and of the last one (with a
    kept copy every `keep_every` epochs), every `save_every_iters` iterations inside an
    epoch, and when the run stops (a signal, `stop_at_iter`, too many bad images or
    non-finite losses). Only the main process writes."""

    def __init__(self, out_dir, save_every: int = 1, keep_every: int = 0,
                 save_every_iters: int = 0, is_main: bool = True):
        self.out_dir = Path(out_dir)
        self.save_every, self.keep_every = save_every, keep_every
        self.save_every_iters = save_every_iters
        self.is_main = is_main
        self.saved_at = -1  # the iteration of the last save

    @property
    def latest(self) -> Path:
        return self.out_dir / LATEST

    @property
    def previous(self) -> Path:
        return self.out_dir / PREVIOUS

    def remove_stale_temporaries(self) -> None:
        """Temporary files of this folder's checkpoints left by a writer that was killed
        (their names: `.checkpoint*.pth.tmp<pid>`); nothing else is touched."""
        if not self.is_main or not self.out_dir.is_dir():
            return
        for tmp in self.out_dir.glob(".checkpoint*.pth.tmp*"):
            tmp.unlink(missing_ok=True)
            log.info("removed %s, left by a writer that was stopped mid-save", tmp.name)

    # -- when -----------------------------------------------------------------------------

    def due_inside_epoch(self, iteration: int) -> bool:
        return bool(self.save_every_iters) and iteration % self.save_every_iters == 0

    def due_at_epoch_end(self, epoch: int, last: bool) -> bool:
        """epoch: the number of epochs completed."""
        return epoch % self.save_every == 0 or last or self.kept_copy(epoch) is not None

    def kept_copy(self, epoch: int):
        if self.keep_every and epoch % self.keep_every == 0:
            return f"checkpoint{epoch:04d}.pth"
        return None

    # -- writing --------------------------------------------------------------------------

    def save(self, state: dict, iteration: int, keep: str = None) -> Path:
        """Write `state` as the latest checkpoint (main process only): the latest so far
        becomes the previous, and `keep` (a file name) gets a copy."""
        self.saved_at = iteration
        if not self.is_main:
            return self.latest
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_durably(lambda f: torch.save(state, f), self.latest, _nbytes(state),
                       previous=self.previous)
        if keep:
            copy(self.latest, self.out_dir / keep)
        return self.latest

    # -- reading --------------------------------------------------------------------------

    def load_for_resume(self, cfg_dict: dict, trusted: bool = False):
        """(path, checkpoint) to resume from: the latest if it reads and fits this
        config, else the previous one (with a one-line warning); neither: UserError."""
        errors = []
        for path in (self.latest, self.previous):
            if not path.exists():
                errors.append(f"{path.name}: missing")
                continue
            try:
                ckpt = load(path, mmap=True, trusted=trusted)
                check_compatible(ckpt, cfg_dict, path)
            except UserError as e:
                errors.append(str(e))
                continue
            if errors:
                log.warning("resuming from %s: %s", path.name, errors[0])
            return path, ckpt
        raise UserError(f"no checkpoint in {self.out_dir} can be resumed ("
                        + "; ".join(errors) + ")")


def check_compatible(ckpt: dict, cfg_dict: dict, path="checkpoint") -> None:
    """One-line error when the checkpoint was written for another architecture."""
    saved = ckpt.get("config") if isinstance(ckpt, dict) else None
    if saved is None:
        raise UserError(f"{path} has no config: it was not written by ibot_fast")
    diffs = []
    for key in ARCH_KEYS:
        section, name = key.split(".")
        a, b = saved.get(section, {}).get(name), cfg_dict[section][name]
        if a != b and not (isinstance(a, (list, tuple)) and tuple(a) == tuple(b)):
            diffs.append(f"{key}={a} (checkpoint) vs {b} (this run)")
    if diffs:
        raise UserError(f"{path} was written for another model: " + "; ".join(diffs))


# Keys that say where and how a run executes, not what it computes: a resume that
# changes them is routine (a new folder, a moved dataset, another machine, more or fewer
# GPUs, a faster kernel path or a memory knob for them; how it is evaluated and logged).
OPERATIONAL = ("train.output_dir", "train.stop_at_iter", "train.device", "train.log_every",
               "train.tensorboard", "train.wandb",
               "train.save_every", "train.keep_every", "train.save_every_iters",
               "train.max_nonfinite", "train.trust_pickle",
               "train.compile", "train.cuda_graphs", "train.parallel",
               "train.fsdp_reshard_after_forward", "train.fsdp_shard_size", "model.attention",
               "model.activation_checkpointing",
               "data.path", "data.num_workers", "data.prefetch", "data.pipeline",
               "data.max_bad_fraction", "eval.knn_every", "eval.batch_size", "eval.knn_k",
               "eval.knn_temp", "eval.precision", "model.init_from")


def changed_settings(ckpt: dict, cfg_dict: dict) -> tuple:
    """(method, operational): "key: checkpoint's -> this run's" for every key (other
    than the architecture's, which `check_compatible` refuses) that a resumed run sets
    differently, split by `OPERATIONAL`. Keys the checkpoint's ibot_fast did not have
    read "(not saved)", keys this version no longer has "(no such key now)"."""
    saved = ckpt.get("config") or {}
    method, operational = [], []
    sections = list(cfg_dict) + [s for s in saved if s not in cfg_dict]
    for section in sections:
        now_values, saved_values = cfg_dict.get(section, {}), saved.get(section, {})
        if not isinstance(now_values, dict) or not isinstance(saved_values, dict):
            continue
        names = list(now_values) + [n for n in saved_values if n not in now_values]
        for name in names:
            key = f"{section}.{name}"
            before = saved_values.get(name, "(not saved)")
            now = now_values.get(name, "(no such key now)")
            same = before == now or (isinstance(before, (list, tuple)) and
                                     isinstance(now, (list, tuple)) and
                                     tuple(before) == tuple(now))
            if key not in ARCH_KEYS and not same:
                plain = key in OPERATIONAL or key in REMOVED_KEYS  # (removed: never read)
                (operational if plain else method).append(f"{key}: {before} -> {now}")
    return method, operational


def rng_state() -> dict:
    """This process's random generators as tensors and plain types (weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                       int(has_gauss), float(gauss)],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if torch.is_tensor(numpy_state[1]):
        name, keys, pos, has_gauss, gauss = numpy_state
        numpy_state = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    np.random.set_state(tuple(numpy_state))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
