"""The fast path's masked-token head + loss against the official full-token path."""
import random

import pytest
import torch

from ibot_fast.config import build_config
from ibot_fast.loss import build_loss
from ibot_fast.masking import BlockMaskSampler, StratifiedMaskSampler, buffer_rows, masked_index
from ibot_fast.models import MaskedRows, build_student_teacher

B, L = 3, 2


def setup(dtype, shared_head=True, seed=0):
    cfg = build_config("demo", ["model.patch_size=4", "model.out_dim=64", "model.patch_out_dim=" +
                                ("64" if shared_head else "48"),
                                f"model.shared_head={shared_head}", "model.head_hidden_dim=32",
                                "model.head_bottleneck_dim=16", "model.drop_path_rate=0",
                                f"data.n_local={L}"])
    torch.manual_seed(seed)
    student, teacher = build_student_teacher(cfg)
    student, teacher = student.to(dtype), teacher.to(dtype)
    with torch.no_grad():  # a teacher that differs from the student, a non-zero mask token
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        student.backbone.mask_token.normal_()
        student.head.last_layer.weight_g.uniform_(0.5, 1.5)
    g = torch.randn(2 * B, 3, 32, 32, dtype=dtype)
    loc = torch.randn(L * B, 3, 16, 16, dtype=dtype)
    return cfg, student, teacher, g, loc


def draw_masks(kind):
    if kind == "iid":
        sampler = BlockMaskSampler(grid_size=(8, 8), pred_ratio=(0.0, 0.3),
                                   pred_ratio_var=(0.0, 0.2))
    else:
        sampler = StratifiedMaskSampler(grid_size=(8, 8), ratio_range=(0.1, 0.5))
    masks = sampler(2 * B, random.Random(3))
    masks[0, :3] = True  # at least one masked crop, one unmasked
    masks[1] = False
    return masks, buffer_rows(sampler, 2 * B)


def full_token(cfg, student, teacher, g, loc, masks, dtype):
    loss = build_loss(cfg, impl="reference").to(dtype)
    t_cls, t_patch, _ = teacher(g)
    s_cls, s_patch, _ = student(g, masks, loc)
    out = loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=3)
    grads = torch.autograd.grad(out["loss"], [p for p in student.parameters() if p.requires_grad])
    return out, grads, loss


def masked_path(cfg, student, teacher, g, loc, masks, rows, dtype, center2_from="all",
                fused=False):
    loss = build_loss(cfg, impl="fast").to(dtype)
    index, count = masked_index(masks, rows)
    masked = MaskedRows.from_masks(masks, index, count, index.numel(), dtype=dtype)
    t_cls, t_patch, patch_sum = teacher.forward_teacher_masked(g, masked, center2_from,
                                                               patch_features=fused)
    s_cls, s_patch, _ = student(g, masks, loc, masked=masked, patch_features=fused)
    last = None
    if fused:
        s_l, t_l = student.head.last_layer2, teacher.head.last_layer2
        last = ((s_l.weight_v, s_l.weight_g), (t_l.weight_v, t_l.weight_g))
    out = loss.forward_masked(s_cls, s_patch, t_cls, t_patch, masked.weight, count, 3,
                              patch_sum, last)
    grads = torch.autograd.grad(out["loss"], [p for p in student.parameters() if p.requires_grad])
    return out, grads, loss


@pytest.mark.parametrize("sampler", ["iid", "stratified"])
@pytest.mark.parametrize("shared_head", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_masked_path_equals_full_token_fp64(twins, sampler, shared_head, fused):
    """fp64 through the twins (the kernels themselves are tested against the twins)."""
    cfg, student, teacher, g, loc = setup(torch.float64, shared_head)
    masks, rows = draw_masks(sampler)
    ref, ref_grads, ref_loss = full_token(cfg, student, teacher, g, loc, masks, torch.float64)
    out, grads, loss = masked_path(cfg, student, teacher, g, loc, masks, rows, torch.float64,
                                   fused=fused)
    for key in ("loss", "cls", "patch"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-12)
    assert ref["patch"] > 0
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=name)
    torch.testing.assert_close(loss.center, ref_loss.center, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.center2, ref_loss.center2, rtol=1e-10, atol=1e-12)


def test_masked_path_through_the_kernels_fp32():
    """The same comparison in fp32 with the Triton kernels (interpreter on the CPU)."""
    cfg, student, teacher, g, loc = setup(torch.float32)
    masks, rows = draw_masks("iid")
    ref, ref_grads, ref_loss = full_token(cfg, student, teacher, g, loc, masks, torch.float32)
    for fused in (False, True):
        out, grads, loss = masked_path(cfg, student, teacher, g, loc, masks, rows,
                                       torch.float32, fused=fused)
        torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):  # fp32 sums in another order: scale-aware atol
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
        torch.testing.assert_close(loss.center2, ref_loss.center2, rtol=1e-4, atol=1e-6)


def test_center2_from_masked_is_the_mean_over_masked_rows(twins):
    cfg, student, teacher, g, loc = setup(torch.float64)
    masks, rows = draw_masks("iid")
    out, _, loss = masked_path(cfg, student, teacher, g, loc, masks, rows, torch.float64,
                               center2_from="masked")
    _, t_patch, _ = teacher(g)
    expected = 0.1 * t_patch[masks].mean(0)  # c2 = 0.9 * 0 + 0.1 * mean over masked tokens
    torch.testing.assert_close(loss.center2, expected, rtol=1e-10, atol=1e-12)


def test_row_weights_reproduce_the_official_average():
    masks = torch.zeros(4, 10, dtype=torch.bool)
    masks[0, :4] = True
    masks[3, 2:3] = True
    index, count = masked_index(masks, 64)
    rows = MaskedRows.from_masks(masks, index, count, 64)
    assert rows.weight[:4].tolist() == [1 / 16] * 4  # 1 / (2B * 4), 2B = 4 crops
    assert rows.weight[4].item() == 1 / 4 and rows.weight[5:].abs().sum() == 0
    assert rows.token_index().tolist() == [1, 2, 3, 4, 3 * 11 + 1 + 2]


def test_masked_path_with_sinkhorn_equals_full_token(twins):
    """Sinkhorn-Knopp over the masked rows only (padding rows excluded) gives the full-token
    path's loss and gradients, where the masks select the same rows."""
    cfg, student, teacher, g, loc = setup(torch.float64)
    cfg.loss.centering = "sinkhorn"
    masks, rows = draw_masks("iid")
    ref, ref_grads, _ = full_token(cfg, student, teacher, g, loc, masks, torch.float64)
    out, grads, _ = masked_path(cfg, student, teacher, g, loc, masks, rows, torch.float64)
    for key in ("loss", "cls", "patch"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
