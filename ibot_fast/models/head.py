"""The iBOT projection head (docs/design.md §1.3).

    tokens -> MLP (dim -> hidden -> hidden -> bottleneck, GELU) -> L2-normalise
           -> CLS token:   last_layer   weight-normalised Linear(bottleneck, K,  no bias)
           -> patch tokens: last_layer2 weight-normalised Linear(bottleneck, K2, no bias)
              (last_layer2 *is* last_layer when shared_head is true)

The MLP is shared by CLS and patch tokens. The weight-normalised layer keeps the official
parameter names `weight_g` [K, 1] and `weight_v` [K, bottleneck]; W = g * v / ||v||_row.
With `norm_last_layer` the scale g stays frozen at 1.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Linear(in, out, bias=False) with weight = g * v / ||v|| per output row."""

    def __init__(self, in_features: int, out_features: int, freeze_g: bool):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not freeze_g)
        # nn.Linear's default init for v, as the official head (weight_norm over a Linear)
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def weight(self) -> torch.Tensor:
        """g v / ||v|| in fp32 at least (FSDP under bf16 hands over bf16 copies of g, v)."""
        acc = torch.promote_types(self.weight_v.dtype, torch.float32)
        v = self.weight_v.to(acc)
        return self.weight_g.to(acc) * v / v.norm(dim=1, keepdim=True)

    def forward(self, x):
        return F.linear(x, self.weight().to(x.dtype))


class IBOTHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 8192, patch_out_dim: int = 8192,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3,
                 shared_head: bool = True, norm_last_layer: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_g=norm_last_layer)
        self.shared_head = shared_head
        if shared_head:
            if patch_out_dim != out_dim:
                raise ValueError("shared_head needs patch_out_dim == out_dim")
            self.last_layer2 = self.last_layer
        else:
            self.last_layer2 = WeightNormLinear(bottleneck_dim, patch_out_dim,
                                                freeze_g=norm_last_layer)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """MLP then L2-normalise: the bottleneck features fed to the last layer(s)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, tokens: torch.Tensor):
        """tokens [B, 1+N, dim] -> (CLS logits [B, K], patch logits [B, N, K2])."""
        z = self.features(tokens)
        return self.last_layer(z[:, 0]), self.last_layer2(z[:, 1:])
