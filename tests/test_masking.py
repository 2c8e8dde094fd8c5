"""Mask samplers (docs/design.md §1.2): ratios, counts, block shape, stratified totals."""
import random

import numpy as np
import pytest
import torch

from ibot_fast.masking import (BlockMaskSampler, StratifiedMaskSampler, block_mask,
                               buffer_rows, masked_index, sampler_from_config)


def components(mask_row: np.ndarray, grid) -> int:
    """4-connected components of one mask (a flood fill)."""
    m = mask_row.reshape(grid).copy()
    count = 0
    for start in zip(*np.nonzero(m)):
        if not m[start]:
            continue
        count += 1
        stack = [start]
        m[start] = False
        while stack:
            i, j = stack.pop()
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < m.shape[0] and 0 <= b < m.shape[1] and m[a, b]:
                    m[a, b] = False
                    stack.append((a, b))
    return count


def test_official_signature_and_shape():
    sampler = BlockMaskSampler(grid_size=(14, 14), pred_ratio=(0.0, 0.3),
                               pred_ratio_var=(0.0, 0.2))
    masks = sampler(7)
    assert masks.dtype == torch.bool and masks.shape == (7, 196)


def test_iid_ratio_distribution_and_counts():
    sampler = BlockMaskSampler(grid_size=(14, 14), pred_ratio=(0.0, 0.3),
                               pred_ratio_var=(0.0, 0.2), seed=1)
    masks = sampler(4000)
    counts = masks.sum(1).numpy()
    unmasked = (counts == 0).mean()
    assert abs(unmasked - 0.5) < 0.03  # 4000 draws: sd of the fraction is 0.008
    masked = counts[counts > 0]
    # a masked crop never exceeds int(0.5 * 196) and reaches at least the first block (16)
    assert masked.max() <= int(0.5 * 196)
    assert masked.min() >= 1
    # most masked crops reach their target closely: the mean ratio is near 0.3 * 196
    assert 0.25 * 196 < masked.mean() <= 0.3 * 196


def test_iid_single_ratio_choice():
    sampler = BlockMaskSampler(grid_size=(14, 14), pred_ratio=0.3, pred_ratio_var=0.0, seed=0)
    counts = sampler(300).sum(1)
    assert (counts > 0).all() and counts.max() <= int(0.3 * 196)
    assert counts.float().mean() > 0.9 * int(0.3 * 196)


def test_masks_are_block_shaped():
    sampler = BlockMaskSampler(grid_size=(14, 14), seed=3)
    rng = np.random.default_rng(0)
    block_components, random_components = [], []
    for row in sampler(400).numpy():
        n = int(row.sum())
        if n < 20:
            continue
        block_components.append(components(row, (14, 14)))
        scattered = np.zeros(196, dtype=bool)
        scattered[rng.choice(196, n, replace=False)] = True
        random_components.append(components(scattered, (14, 14)))
    assert np.mean(block_components) * 4 < np.mean(random_components)


def test_block_mask_follows_the_target():
    rng = random.Random(0)
    log_aspect = (np.log(0.3), np.log(1 / 0.3))
    for target in (0, 19, 58, 98):
        m = block_mask((14, 14), target, rng, 16, log_aspect)
        assert m.sum() <= target
        if target:
            assert m.sum() > 0


def test_stratified_total_is_fixed_and_half_masked():
    sampler = StratifiedMaskSampler(grid_size=(14, 14), ratio_range=(0.1, 0.5),
                                    mask_probability=0.5, seed=0)
    expected = sampler.total(64)
    for _ in range(20):
        masks = sampler(64)
        assert int(masks.sum()) == expected
        assert int((masks.sum(1) > 0).sum()) == 32
    per_crop = sorted(int(c) for c in sampler(64).sum(1) if c > 0)
    assert per_crop[0] >= int(0.1 * 196) and per_crop[-1] <= int(0.5 * 196)


def test_stratified_masks_are_blocky():
    sampler = StratifiedMaskSampler(grid_size=(14, 14), seed=5)
    comps = [components(r, (14, 14)) for r in sampler(128).numpy() if r.sum() >= 20]
    assert np.mean(comps) < 4


def test_sampler_from_config_maps_official_flags():
    from ibot_fast.config import MaskConfig

    s = sampler_from_config(MaskConfig(sampler="stratified"), (14, 14))
    assert s.ratio_range == pytest.approx((0.1, 0.5)) and s.mask_probability == 0.5
    assert isinstance(sampler_from_config(MaskConfig(), (14, 14)), BlockMaskSampler)


def test_same_rng_same_masks():
    sampler = BlockMaskSampler(grid_size=(8, 8))
    a = sampler(10, random.Random(42))
    b = sampler(10, random.Random(42))
    assert torch.equal(a, b)


def test_masked_index_pads_and_counts():
    masks = torch.rand(6, 10) < 0.3
    index, count = masked_index(masks, rows=64)
    flat = masks.reshape(-1).nonzero().squeeze(1)
    assert count == flat.numel() and torch.equal(index[:count], flat)
    assert (index[count:] == 0).all()
    grown, count = masked_index(torch.ones(4, 100, dtype=torch.bool), rows=5)
    assert count == 400 and grown.numel() == 448  # overflow: rounded up to 64


def test_buffer_rows_bounds_the_iid_total():
    sampler = BlockMaskSampler(grid_size=(14, 14), seed=0)
    rows = buffer_rows(sampler, 256)
    assert rows % 64 == 0 and 7500 < rows < 12000
    totals = [int(sampler(256).sum()) for _ in range(30)]
    assert max(totals) < rows
    strat = StratifiedMaskSampler(grid_size=(14, 14))
    assert buffer_rows(strat, 256) == strat.total(256)


def test_rand_shape_masks_exact_counts_of_uniformly_scattered_patches():
    """Official pred_shape=rand: each crop's int(r N) patches drawn uniformly without
    replacement: exact counts (block masks may fall short), every position equally
    likely, and scattered (many more components than block masks)."""
    from ibot_fast.config import build_config

    cfg = build_config("vit_small_16_paper", ["masks.pred_shape=rand", "data.path=x"]).masks
    sampler = sampler_from_config(cfg, (14, 14))
    assert isinstance(sampler, BlockMaskSampler) and sampler.shape == "rand"
    rng = random.Random(0)
    ratios = [sampler.draw_ratio(random.Random(i)) for i in range(2000)]
    masks = torch.stack([torch.from_numpy(sampler.one(random.Random(i)).reshape(-1))
                         for i in range(2000)])
    assert masks.sum(1).tolist() == [int(r * 196) for r in ratios]
    per_position = masks.float().mean(0)
    # 2000 crops at mean ratio ~0.15: each position's rate within 5 sd of the mean
    mean = per_position.mean()
    assert (per_position - mean).abs().max() < 5 * (mean * (1 - mean) / 2000) ** 0.5
    block = BlockMaskSampler((14, 14), 0.3, 0.0, seed=0)(50).numpy()
    scattered = BlockMaskSampler((14, 14), 0.3, 0.0, seed=0, shape="rand")(50).numpy()
    assert np.mean([components(m, (14, 14)) for m in scattered]) > \
        3 * np.mean([components(m, (14, 14)) for m in block])

    stratified = sampler_from_config(
        build_config("vit_small_16_paper", ["masks.pred_shape=rand", "data.path=x",
                                            "masks.sampler=stratified"]).masks, (14, 14))
    assert isinstance(stratified, StratifiedMaskSampler) and stratified.shape == "rand"
    drawn = [stratified(64, rng) for _ in range(5)]
    assert {int(m.sum()) for m in drawn} == {stratified.total(64)}
    masked = [m for m in drawn[0].numpy() if m.any()]
    assert np.mean([components(m, (14, 14)) for m in masked]) > 8  # scattered, not blocks
    with pytest.raises(ValueError, match="mask shape 'ring' is not one of block, rand"):
        BlockMaskSampler((14, 14), shape="ring")
