"""Data paths: `cpu` (PIL + DataLoader workers) and `dali` (GPU augmentation).

`build_train_loader` returns a `TrainLoader`: iterate it per epoch after
`set_epoch(epoch, start_batch)`; each batch is a dict (see `cpu.Collate`).
"""
import atexit
import logging
import signal
import weakref

import torch

from .. import UserError
from ..masking import BlockMaskSampler, sampler_from_config
from .cpu import Collate, EpochBatchSampler, MultiCropDataset, build_augmentation
from .datasets import BadImage, DigitsDataset, ImageFolder, SyntheticDataset, build_dataset

log = logging.getLogger(__name__)

__all__ = ["BadImage", "DigitsDataset", "ImageFolder", "SyntheticDataset", "TrainLoader",
           "build_dataset", "build_train_loader", "resolve_pipeline"]


PIPELINES = ("auto", "cpu", "dali")  # data.pipeline


def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


def resolve_pipeline(name: str, device: torch.device) -> str:
    """'auto' is DALI when it imports and a GPU is present, else the CPU pipeline; the
    choice is logged with its reason."""
    if name == "cpu":
        choice, why = "cpu", "configured"
    elif name == "dali":
        if not dali_importable():
            raise UserError("data.pipeline=dali needs NVIDIA DALI: pip install "
                            "nvidia-dali-cuda130 (CUDA 13) or nvidia-dali-cuda120 (CUDA 12)")
        choice, why = "dali", "configured"
    elif device.type != "cuda":
        choice, why = "cpu", f"auto: DALI augments on a GPU, this run is on {device.type}"
    elif dali_importable():
        choice, why = "dali", "auto: DALI imports and a GPU is present"
    else:
        choice, why = "cpu", "auto: DALI does not import (pip install -e '.[gpu]')"
    log.info("data.pipeline: %s (%s)", choice, why)
    return choice


class TrainLoader:
    """Batches for one process, epoch by epoch, resumable at a batch boundary.

    The DataLoader's workers are persistent and ignore SIGTERM (see `_ignore_signals`), so
    they must be shut down through the DataLoader's own protocol: `close()`, called by the
    trainer at the end and, as a safety net, at interpreter exit (before multiprocessing
    would try to terminate them with the very signal they ignore).
    """

    def __init__(self, loader, batch_sampler, dataset):
        self.loader, self.batch_sampler, self.dataset = loader, batch_sampler, dataset
        self._finalizer = weakref.finalize(self, _shutdown_workers, loader)
        atexit.register(self._finalizer)

    def close(self):
        self._finalizer()

    @property
    def batches_per_epoch(self) -> int:
        return self.batch_sampler.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.batch_sampler.set_epoch(epoch, start_batch)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.batch_sampler)


def build_train_loader(cfg, world_size=1, rank=0, index_rows=None, device=None) -> TrainLoader:
    device = device or torch.device("cpu")
    pipeline = resolve_pipeline(cfg.data.pipeline, device)
    if pipeline == "dali":
        from .dali import build_dali_loader

        return build_dali_loader(cfg, world_size, rank, index_rows, device)
    source = build_dataset(cfg, "train")
    grid = (cfg.data.global_size // cfg.model.patch_size,) * 2
    num_patches = grid[0] * grid[1]
    per_sample, per_batch = None, None
    if cfg.masks.enabled:
        sampler = sampler_from_config(cfg.masks, grid)
        if isinstance(sampler, BlockMaskSampler):
            per_sample = sampler
        else:
            per_batch = sampler
    dataset = MultiCropDataset(source, build_augmentation(cfg), per_sample, cfg.train.seed,
                               cfg.masks.pred_start_epoch)
    batch_sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, world_size, rank,
                                      cfg.train.seed)
    collate = Collate(per_batch, num_patches, cfg.train.seed, cfg.masks.pred_start_epoch,
                      index_rows)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=cfg.data.prefetch if workers > 0 else None,
        worker_init_fn=_ignore_signals,
        # its own generator: creating an iterator must not draw from the global RNG
        # (stochastic depth uses it, and a resumed run must see the same draws)
        generator=torch.Generator().manual_seed(cfg.train.seed))
    return TrainLoader(loader, batch_sampler, dataset)


def _shutdown_workers(loader):
    """Stop a DataLoader's persistent workers the way its iterator does when deleted."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def _ignore_signals(_worker_id):
    """Pre-emption sends SIGTERM to the whole process group, and SLURM sends its
    `--signal` (USR2 before the time limit; USR1 on request) to every process of the
    step: the workers ignore them (by default USR1/USR2 would kill them), so the main
    process can finish its step and save a checkpoint before they go away."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
