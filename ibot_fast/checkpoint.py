"""Checkpoints: written atomically, checked against the config before loading.

A checkpoint holds student, teacher, optimizer, loss centers, grad scaler, epoch,
iteration, the resolved config, every process's RNG states and the run's counters.
"""
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from . import UserError
from .config import REMOVED_KEYS

# Keys that fix the shapes of the parameters: a checkpoint loads only where they agree.
ARCH_KEYS = ("model.arch", "model.patch_size", "model.out_dim", "model.patch_out_dim",
             "model.shared_head", "model.head_hidden_dim", "model.head_bottleneck_dim",
             "model.head_layers", "data.global_size")


def save(path, state: dict) -> Path:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def copy(src, dst) -> Path:
    """Copy a written checkpoint to another name, atomically as `save`."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def load(path, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint's dict. mmap: tensors are read from the file as they are used, so
    the processes of a multi-GPU resume do not each hold a whole copy in host memory;
    a tensor kept on the CPU then keeps the file mapped until it is copied (as
    `Trainer.load` does)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):
                raise
            # written without the zip format: no mmap
            return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None


def check_compatible(ckpt: dict, cfg_dict: dict, path="checkpoint") -> None:
    """One-line error when the checkpoint was written for another architecture."""
    saved = ckpt.get("config")
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
# GPUs, a faster kernel path or a memory knob for them; how it is evaluated).
OPERATIONAL = ("train.output_dir", "train.stop_at_iter", "train.device", "train.log_every",
               "train.save_every", "train.keep_every", "train.max_nonfinite",
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
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
