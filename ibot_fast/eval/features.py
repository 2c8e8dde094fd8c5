"""Frozen features for the evaluations (k-NN, linear probe), as DINO/iBOT extract them.

Images are resized to 256/224 of the crop size (bicubic) and centre-cropped, without
augmentation (`eval_transform`). Features are the CLS tokens of the last `n_blocks`
blocks after the final norm, optionally followed by the average of the last block's
patch tokens. Under torch.distributed every process extracts its shard (images r,
r + world, ...) with its own DataLoader workers, so every process must call it (the
k-NN during training and `ibot-fast knn` / `linear` under torchrun: ImageNet's 1.28 M
training images split over the processes instead of read by one). With `gather=True`
the shards are all-gathered, in pieces of at most `GATHER_PIECE_BYTES` on the device,
straight into one CPU tensor in the source's order (no device or host copy of the whole
matrix beside it); with `gather=False` each process keeps its own shard (the k-NN's
training features: each process searches its shard, knn.py merges the candidates).
"""
import logging
import math

import torch
from PIL import Image

from .. import UserError, dist
from ..data.cpu import to_tensor
from ..data.datasets import BadImage

log = logging.getLogger(__name__)


def eval_transform(img, size: int):
    """Resize the shorter side to size * 256 / 224 (bicubic), centre-crop size x size, with
    the official evaluation's arithmetic (torchvision's Resize(256) and CenterCrop(224) on
    PIL images): the longer side is truncated, int(256 x long / short), and the crop's
    offsets are int(round((side - size) / 2)), Python's round (half to even)."""
    resize = int(round(size * 256 / 224))
    w, h = img.size
    longer = int(resize * max(w, h) / min(w, h))
    w, h = (resize, longer) if w <= h else (longer, resize)
    img = img.resize((w, h), Image.BICUBIC)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return to_tensor(img.crop((left, top, left + size, top + size)))


class EvalImages(torch.utils.data.Dataset):
    """(tensor, label) pairs; an unreadable image yields None and is dropped."""

    def __init__(self, source, size: int):
        self.source, self.size = source, size

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        try:
            img, label = self.source.load(i)
        except BadImage as e:
            log.warning("skipping unreadable image %s", e)
            return None
        return eval_transform(img, self.size), label


def pool_features(layers, avgpool: bool) -> torch.Tensor:
    """[B, n*dim (+dim)] from the normalised outputs of the last n blocks."""
    parts = [x[:, 0] for x in layers]
    if avgpool:
        parts.append(layers[-1][:, 1:].mean(1))
    return torch.cat(parts, dim=-1)


class _Shard(torch.utils.data.Dataset):
    """This process's images of a source: (tensor, label, index), None when unreadable."""

    def __init__(self, images: EvalImages, indices):
        self.images, self.indices = images, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        item = self.images[self.indices[j]]
        return None if item is None else (*item, self.indices[j])


def _collate(items):
    items = [x for x in items if x is not None]
    if not items:
        return None
    x, y, i = zip(*items)
    return torch.stack(x), torch.tensor(y), torch.tensor(i)


GATHER_PIECE_BYTES = 1 << 26  # device memory per all-gather piece, all processes' rows


def _check_same_source(length: int) -> None:
    """Every process must read the same image list: a folder that differs between
    nodes would silently score a mixture."""
    lengths = dist.all_gather_object(length)
    if len(set(lengths)) > 1:
        raise UserError(f"the evaluation dataset differs between processes ({lengths} images "
                        "on ranks 0..): every node must see the same files")


def _gather_pieces(t, counts, device, write) -> None:
    """All-gather the rows of `t` (counts[r] on process r) in pieces of at most
    GATHER_PIECE_BYTES on the device; write(r, first, rows) receives each process's
    valid rows of each piece, on the CPU."""
    world = len(counts)
    row_bytes = max(1, math.prod(t.shape[1:]) * t.element_size())  # an empty shard too
    step = max(1, GATHER_PIECE_BYTES // (row_bytes * world))
    for first in range(0, max(counts), step):
        n = min(step, max(counts) - first)
        piece = t.new_zeros((n,) + t.shape[1:], device=device)
        mine = t[first:first + n]
        piece[:mine.shape[0]] = mine.to(device)
        parts = [torch.empty_like(piece) for _ in range(world)]
        torch.distributed.all_gather(parts, piece)
        for r, part in enumerate(parts):
            valid = max(0, min(n, counts[r] - first))
            if valid:
                write(r, first, part[:valid].cpu())


def _all_gather_rows(order, tensors, device):
    """Every process's rows of `tensors` (its shard, source indices `order`; shards may
    differ in length) on the CPU, sorted by source index: the indices travel first, so
    each piece of the tensors is then written straight to its rows' final places (no
    second copy of the whole matrix on the device or the host)."""
    world = dist.world_size()
    count = torch.tensor([order.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = [int(c) for c in counts]
    starts = [sum(counts[:r]) for r in range(world)]
    every = order.new_empty(sum(counts))

    def write_order(r, first, rows):
        every[starts[r] + first:starts[r] + first + rows.shape[0]] = rows

    _gather_pieces(order, counts, device, write_order)
    places = torch.empty_like(every)  # row j of the rank-by-rank concatenation -> its row
    places[every.argsort()] = torch.arange(every.shape[0])
    results = []
    for t in tensors:
        out = t.new_empty((every.shape[0],) + t.shape[1:], device="cpu")

        def write(r, first, rows, out=out):
            out[places[starts[r] + first:starts[r] + first + rows.shape[0]]] = rows

        _gather_pieces(t, counts, device, write)
        results.append(out)
    return every.sort().values, results


def extract_features(backbone, source, size: int, device, n_blocks: int = 4,
                     avgpool: bool = False, batch_size: int = 256, num_workers: int = 0,
                     gather: bool = True, precision: str = "fp32"):
    """Frozen features [n, (n_blocks + avgpool) * dim] (fp32, CPU) and labels [n], in the
    source's order, unreadable images left out. precision: the backbone's forward in
    fp32 (the official evaluation) or under bf16 autocast (`eval.precision`).

    Under torch.distributed process r extracts images r, r + world, ...; with gather=True
    every process returns all of them, with gather=False its own shard only. The
    backbone runs in eval mode and is left in the mode it came in (the teacher of a
    training run goes on training: its compiled blocks are specialised to that mode).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r} is not fp32 or bf16")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            return _extract(backbone, source, size, device, n_blocks, avgpool, batch_size,
                            num_workers, gather, precision)
    finally:
        backbone.train(was_training)


def _extract(backbone, source, size, device, n_blocks, avgpool, batch_size, num_workers,
             gather, precision):
    if dist.is_initialized():
        _check_same_source(len(source))
    indices = list(range(dist.rank(), len(source), dist.world_size()))
    from ..data import _ignore_signals  # pre-emption mid-evaluation must not kill them

    loader = torch.utils.data.DataLoader(_Shard(EvalImages(source, size), indices),
                                         batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate, worker_init_fn=_ignore_signals,
                                         pin_memory=device.type == "cuda")
    dim = (n_blocks + int(avgpool)) * backbone.embed_dim
    feats = torch.empty(len(indices), dim)  # filled in place: no second copy to concatenate
    labels = torch.empty(len(indices), dtype=torch.int64)
    order = torch.empty(len(indices), dtype=torch.int64)
    n = 0
    for batch in loader:
        if batch is None:
            continue
        x, y, i = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            layers = backbone.get_intermediate_layers(x.to(device, non_blocking=True), n_blocks)
        feats[n:n + len(i)] = pool_features(layers, avgpool).float().cpu()
        labels[n:n + len(i)], order[n:n + len(i)] = y, i
        n += len(i)
    feats, labels, order = feats[:n], labels[:n], order[:n]  # a shard may be all unreadable
    readable = n
    if dist.is_initialized():
        if gather:
            order, (feats, labels) = _all_gather_rows(order, [feats, labels], device)
            readable = order.shape[0]
        else:
            readable = int(dist.all_reduce_(torch.tensor([n], device=device)))
    if readable == 0:
        raise UserError("no readable images to extract features from")
    return feats, labels
