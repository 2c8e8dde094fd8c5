"""Backbone + head, and the builders the trainer uses.

`IBOTNet` is one network (student or teacher). Crops are passed crop-major: all images of
global crop 0, then of global crop 1 (`[2B, 3, H, W]`), and the local crops likewise
(`[L*B, 3, h, w]`).
"""
import copy

import torch
import torch.nn as nn

from .head import IBOTHead, WeightNormLinear
from .vit import ARCHS, VisionTransformer, vit

__all__ = ["ARCHS", "IBOTHead", "IBOTNet", "VisionTransformer", "WeightNormLinear",
           "build_backbone", "build_student_teacher"]


class IBOTNet(nn.Module):
    def __init__(self, backbone: VisionTransformer, head: IBOTHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, global_crops, masks=None, local_crops=None):
        """The official full-token path: the head runs on every token of every crop.

        Returns (cls [(2+L)*B, K] crop-major, patch [2B, N, K2] of the global crops).
        """
        cls, patch = self.head(self.backbone(global_crops, mask=masks))
        if local_crops is not None and local_crops.shape[0] > 0:
            local_cls, _ = self.head(self.backbone(local_crops))  # patch logits discarded
            cls = torch.cat([cls, local_cls])
        return cls, patch


def build_backbone(cfg, drop_path_rate: float = 0.0, attention_backend: str = "math"):
    return vit(cfg.model.arch, cfg.data.global_size, cfg.model.patch_size,
               drop_path_rate=drop_path_rate, attention_backend=attention_backend)


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
    for block in teacher.backbone.blocks:
        block.drop_path = 0.0
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher
