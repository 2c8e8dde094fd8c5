"""Mask samplers for masked image modelling (docs/design.md §1.2). Global crops only.

`BlockMaskSampler` is the official i.i.d. sampler: each crop independently draws a ratio
(one of the `pred_ratio` choices, each uniform in `ratio +- var`; the paper's flags
`pred_ratio 0 0.3, pred_ratio_var 0 0.2` mean "no mask" with probability 1/2, otherwise
r ~ U(0.1, 0.5)) and masks about `int(r * N)` patches with BEiT's block-wise algorithm.
The masked count varies from crop to crop and may fall short of the target.

`StratifiedMaskSampler` is the fast path's option (DINOv2's idea, made exact): in a batch
of n crops exactly `round(n * p_masked)` are masked, their ratios are the midpoints of
equal strata of [lo, hi], and each block mask is topped up to its target by growing its
blocks, so the number of masked tokens per batch is the same every step (static shapes
for buffers, kernels and CUDA graphs). Which crops are masked is shuffled.

`pred_shape` is the official flag: "block" (the above) or "rand" (the patches to mask
drawn uniformly without replacement, exactly the target count: the mask shape of the
official "Rand" models, which also used a larger prediction ratio).

Masks are bool [n, H*W] in row-major patch order. All randomness comes from a
`random.Random` passed in (or owned by the sampler), so a sample's mask is a function of
its seed: resuming, worker counts and world sizes do not change it.
"""
import math
import random
from typing import Sequence, Tuple, Union

import numpy as np
import torch

Ratio = Union[float, Sequence[float]]


def _as_tuple(x: Ratio) -> Tuple[float, ...]:
    return tuple(float(v) for v in x) if isinstance(x, (list, tuple)) else (float(x),)


def block_mask(grid: Tuple[int, int], target: int, rng: random.Random, min_patches: int,
               log_aspect: Tuple[float, float]) -> np.ndarray:
    """BEiT block-wise masking: place rectangles until `target` patches or no progress.

    Each round makes up to 10 attempts to place a rectangle with area ~ U(min_patches,
    remaining) and log-uniform aspect ratio, strictly inside the grid (as the official
    code); it is accepted when it adds between 1 and `remaining` new patches.
    """
    H, W = grid
    mask = np.zeros((H, W), dtype=bool)
    count = 0
    while count < target:
        remaining = target - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min_patches, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < H and 0 < w < W:
                top = rng.randint(0, H - h)
                left = rng.randint(0, W - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= remaining:
                    mask[top:top + h, left:left + w] = True
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return mask


def rand_mask(grid: Tuple[int, int], target: int, rng: random.Random) -> np.ndarray:
    """Exactly `target` patches, chosen uniformly without replacement (official "rand")."""
    mask = np.zeros(grid[0] * grid[1], dtype=bool)
    mask[rng.sample(range(mask.size), target)] = True
    return mask.reshape(grid)


SHAPES = ("block", "rand")


def grow_to(mask: np.ndarray, target: int, rng: random.Random) -> np.ndarray:
    """Add patches next to the existing blocks (4-neighbours) until `target` are masked."""
    H, W = mask.shape
    count = int(mask.sum())
    while count < target:
        grown = np.zeros_like(mask)
        grown[1:, :] |= mask[:-1, :]
        grown[:-1, :] |= mask[1:, :]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        frontier = np.flatnonzero(grown & ~mask)
        if frontier.size == 0:  # empty mask: seed anywhere
            frontier = np.flatnonzero(~mask)
        pick = frontier[rng.randrange(frontier.size)]
        mask.flat[pick] = True
        count += 1
    return mask


class BlockMaskSampler:
    """The official i.i.d. block-wise sampler: `sampler(n)` -> bool [n, H*W]."""

    def __init__(self, grid_size=(14, 14), pred_ratio: Ratio = (0.0, 0.3),
                 pred_ratio_var: Ratio = (0.0, 0.2), min_aspect: float = 0.3,
                 min_num_patches: int = None, seed: int = None, shape: str = "block"):
        if shape not in SHAPES:
            raise ValueError(f"mask shape {shape!r} is not one of {', '.join(SHAPES)}")
        self.grid = tuple(grid_size)
        self.shape = shape
        self.pred_ratio = _as_tuple(pred_ratio)
        self.pred_ratio_var = _as_tuple(pred_ratio_var)
        if len(self.pred_ratio_var) == 1 and len(self.pred_ratio) > 1:
            self.pred_ratio_var = self.pred_ratio_var * len(self.pred_ratio)
        if len(self.pred_ratio) != len(self.pred_ratio_var):
            raise ValueError("pred_ratio and pred_ratio_var need the same number of values")
        for r, v in zip(self.pred_ratio, self.pred_ratio_var):
            if not 0.0 <= r - v <= r + v <= 1.0:
                raise ValueError(f"mask ratio {r} +- {v} leaves [0, 1]")
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        # official: (min(H, W) // 3) ** 2, i.e. 16 on a 14x14 grid
        self.min_patches = min_num_patches or max(1, (min(self.grid) // 3) ** 2)
        self.rng = random.Random(seed)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def draw_ratio(self, rng: random.Random) -> float:
        """One of the ratio choices (uniformly), each uniform in [r - var, r + var]."""
        choices = [rng.uniform(r - v, r + v) if v > 0 else r
                   for r, v in zip(self.pred_ratio, self.pred_ratio_var)]
        return rng.choice(choices)

    def one(self, rng: random.Random) -> np.ndarray:
        target = int(self.draw_ratio(rng) * self.num_patches)
        if self.shape == "rand":
            return rand_mask(self.grid, target, rng)
        return block_mask(self.grid, target, rng, self.min_patches, self.log_aspect)

    def __call__(self, n: int, rng: random.Random = None) -> torch.Tensor:
        rng = rng or self.rng
        masks = np.stack([self.one(rng).reshape(-1) for _ in range(n)]) if n else \
            np.zeros((0, self.num_patches), dtype=bool)
        return torch.from_numpy(masks)

    def max_masked(self) -> int:
        """Largest number of masked patches one crop can get (the top of the ratio range)."""
        top = max(r + v for r, v in zip(self.pred_ratio, self.pred_ratio_var))
        return int(top * self.num_patches)


class StratifiedMaskSampler:
    """A fixed number of masked patches per batch: `sampler(n)` -> bool [n, H*W].

    Of n crops, `round(n * mask_probability)` are masked; masked crop i of m gets the
    target `int(r_i * N)` with r_i the midpoint of the i-th of m equal strata of
    `ratio_range`. Block masks are grown to exactly their target.
    """

    def __init__(self, grid_size=(14, 14), ratio_range=(0.1, 0.5),
                 mask_probability: float = 0.5, min_aspect: float = 0.3,
                 min_num_patches: int = None, seed: int = None, shape: str = "block"):
        if shape not in SHAPES:
            raise ValueError(f"mask shape {shape!r} is not one of {', '.join(SHAPES)}")
        self.grid = tuple(grid_size)
        self.shape = shape
        self.ratio_range = tuple(ratio_range)
        self.mask_probability = mask_probability
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self.min_patches = min_num_patches or max(1, (min(self.grid) // 3) ** 2)
        self.rng = random.Random(seed)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def targets(self, n: int):
        m = int(round(n * self.mask_probability))
        lo, hi = self.ratio_range
        return [int((lo + (i + 0.5) * (hi - lo) / m) * self.num_patches) for i in range(m)]

    def total(self, n: int) -> int:
        """Masked patches in every batch of n crops."""
        return sum(self.targets(n))

    def __call__(self, n: int, rng: random.Random = None) -> torch.Tensor:
        rng = rng or self.rng
        masks = np.zeros((n, self.num_patches), dtype=bool)
        targets = self.targets(n)
        rows = list(range(n))
        rng.shuffle(rows)
        for row, target in zip(rows, targets):
            if self.shape == "rand":
                masks[row] = rand_mask(self.grid, target, rng).reshape(-1)
                continue
            m = block_mask(self.grid, target, rng, self.min_patches, self.log_aspect)
            masks[row] = grow_to(m, target, rng).reshape(-1)
        return torch.from_numpy(masks)

    def max_masked(self) -> int:
        return int(self.ratio_range[1] * self.num_patches)


SAMPLERS = ("iid", "stratified")  # masks.sampler: official per crop | fixed count per batch


def sampler_from_config(mcfg, grid) -> Union[BlockMaskSampler, StratifiedMaskSampler]:
    """The sampler named by `masks.sampler`, from the official ratio flags.

    For the stratified sampler, the zero-ratio choices give the probability of no mask
    and the others the ratio range: (0, 0.3) +- (0, 0.2) -> p = 1/2, range (0.1, 0.5).
    """
    if mcfg.sampler == "iid":
        return BlockMaskSampler(grid, mcfg.pred_ratio, mcfg.pred_ratio_var, mcfg.pred_aspect,
                                shape=mcfg.pred_shape)
    nonzero = [(r, v) for r, v in zip(mcfg.pred_ratio, mcfg.pred_ratio_var) if r + v > 0]
    if not nonzero:
        raise ValueError("masks.sampler=stratified needs a non-zero masks.pred_ratio")
    lo = min(r - v for r, v in nonzero)
    hi = max(r + v for r, v in nonzero)
    p = len(nonzero) / len(mcfg.pred_ratio)
    return StratifiedMaskSampler(grid, (lo, hi), p, mcfg.pred_aspect, shape=mcfg.pred_shape)


def buffer_rows(sampler, n_crops: int, sigmas: float = 6.0, multiple: int = 64) -> int:
    """Rows of the fast path's masked-token buffer for a batch of n_crops global crops.

    Stratified sampler: exactly its fixed total. i.i.d. sampler: the total is a sum of
    n_crops independent counts, so it is bounded by mean + 6 standard deviations
    (measured once on 4,000 draws), rounded up to a multiple of 64 and capped by the
    worst case n_crops x max_masked. For ViT-S/16 at batch 128 (256 crops, ratios
    U(0.1, 0.5) with p = 1/2) that is ~10.7k rows against ~7.5k expected and 25k worst
    case. A batch that still exceeds it (p < 1e-9) grows the buffer for that step.
    """
    if isinstance(sampler, StratifiedMaskSampler):
        return sampler.total(n_crops)
    counts = sampler(4000, random.Random(0)).sum(1).double()
    bound = n_crops * counts.mean().item() + sigmas * math.sqrt(n_crops) * counts.std().item()
    bound = -(-int(math.ceil(bound)) // multiple) * multiple
    return max(1, min(bound, n_crops * sampler.max_masked()))


def masked_index(masks: torch.Tensor, rows: int = None):
    """Flat positions `b * N + i` of the masked patches, padded to `rows` with 0.

    Returns (index int64 [rows], valid count). Built once per step in the data path;
    the head and the loss of the fast path see exactly these rows.
    """
    index = masks.reshape(-1).nonzero().squeeze(1)
    count = index.numel()
    if rows is None:
        return index, count
    rows = max(rows, -(-count // 64) * 64)  # a rare overflow grows this batch's buffer
    padded = torch.zeros(rows, dtype=torch.int64)
    padded[:count] = index
    return padded, count
