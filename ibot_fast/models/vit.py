"""Vision Transformer backbone (docs/design.md §1.3), as iBOT uses it.

Pre-norm blocks, qkv bias, LayerNorm eps 1e-6, MLP ratio 4, GELU, a CLS token, learned
position embeddings (bicubic-interpolated for other grid sizes), stochastic depth, and a
learned mask token (zero-initialised) that replaces the patch embedding of every masked
patch *before* the position embedding is added and the CLS token is prepended.

Sizes (`ARCHS`): ViT-S/B/L as in the paper, ViT-T (the official code's `vit_tiny`, 5.5 M
parameters; no published iBOT recipe), and `vit_demo` for the CPU demo on 32 px
digits: dim 128, depth 4, 4 heads (0.8 M parameters); the `demo` preset's 8 px patches
make a 32 px global crop a 4x4 grid and a 16 px local crop 2x2, and an epoch of the
digits about 8 s on two CPU cores.

Activation checkpointing (`activation_checkpointing`, the student's memory knob). What
a block keeps for its backward, per token, in units of dim x 2 bytes (bf16 autocast,
counted by `tests/test_checkpointing.py`):
    none           16-18: LayerNorm inputs and outputs, qkv, attention output, the MLP's
                   hidden layer before and after GELU, casts
    selective      10: its input, qkv, the attention output, the attention's projection
                   and the MLP's hidden layer (the outputs of its matmuls and of attention);
                   LayerNorms, GELU, dtype casts, drop path and residual adds are
                   recomputed in the backward (elementwise: cheap). No matmul is recomputed
    selective_mlp  6: as selective, without the MLP's hidden layer (4 x dim, the largest
                   activation): its first matmul (fc1) runs again in the backward, 1/9 more
                   student matmul FLOPs
    full           1: only its input; the whole forward but its last matmul runs again in
                   the backward (about a third more FLOPs; DINOv2's `checkpointing`)
The block's last matmul (fc2) is neither kept nor recomputed: the checkpointed region
ends at its output (`Block.up_to_mlp`), the residual add after it runs outside
(`Block.add_mlp`), and torch stops recomputing once the backward's inputs exist again
(its default early stop; with it off, fc2 reruns in every mode). Random draws (drop
path) are replayed exactly, so all modes give the same gradients.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from .attention import Seqs, attention, packed_attention, split_qkv

CHECKPOINTING = ("none", "selective", "selective_mlp", "full")

ARCHS = {
    "vit_demo": dict(dim=128, depth=4, heads=4),
    "vit_tiny": dict(dim=192, depth=12, heads=3),
    "vit_small": dict(dim=384, depth=12, heads=6),
    "vit_base": dict(dim=768, depth=12, heads=12),
    "vit_large": dict(dim=1024, depth=24, heads=16),
}


def drop_path(x: torch.Tensor, p: float, training: bool, seqs: Seqs = None) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability p, rescale others.

    x is [B, ...] (one sample per row) or packed [T, dim] with `seqs` (one sample per
    sequence)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    # `rand < keep` rather than `bernoulli_(keep)`: under torch.compile the rate stays a
    # symbolic float, so the blocks' different rates share one compiled graph
    # (bernoulli_ would specialise it: a recompilation per block)
    if seqs is None:
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * ((torch.rand(shape, device=x.device) < keep).to(x.dtype) / keep)
    n = sum(count for count, _ in seqs.groups)
    mask = seqs.per_token((torch.rand(n, device=x.device) < keep).to(x.dtype) / keep)
    return x * mask[:, None]


_SAVED_OPS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "linear"}


def _keep_matmuls_and_attention(ctx, op, *args, recompute: frozenset = frozenset(),
                                **kwargs):
    """Selective checkpointing policy: keep what is expensive to recompute (matmuls, and
    attention kernels of any backend: SDPA's flash / efficient / cuDNN / CPU ones,
    xformers' ops, torch's varlen_attn), recompute the rest, and the matmuls (mm, addmm)
    whose weight operand has a shape in `recompute` ([in, out] pairs; by shape, so that it
    holds when torch.compile traces the policy)."""
    name = op.name() if hasattr(op, "name") else str(op)
    namespace, _, rest = name.partition("::")
    base = rest.split(".")[0]
    if recompute and base in ("mm", "addmm") and tuple(args[-1].shape[-2:]) in recompute:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if base in _SAVED_OPS or "attention" in base or "attn" in base or \
            namespace.startswith(("xformers", "torch_attn")):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _recomputed_matmuls(block: nn.Module, mode: str) -> frozenset:
    """Weight shapes ([in, out]) of the matmuls a selective mode does not keep: fc2 (it
    ends the checkpointed region and the backward never reads its output, so it is not
    recomputed either: torch stops recomputing once the backward's inputs exist again,
    unless `torch.utils.checkpoint.set_checkpoint_early_stop(False)`), and fc1 for
    `selective_mlp`. Shapes shared with qkv or proj (an MLP as wide as dim or 3 x dim) are
    left out: those matmuls are kept (`VisionTransformer` refuses selective_mlp there)."""
    dim, hidden = block.mlp.fc1.in_features, block.mlp.fc1.out_features
    shapes = {(hidden, dim)} | ({(dim, hidden)} if mode == "selective_mlp" else set())
    return frozenset(shapes - {(dim, 3 * dim), (dim, dim)})


def _selective_contexts(recompute: frozenset):
    policy = functools.partial(_keep_matmuls_and_attention, recompute=recompute)
    return create_selective_checkpoint_contexts(policy)


def _without_cast_cache(fn, x: torch.Tensor, seqs):
    """fn(x, seqs) with autocast's weight-cast cache off. Selective checkpointing
    replays the forward's ops in the backward and must meet the same casts: with the
    cache on, a block run twice in one autocast region (the global then the local crops,
    unpacked) casts its weights only the first time, its recomputation casts them again,
    and torch stops ("_to_copy encountered during backward but not found in storage")."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return fn(x, seqs)
    with torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False):
        return fn(x, seqs)


def run_block(block: nn.Module, x: torch.Tensor, seqs, mode: str) -> torch.Tensor:
    """block(x, seqs) with the named activation checkpointing (module docstring)."""
    if mode == "none" or not (block.training and torch.is_grad_enabled()):
        return block(x, seqs)
    if mode == "full":
        parts = checkpoint(block.up_to_mlp, x, seqs, use_reentrant=False)
    elif mode in ("selective", "selective_mlp"):
        contexts = functools.partial(_selective_contexts, _recomputed_matmuls(block, mode))
        parts = checkpoint(_without_cast_cache, block.up_to_mlp, x, seqs, use_reentrant=False,
                           context_fn=contexts)
    else:
        raise ValueError(f"activation_checkpointing={mode!r} is not one of "
                         f"{', '.join(CHECKPOINTING)}")
    return block.add_mlp(*parts, seqs)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (eps 1e-6) that can skip autocast's fp32 round trip (`fp32=False`).

    CUDA's autocast runs LayerNorm in fp32: the bf16 input is cast up (a copy that the
    LayerNorm keeps for its backward), the output leaves in fp32, and the next linear
    layer casts it back down; the backward casts its gradient twice more. With
    `fp32=False`, under autocast, a LayerNorm whose input is already in the autocast
    dtype reads and writes that dtype: the kernel still accumulates the mean and variance
    in fp32, and its output is rounded once, to the dtype the next matmul reads anyway.
    Per token and LayerNorm that saves two casts forward and two backward, and it keeps
    dim x 2 bytes for the backward instead of dim x 4 (two of a block's ~17 units,
    models/vit.py's docstring). What changes: weight and bias enter at the autocast
    dtype's precision (the CUDA kernel wants them in the input's dtype), and their
    gradients leave the kernel in it, as every linear layer's weight gradient does under
    autocast. An fp32 input (`residual_fp32`) or no autocast: plain nn.LayerNorm.
    The CPU's autocast runs LayerNorm in the input's dtype either way."""

    def __init__(self, dim: int, fp32: bool = True):
        super().__init__(dim, eps=1e-6)
        self.fp32 = fp32

    def forward(self, x):
        device = x.device.type
        if self.fp32 or not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        if x.dtype != dtype:
            return super().forward(x)
        with torch.autocast(device, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(dtype),
                                self.bias.to(dtype), self.eps)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, dim], row-major patches


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str = "math"):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, seqs: Seqs = None):
        """x [B, N, dim], or packed [T, dim] with `seqs` (attention within each sequence)."""
        if seqs is not None:
            return self.proj(packed_attention(self.qkv(x), seqs, self.heads, self.backend))
        B, N, C = x.shape
        out = attention(*split_qkv(self.qkv(x), B, N, self.heads), self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. Stochastic depth either multiplies the dropped
    samples' residual branch by zero (`efficient_drop_path=False`, the official way) or
    computes the branch only for a random subset of round(B (1 - p)) samples and adds it
    scaled by B / subset (DINOv2's way): the same in expectation, (1 - p) of the work."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 backend: str = "math", efficient_drop_path: bool = False,
                 layernorm_fp32: bool = True):
        super().__init__()
        self.norm1 = LayerNorm(dim, layernorm_fp32)
        self.attn = Attention(dim, heads, backend)
        self.norm2 = LayerNorm(dim, layernorm_fp32)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path
        self.efficient_drop_path = efficient_drop_path

    def forward(self, x, seqs: Seqs = None):
        return self.add_mlp(*self._up_to_mlp(x, seqs), seqs)

    def up_to_mlp(self, x, seqs: Seqs = None):
        """The block up to the MLP branch's output, where activation checkpointing ends:
        (x after the attention's residual add, the MLP branch's output on the rows it ran
        on, those rows and their scale (efficient drop path; None, None otherwise)).
        The entry point of `run_block`'s checkpointed modes: FSDP registers it as a
        forward method of the block, so it must not be called from `forward`."""
        return self._up_to_mlp(x, seqs)

    def _up_to_mlp(self, x, seqs: Seqs = None):
        attn = lambda y, s: self.attn(self.norm1(y), s)  # noqa: E731
        if not (self.training and self.drop_path > 0 and self.efficient_drop_path):
            x = x + drop_path(attn(x, seqs), self.drop_path, self.training, seqs)
            return x, self.mlp(self.norm2(x)), None, None
        rows, sub, scale = self._subset(x, seqs)
        x = add_rows(x, attn(x[rows], sub), rows, scale)
        rows, _, scale = self._subset(x, seqs)
        return x, self.mlp(self.norm2(x[rows])), rows, scale

    def add_mlp(self, x, out, rows, scale, seqs: Seqs = None):
        """The MLP's residual add (with its drop path): the end of `forward`."""
        if rows is not None:
            return add_rows(x, out, rows, scale)
        return x + drop_path(out, self.drop_path, self.training, seqs)

    def _subset(self, x, seqs):
        """(rows, their Seqs, scale) of DINOv2's stochastic depth: a random subset of
        round(B (1 - p)) samples, scaled by B / subset (one value per row: a sample, or a
        packed token; a tensor, so that torch.compile's symbolic sizes never become a
        Python float; in the stream's dtype, so that neither add_rows nor its backward
        casts it)."""
        keep = 1.0 - self.drop_path
        if seqs is None:
            B = x.shape[0]
            k = max(1, int(round(B * keep)))
            return (torch.randperm(B, device=x.device)[:k], None,
                    torch.full((k,), B / k, device=x.device, dtype=x.dtype))
        return seqs.sample(keep, x.device, x.dtype)


def _per_row(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """scale [rows] as [rows, 1, ...] in like's dtype, to broadcast over its rows."""
    return scale.to(like.dtype).view(-1, *(1,) * (like.dim() - 1))


@torch.library.custom_op("ibot_fast::add_rows", mutates_args=())
def add_rows(x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor,
             scale: torch.Tensor) -> torch.Tensor:
    """x with `out * scale` added to its `rows` (DINOv2's stochastic depth, out of place);
    scale: one value per row of `out`.

    torch.index_add keeps its whole `source` for the backward: one activation per residual
    branch and block that nothing else needs. This keeps only the rows and the scale. A
    custom op rather than an autograd.Function: torch.compile treats it as one opaque op,
    so symbolic subset sizes (dynamic shapes) pass through it."""
    return torch.index_add(x, 0, rows, out * _per_row(scale, x))


@add_rows.register_fake
def _add_rows_fake(x, out, rows, scale):
    return torch.empty_like(x)


def _add_rows_setup(ctx, inputs, output):
    _, out, rows, scale = inputs
    ctx.save_for_backward(rows, scale)
    ctx.out_dtype = out.dtype


def _add_rows_backward(ctx, grad):
    rows, scale = ctx.saved_tensors  # read once (checkpointing allows one unpack)
    d_out = grad.index_select(0, rows) * _per_row(scale, grad)
    return grad, d_out.to(ctx.out_dtype), None, None


add_rows.register_autograd(_add_rows_backward, setup_context=_add_rows_setup)


def resize_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[1, 1 + side^2, dim] position embeddings (CLS first, a square grid) for an h x w
    grid: the patch part resized bicubically in fp32, the CLS part kept.

    As the official DINO/iBOT (and DINOv2) code does, the scale factor is given, not the
    size: (h + 0.1) / side, so the output samples the grid every side / (h + 0.1) cells
    (14 -> 6 for 96 px local crops: a step of 2.30 cells, where size=(6, 6) would step
    by 2.33 and give other values), and the + 0.1 keeps floor(side x scale) at h."""
    side = int(math.sqrt(pos_embed.shape[1] - 1))
    if h == side and w == side:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), scale_factor=((h + 0.1) / side,
                                                               (w + 0.1) / side),
                              mode="bicubic", align_corners=False).to(patch_pos.dtype)
    assert patch_pos.shape[-2:] == (h, w), (patch_pos.shape, h, w)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionTransformer(nn.Module):
    """ViT backbone returning all tokens after the final LayerNorm: [B, 1 + h*w, dim]."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, dim: int = 384,
                 depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, attention_backend: str = "math",
                 efficient_drop_path: bool = False, pack_crops: bool = False,
                 activation_checkpointing: str = "none", residual_fp32: bool = False,
                 layernorm_fp32: bool = True):
        super().__init__()
        if activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing={activation_checkpointing!r} is "
                             f"not one of {', '.join(CHECKPOINTING)}")
        if activation_checkpointing == "selective_mlp" and int(dim * mlp_ratio) in (dim, 3 * dim):
            raise ValueError("activation_checkpointing=selective_mlp finds fc1 by its shape, "
                             f"which mlp_ratio={mlp_ratio} shares with qkv or proj: use "
                             "selective or full")
        self.activation_checkpointing = activation_checkpointing
        self.patch_size = patch_size
        self.embed_dim = dim
        self.num_heads = heads
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # official: `masked_embed`
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, rates[i], attention_backend, efficient_drop_path,
                  layernorm_fp32)
            for i in range(depth))
        self.pack_crops = pack_crops
        self.residual_fp32 = residual_fp32
        # how each block runs: `run_block`, or its compiled twin (ibot_fast.compiling:
        # one compiled function that every block of the model, and the teacher's, reuse)
        self.block_runner = run_block
        self.norm = LayerNorm(dim, layernorm_fp32)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_attention_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid (bicubic from the trained grid)."""
        return resize_pos_embed(self.pos_embed, h, w)

    def prepare_tokens(self, x: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        """Patch-embed, apply the mask token, prepend CLS, add position embeddings.

        mask: bool [B, h*w] (row-major patches) or None.
        The tokens leave in the patch embedding's dtype (bf16 under bf16 autocast, so the
        residual stream runs in bf16, as in DINOv2), or, with `residual_fp32`, in fp32 at
        least: the official iBOT code under AMP, where adding the fp32 position embedding
        promotes the stream and every block's residual add keeps it in fp32.
        """
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)
        if self.residual_fp32:
            x = x.to(torch.promote_types(x.dtype, torch.float32))
        if mask is not None:
            # torch.where keeps the mask token in the graph even when nothing is masked,
            # so its gradient is always defined (DDP sees it used every step).
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.interpolate_pos_embed(h, w).to(x.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        x = self.prepare_tokens(x, mask)
        for block in self.blocks:
            x = self.block_runner(block, x, None, self.activation_checkpointing)
        return self.norm(x)

    def forward_crops(self, global_crops: torch.Tensor, masks: torch.Tensor = None,
                      local_crops: torch.Tensor = None):
        """Tokens of the global crops (masked) and of the local crops (None when absent).

        With `pack_crops`, both resolutions run through the blocks as one packed
        sequence (`Seqs`): one matmul per linear layer for all crops, attention within
        each image. Otherwise two passes.
        """
        if local_crops is None or local_crops.shape[0] == 0:
            return self(global_crops, masks), None
        if not self.pack_crops:
            return self(global_crops, masks), self(local_crops)
        tg = self.prepare_tokens(global_crops, masks)
        tl = self.prepare_tokens(local_crops)
        seqs = Seqs([(tg.shape[0], tg.shape[1]), (tl.shape[0], tl.shape[1])])
        x = torch.cat([tg.reshape(-1, tg.shape[-1]), tl.reshape(-1, tl.shape[-1])])
        for block in self.blocks:
            x = self.block_runner(block, x, seqs, self.activation_checkpointing)
        x = self.norm(x)
        out_g, out_l = seqs.split(x)
        return out_g, out_l

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1):
        """Normalised outputs of the last n blocks (for linear probing)."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs


def vit(arch: str, img_size: int, patch_size: int, **options) -> VisionTransformer:
    """The `ARCHS` entry `arch`; `options` are VisionTransformer's keyword arguments."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHS)}")
    return VisionTransformer(img_size=img_size, patch_size=patch_size, **ARCHS[arch],
                             **options)
