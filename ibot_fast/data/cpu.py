"""The CPU data path: PIL multi-crop augmentation, masks, batching (docs/design.md §1.1).

Every crop: RandomResizedCrop (bicubic), horizontal flip p=0.5, colour jitter
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in random order) with p=0.8
(`data.color_jitter_p`), grayscale p=0.2; Gaussian blur with sigma ~ U(0.1, 2.0) pixels
(`data.blur_sigma`: the paper's range is for 224 px crops) with p = 1.0 (global crop 1),
0.1 (global crop 2), 0.5 (each local crop); solarisation (threshold 128) p=0.2
(`data.solarize_p`) on global crop 2 only; ImageNet normalisation. Written with PIL and
numpy (torchvision is not needed); the operations and their parameter draws follow
torchvision's.

Randomness is per sample: the augmentation and mask of image i in epoch e come from a
generator seeded by (seed, e, i). Results therefore do not depend on the number of
workers or processes, and a resumed run sees exactly the data it would have seen.
"""
import logging
import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from .. import UserError
from .datasets import BadImage

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def sample_rng(seed: int, epoch: int, *keys: int) -> random.Random:
    """The generator for one sample (keys = its index) or one batch (keys = its indices):
    a well-mixed function of (seed, epoch, keys)."""
    state = np.random.SeedSequence([seed, epoch, *keys]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


# -- single operations (PIL in, PIL out) --------------------------------------------------

def random_resized_crop(img, size, scale, rng, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop: 10 tries at an area in `scale` and a log-uniform
    aspect ratio, else a centre crop; resized bicubically. Returns (crop, area fraction)."""
    W, H = img.size
    area = W * H
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top, left = rng.randint(0, H - h), rng.randint(0, W - w)
            break
    else:
        in_ratio = W / H
        if in_ratio < ratio[0]:
            w, h = W, int(round(W / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(H * ratio[1])), H
        else:
            w, h = W, H
        top, left = (H - h) // 2, (W - w) // 2
    crop = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return crop, (w * h) / area


def adjust_hue(img, factor):
    """Shift the hue by `factor` of a full turn (torchvision's PIL implementation)."""
    h, s, v = img.convert("HSV").split()
    h = Image.fromarray((np.asarray(h, dtype=np.uint8).astype(np.int16) +
                         int(factor * 255)).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(img, rng, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """The four adjustments with their factors drawn first, applied in a random order."""
    factors = [rng.uniform(1 - brightness, 1 + brightness),
               rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation),
               rng.uniform(-hue, hue)]
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    for op in order:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(factors[0])
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(factors[1])
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(factors[2])
        else:
            img = adjust_hue(img, factors[3])
    return img


def to_tensor(img) -> torch.Tensor:
    """uint8 HWC PIL -> normalised float CHW."""
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# -- the multi-crop augmentation ----------------------------------------------------------

class MultiCropAugmentation:
    """2 global + n local crops of one image, each with the §1.1 operations.

    `__call__(img, rng)` returns (globals [2, 3, S, S], locals [n, 3, s, s], record) where
    record lists, per crop, what was drawn (area fraction, flip, jitter, gray, blur,
    solarize): the statistical tests compare it with the DALI pipeline.
    """

    def __init__(self, global_size=224, local_size=96, n_local=10,
                 global_scale=(0.14, 1.0), local_scale=(0.05, 0.4), blur_sigma=(0.1, 2.0),
                 color_jitter_p=0.8, solarize_p=0.2):
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.blur_sigma, self.color_jitter_p = tuple(blur_sigma), color_jitter_p
        # (blur probability, solarize probability) per crop kind
        self.global1_p, self.global2_p = (1.0, 0.0), (0.1, solarize_p)
        self.local_p = (0.5, 0.0)

    def crop(self, img, size, scale, blur_p, solarize_p, rng):
        out, area = random_resized_crop(img, size, scale, rng)
        rec = {"area": area, "flip": rng.random() < 0.5}
        if rec["flip"]:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        rec["jitter"] = rng.random() < self.color_jitter_p
        if rec["jitter"]:
            out = color_jitter(out, rng)
        rec["gray"] = rng.random() < 0.2
        if rec["gray"]:
            out = out.convert("L").convert("RGB")
        rec["blur"] = rng.random() < blur_p
        if rec["blur"]:
            out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_sigma)))
        rec["solarize"] = rng.random() < solarize_p
        if rec["solarize"]:
            out = ImageOps.solarize(out, threshold=128)
        return to_tensor(out), rec

    def __call__(self, img, rng: random.Random):
        g1, r1 = self.crop(img, self.global_size, self.global_scale, *self.global1_p, rng)
        g2, r2 = self.crop(img, self.global_size, self.global_scale, *self.global2_p, rng)
        locals_, records = [], [r1, r2]
        for _ in range(self.n_local):
            x, r = self.crop(img, self.local_size, self.local_scale, *self.local_p, rng)
            locals_.append(x)
            records.append(r)
        local = torch.stack(locals_) if locals_ else \
            torch.zeros(0, 3, self.local_size, self.local_size)
        return torch.stack([g1, g2]), local, records


class MultiCropDataset(torch.utils.data.Dataset):
    """Wraps an image source: key (index, epoch) -> augmented crops, masks, label.

    An unreadable image is skipped: the next index is used instead, and the sample
    reports how many reads failed (`n_bad`) so the trainer can count and log them.
    """

    def __init__(self, source, augmentation, mask_sampler=None, seed=0, pred_start_epoch=0,
                 max_consecutive_bad=50):
        self.source = source
        self.aug = augmentation
        self.mask_sampler = mask_sampler  # per-sample (iid) sampler, or None
        self.seed = seed
        self.pred_start_epoch = pred_start_epoch
        self.max_consecutive_bad = max_consecutive_bad

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        index, epoch = key
        n_bad, bad = 0, []
        while True:
            try:
                img, label = self.source.load(index)
                break
            except BadImage as e:
                n_bad += 1
                bad.append(str(e))
                log.warning("skipping unreadable image %s", e)
                if n_bad >= self.max_consecutive_bad:
                    raise UserError(f"{n_bad} unreadable images in a row (last: {e}); "
                                    "is the data folder corrupt?") from None
                index = (index + 1) % len(self.source)
        rng = sample_rng(self.seed, epoch, index)
        globals_, locals_, _ = self.aug(img, rng)
        sample = {"globals": globals_, "locals": locals_, "label": label, "epoch": epoch,
                  "index": index, "n_bad": n_bad, "bad": bad}
        if self.mask_sampler is not None:
            if epoch < self.pred_start_epoch:
                sample["masks"] = torch.zeros(2, self.mask_sampler.num_patches, dtype=torch.bool)
            else:
                sample["masks"] = self.mask_sampler(2, rng)
        return sample


class EpochBatchSampler(torch.utils.data.Sampler):
    """This process's batches of (index, epoch) keys, resumable mid-epoch.

    Each epoch is a seeded permutation of the dataset cut into global batches of
    batch_size x world_size images (the incomplete last one is dropped); process r takes
    positions r, r + world, ... of each global batch, so the processes together see
    exactly the global batch a single process would.
    """

    def __init__(self, n, batch_size, world_size=1, rank=0, seed=0, shuffle=True):
        self.n, self.batch_size = n, batch_size
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = n // self.global_batch
        if self.batches_per_epoch == 0:
            raise UserError(f"the dataset has {n} images, fewer than one global batch of "
                            f"{self.global_batch}: lower train.batch_size")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        for b in range(self.start, self.batches_per_epoch):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            yield [(int(i), self.epoch) for i in chunk[self.rank::self.world_size]]

    def __len__(self):
        return self.batches_per_epoch - self.start


class Collate:
    """Stack samples crop-major and attach the masks (drawn here for stratified sampling).

    Batch: globals [2B, 3, S, S], locals [L*B, 3, s, s], masks [2B, N] bool, labels [B],
    n_bad (int), and, when `index_rows` is set, the masked-token index of the fast path
    (`mask_index` int64 [index_rows], `mask_count`).
    """

    def __init__(self, batch_sampler=None, num_patches=0, seed=0, pred_start_epoch=0,
                 index_rows=None):
        self.batch_sampler = batch_sampler  # stratified sampler (per batch), or None
        self.num_patches = num_patches
        self.seed = seed
        self.pred_start_epoch = pred_start_epoch
        self.index_rows = index_rows

    def __call__(self, samples):
        B = len(samples)
        globals_ = torch.stack([s["globals"] for s in samples], 1)  # [2, B, ...]
        locals_ = torch.stack([s["locals"] for s in samples], 1)  # [L, B, ...]
        epoch = samples[0]["epoch"]
        if "masks" in samples[0]:
            masks = torch.stack([s["masks"] for s in samples], 1)  # [2, B, N]
            masks = masks.reshape(2 * B, -1)
        elif self.batch_sampler is not None and epoch >= self.pred_start_epoch:
            rng = sample_rng(self.seed, epoch, *(s["index"] for s in samples))
            masks = self.batch_sampler(2 * B, rng)
        else:
            masks = torch.zeros(2 * B, self.num_patches, dtype=torch.bool)
        batch = {
            "globals": globals_.reshape(2 * B, *globals_.shape[2:]),
            "locals": locals_.reshape(-1, *locals_.shape[2:]),
            "masks": masks,
            "labels": torch.tensor([s["label"] for s in samples]),
            "n_bad": sum(s["n_bad"] for s in samples),
            "bad": [b for s in samples for b in s["bad"]],
        }
        if self.index_rows is not None:
            from ..masking import masked_index

            batch["mask_index"], batch["mask_count"] = masked_index(masks, self.index_rows)
        return batch


def build_augmentation(cfg) -> MultiCropAugmentation:
    d = cfg.data
    return MultiCropAugmentation(d.global_size, d.local_size, d.n_local, d.global_scale,
                                 d.local_scale, d.blur_sigma, d.color_jitter_p, d.solarize_p)
