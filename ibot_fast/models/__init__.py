"""Backbone + head, and the builders the trainer uses.

`IBOTNet` is one network (student or teacher). Crops are passed crop-major: all images of
global crop 0, then of global crop 1 (`[2B, 3, H, W]`), and the local crops likewise
(`[L*B, 3, h, w]`).

Two head paths:
- the official full-token path (`forward` without `masked`): the head runs on every token
  of every crop and the loss keeps the masked patches of the global crops;
- the masked path of the fast trainer (`forward(..., masked=MaskedRows)`): the head runs
  on the CLS tokens and on the masked patch tokens only, gathered into a fixed-size row
  buffer by `ibot_fast.kernels.gather_masked`; local crops never see the patch head.
"""
import contextlib
import copy
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..phases import phase
from .head import IBOTHead, WeightNormLinear
from .vit import ARCHS, VisionTransformer, vit

__all__ = ["ARCHS", "IBOTHead", "IBOTNet", "MaskedRows", "NetOutputs", "TeacherOutputs",
           "VisionTransformer", "WeightNormLinear", "build_backbone", "build_student_teacher"]


class NetOutputs(NamedTuple):
    """What `IBOTNet.forward` returns."""
    cls: torch.Tensor  # [(2+L)B, K] CLS logits, crop-major
    patch: torch.Tensor  # [2B, N, K2] every patch (full-token path) or [M, K2] masked rows
    backbone_cls: torch.Tensor  # [2B, dim] backbone CLS tokens of the global crops (KoLeo)


class TeacherOutputs(NamedTuple):
    """What `IBOTNet.forward_teacher_masked` returns."""
    cls: torch.Tensor  # [2B, K]
    patch: torch.Tensor  # [M, K2] masked rows (or their bottleneck features)
    patch_sum: Optional[torch.Tensor]  # [K2] the patch center's statistic, or None


@dataclass
class MaskedRows:
    """The masked patch tokens of the global crops, as rows of a fixed-size buffer.

    index:  int64 [count], flat positions `b * N + i` of the masked patches (b over 2B)
    rows:   M >= count, the buffer size (fixed per run: static shapes); rows past count
            are padding
    weight: fp32 [M], the row's share of the MIM loss, 1 / (2B * max(1, masked patches of
            its crop)); 0 on padding rows. With it, the sum over rows of weight * CE equals
            the official mean over crops and images of the mask-weighted patch mean.
    """
    index: torch.Tensor
    rows: int
    weight: torch.Tensor
    num_patches: int

    @classmethod
    def from_masks(cls, masks: torch.Tensor, index: torch.Tensor, count: int, rows: int,
                   dtype=torch.float32):
        """masks [2B, N] bool and the data path's padded index (valid up to count)."""
        n_crops, N = masks.shape
        index = index[:count]
        per_crop = masks.sum(1).clamp(min=1).to(dtype)
        weight = torch.zeros(rows, dtype=dtype, device=masks.device)
        weight[:count] = 1.0 / (per_crop[index // N] * n_crops)
        return cls(index=index, rows=rows, weight=weight, num_patches=N)

    def token_index(self) -> torch.Tensor:
        """The same positions in the backbone's [2B, 1 + N] token layout (CLS first)."""
        return self.index + self.index // self.num_patches + 1


class IBOTNet(nn.Module):
    def __init__(self, backbone: VisionTransformer, head: IBOTHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, global_crops, masks=None, local_crops=None, masked: MaskedRows = None,
                patch_features: bool = False) -> NetOutputs:
        """Student (or teacher with masks=None, local_crops=None): `NetOutputs`.

        Without `masked`, the official full-token path: cls [(2+L)*B, K] crop-major,
        patch [2B, N, K2] for every patch of the global crops.
        With `masked`, the head runs on [CLS tokens ; masked patch tokens] only: patch
        [M, K2] for the masked rows, or with `patch_features` the rows' bottleneck
        features [M, bottleneck] (for the fused last layer + loss). `backbone_cls`: the
        backbone's CLS tokens of the global crops [2B, dim] (after the final norm; the
        KoLeo term's input), a view.
        """
        if masked is None:
            tokens_g = self.backbone(global_crops, mask=masks)
            with head_phase():
                cls, patch = self.head(tokens_g)
            if local_crops is not None and local_crops.shape[0] > 0:
                tokens_l = self.backbone(local_crops)
                with head_phase():
                    local_cls, _ = self.head(tokens_l)  # patch logits unused
                cls = torch.cat([cls, local_cls])
            return NetOutputs(cls, patch, tokens_g[:, 0])
        tokens_g, tokens_l = self.backbone.forward_crops(global_crops, masks, local_crops)
        with head_phase():
            rows = [tokens_g[:, 0]] + ([tokens_l[:, 0]] if tokens_l is not None else [])
            rows.append(gather_masked(tokens_g, masked.token_index(), masked.rows))
            z = self.head.features(torch.cat(rows))
            n_cls = z.shape[0] - masked.rows
            patch = z[n_cls:] if patch_features else self.head.last_layer2(z[n_cls:])
            cls = self.head.last_layer(z[:n_cls])
        return NetOutputs(cls, patch, tokens_g[:, 0])

    @torch.no_grad()
    def forward_teacher_masked(self, global_crops, masked: MaskedRows, center2_from: str,
                               patch_features: bool = False) -> TeacherOutputs:
        """The teacher on the masked path: `TeacherOutputs` (cls [2B, K], patch rows
        [M, K2] (or features), patch_sum [K2] or None).

        center2_from="all" (official): the head MLP runs on every patch token so that
        patch_sum, the sum over crops of the mean teacher patch logit, can feed center2;
        the 8192-wide last layer still runs on the masked rows only, because the logits
        are linear in the features: sum_i W z_i = W sum_i z_i.
        center2_from="masked" (DINOv2): the head runs on [CLS ; masked rows] only and
        patch_sum is None (the loss takes the masked rows' column sum instead).
        """
        tokens = self.backbone(global_crops)
        with head_phase():
            return self._teacher_heads(tokens, masked, center2_from, patch_features)

    def _teacher_heads(self, tokens, masked, center2_from, patch_features):
        if center2_from == "all":
            z = self.head.features(tokens)
            cls = self.head.last_layer(z[:, 0])
            rows = gather_masked(z, masked.token_index(), masked.rows)
            acc = torch.promote_types(z.dtype, torch.float32)  # fp32, or fp64 in tests
            mean_z = z[:, 1:].to(acc).mean(1).sum(0)
            patch_sum = F.linear(mean_z, self.head.last_layer2.weight().to(acc))
        else:
            n = tokens.shape[0]
            z = self.head.features(torch.cat(
                [tokens[:, 0], gather_masked(tokens, masked.token_index(), masked.rows)]))
            cls, rows, patch_sum = self.head.last_layer(z[:n]), z[n:], None
        patch = rows if patch_features else self.head.last_layer2(rows)
        return TeacherOutputs(cls, patch, patch_sum)


def backbone_state_dict(net_state: dict) -> dict:
    """The backbone's entries of an IBOTNet state dict, without the `backbone.` prefix."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in net_state.items() if k.startswith(prefix)}


def gather_masked(tokens, index, out_rows):
    """`ibot_fast.kernels.gather_masked`, imported on first use (Triton is not needed to
    import the models: the reference path and CPU-only machines without it still work)."""
    from ibot_fast.kernels import gather_masked as gather

    return gather(tokens, index, out_rows)


def head_phase():
    """Named phase around the head (benchmarks report its share of the step); nothing
    inside torch.compile, which would otherwise break the graph there."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return phase("head")


# `model.*` keys that are VisionTransformer's keyword arguments of the same name: a new
# backbone option is a config key, a VisionTransformer argument and a name here
BACKBONE_KEYS = ("efficient_drop_path", "pack_crops", "activation_checkpointing",
                 "residual_fp32", "layernorm_fp32")


def build_backbone(cfg, drop_path_rate: float = 0.0, attention_backend: str = "math"):
    m = cfg.model
    return vit(m.arch, cfg.data.global_size, m.patch_size, drop_path_rate=drop_path_rate,
               attention_backend=attention_backend,
               **{key: getattr(m, key) for key in BACKBONE_KEYS})


def build_head(cfg) -> IBOTHead:
    m = cfg.model
    return IBOTHead(ARCHS[m.arch]["dim"], out_dim=m.out_dim, patch_out_dim=m.patch_out_dim,
                    hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim,
                    nlayers=m.head_layers, shared_head=m.shared_head,
                    norm_last_layer=m.norm_last_layer)


def build_student_teacher(cfg, attention_backend: str = "math"):
    """Student (with stochastic depth) and teacher (without; a copy, no gradients)."""
    student = IBOTNet(build_backbone(cfg, cfg.model.drop_path_rate, attention_backend),
                      build_head(cfg))
    teacher = copy.deepcopy(student)
    teacher.backbone.activation_checkpointing = "none"  # no backward to save memory for
    for block in teacher.backbone.blocks:
        block.drop_path = 0.0
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher
