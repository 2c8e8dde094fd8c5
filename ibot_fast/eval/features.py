"""Frozen features for the evaluations (k-NN, linear probe), as DINO/iBOT extract them.

Images are resized to 256/224 of the crop size (bicubic) and centre-cropped, without
augmentation (`eval_transform`). Features are the CLS tokens of the last `n_blocks`
blocks after the final norm, optionally followed by the average of the last block's
patch tokens. Under torch.distributed every process extracts its shard (images r,
r + world, ...) with its own DataLoader workers and the features are all-gathered: every
process returns all of them, in the source's order, so every process must call it (the
k-NN during training and `ibot-fast knn` / `linear` under torchrun: ImageNet's 1.28 M
training images split over the processes instead of read by one).
"""
import logging

import torch
from PIL import Image

from .. import UserError, dist
from ..data.cpu import to_tensor
from ..data.datasets import BadImage

log = logging.getLogger(__name__)


def eval_transform(img, size: int):
    """Resize the shorter side to size * 256 / 224 (bicubic), centre-crop size x size."""
    resize = int(round(size * 256 / 224))
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(resize, round(w * scale)), max(resize, round(h * scale))),
                     Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
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


def _all_gather_rows(tensors, device):
    """Concatenate each tensor's rows over all processes (shards may differ in length)."""
    world = dist.world_size()
    count = torch.tensor([tensors[0].shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = [int(c) for c in counts]
    gathered = []
    for t in tensors:
        padded = t.new_zeros((max(counts),) + t.shape[1:], device=device)
        padded[:t.shape[0]] = t.to(device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        gathered.append(torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu())
    return gathered


@torch.no_grad()
def extract_features(backbone, source, size: int, device, n_blocks: int = 4,
                     avgpool: bool = False, batch_size: int = 256, num_workers: int = 0):
    """Frozen features [n, (n_blocks + avgpool) * dim] (fp32, CPU) and labels [n].

    Under torch.distributed, process r extracts images r, r + world, ... and the result
    is all-gathered: every process returns all features, in the source's order.
    """
    backbone.eval()
    indices = list(range(dist.rank(), len(source), dist.world_size()))
    from ..data import _ignore_signals  # pre-emption mid-evaluation must not kill them

    loader = torch.utils.data.DataLoader(_Shard(EvalImages(source, size), indices),
                                         batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate, worker_init_fn=_ignore_signals,
                                         pin_memory=device.type == "cuda")
    dim = (n_blocks + int(avgpool)) * backbone.embed_dim
    empty = torch.zeros(0, dtype=torch.int64)  # a process whose shard is all unreadable
    feats, labels, order = [torch.zeros(0, dim)], [empty], [empty]
    for batch in loader:
        if batch is None:
            continue
        x, y, i = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            layers = backbone.get_intermediate_layers(x.to(device, non_blocking=True), n_blocks)
        feats.append(pool_features(layers, avgpool).float().cpu())
        labels.append(y)
        order.append(i)
    feats, labels, order = torch.cat(feats), torch.cat(labels), torch.cat(order)
    if dist.is_initialized():
        feats, labels, order = _all_gather_rows([feats, labels, order], device)
    if feats.shape[0] == 0:
        raise UserError("no readable images to extract features from")
    sort = order.argsort()
    return feats[sort], labels[sort]
