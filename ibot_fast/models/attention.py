"""Attention backends: the only module that knows about them.

    math      explicit softmax(q k^T / sqrt(d)) v in the input dtype: the reference
    sdpa      torch.nn.functional.scaled_dot_product_attention (flash / cuDNN /
              memory-efficient kernels on a GPU, chosen by PyTorch; math on the CPU)
    xformers  xformers.ops.memory_efficient_attention (optional; CUDA only)
    varlen    packed sequences: one flash-attention call over all of them with their
              cumulative lengths (torch.nn.attention.varlen.varlen_attn, torch >= 2.10,
              CUDA only), so no per-group split and no `cat`; dense calls: sdpa. Chosen
              by name only (`auto` does not measure packed attention)
    auto      CPU: sdpa. GPU: each available backend is timed once at start-up on a
              forward + backward of ViT-sized attention (`measure_backends`), the fastest
              is kept, and the choice and the timings are logged.

Packed sequences (`Seqs`): the student's global crops (197 tokens each at 224 px) and
local crops (37 tokens at 96 px) travel as one [T, dim] tensor through the LayerNorms,
linear layers and MLPs, and attention is restricted to each image's own tokens:
- xformers: one call with a block-diagonal mask (`BlockDiagonalMask.from_seqlens`);
- varlen: one call over all sequences (`cu_seqlens` from `Seqs`, made on the device);
- sdpa / math: one dense call per group of equal-length sequences (a view of the packed
  tensor, no mask, no padding): block-diagonal by construction.

Copies of token-sized tensors around attention, per call (pinned by
tests/test_attention.py, counted op by op; CUDA's counted by the profiler in a gpu-marked
test). q, k and v are strided views of the qkv projection ([.., 3, heads, head_dim]
unbound, the heads moved by a transpose), which the fused kernels read as they are:
SDPA's flash, cuDNN and memory-efficient kernels on CUDA and its flash kernel on the CPU
need only a contiguous last dimension, and xformers and varlen take the token-major
layout itself. Those kernels write their output token-major ([.., N, heads, head_dim]
under the [.., heads, N, head_dim] view), so the reshape that feeds the output
projection is a view too. What remains:
- forward: nothing (one sequence group, or varlen); one `cat` of the groups' outputs
  per call with dense per-group kernels (each kernel allocates its own output);
- backward: one copy, the `stack` of dq, dk, dv into the projection's layout (the
  kernels return them as three tensors); for packed groups each group's stack writes
  its rows of one gradient buffer (`_GroupViews`), so the groups are never
  concatenated.
The `math` backend (the explicit softmax of the official code) copies more: its batched
matmuls need contiguous operands (4 copies forward, 1 more backward, per call).
"""
import functools
import logging
import math
import time
from typing import List, Tuple

import torch
import torch.nn.functional as F

from ibot_fast import UserError

log = logging.getLogger(__name__)

BACKENDS = ("math", "sdpa", "xformers", "varlen")


class Seqs:
    """Groups of equal-length sequences packed back to back: [(count, length), ...]."""

    def __init__(self, groups: List[Tuple[int, int]]):
        self.groups = [(int(n), int(length)) for n, length in groups if n > 0]
        self.total = sum(n * length for n, length in self.groups)

    def split(self, x: torch.Tensor):
        """Per-group views [count, length, ...] of a packed [T, ...] tensor. One
        `split` rather than slices: its backward concatenates the groups' gradients in one
        write, where each slice's backward would zero-fill a whole [T, ...] tensor first."""
        parts = x.split([n * length for n, length in self.groups])
        return [part.view(n, length, *x.shape[1:])
                for part, (n, length) in zip(parts, self.groups)]

    def seqlens(self):
        return [length for n, length in self.groups for _ in range(n)]

    def cu_seqlens(self, device) -> torch.Tensor:
        """int32 [sequences + 1]: where each sequence starts in the packed tensor, then T.
        Made on the device (aranges, no copy from the host: no sync inside the step), and
        not cached (a cache filled inside a checkpointed block breaks torch.compile's
        graph); a few tiny kernels per call."""
        starts, start = [], 0
        for n, length in self.groups:
            starts.append(torch.arange(start, start + n * length, length, dtype=torch.int32,
                                       device=device))
            start += n * length
        starts.append(torch.full((1,), start, dtype=torch.int32, device=device))
        return torch.cat(starts)

    def per_token(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """Expand one value per sequence (in packed order) to one per token; constant
        repeats per group, so nothing is copied from the host (no sync)."""
        parts, start = [], 0
        for n, length in self.groups:
            parts.append(per_sequence[start:start + n].repeat_interleave(length, dim=0))
            start += n
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def sample(self, keep: float, device, dtype=torch.float32):
        """A random subset of round(count * keep) sequences per group (at least one).

        Returns (token rows [T_sub] int64 into the packed tensor, the subset's Seqs,
        scale [T_sub] = count / kept of the row's group, in `dtype`) for DINOv2-style
        stochastic depth.
        """
        rows, groups, scales, start = [], [], [], 0
        for n, length in self.groups:
            k = max(1, int(round(n * keep)))
            chosen = torch.randperm(n, device=device)[:k]
            tokens = (chosen[:, None] * length + torch.arange(length, device=device)).reshape(-1)
            rows.append(start + tokens)
            groups.append((k, length))
            scales.append(torch.full((k * length,), n / k, device=device, dtype=dtype))
            start += n * length
        return torch.cat(rows), Seqs(groups), torch.cat(scales)


def math_attention(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return attn @ v


def sdpa_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def xformers_attention(q, k, v):
    import xformers.ops as xops

    # xformers takes [B, N, heads, head_dim]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2))
    return out.transpose(1, 2)


_FUNCTIONS = {"math": math_attention, "sdpa": sdpa_attention, "xformers": xformers_attention,
              "varlen": sdpa_attention}


def attention(q, k, v, backend: str = "math"):
    """Multi-head attention on [B, heads, N, head_dim] tensors with the named backend."""
    return _FUNCTIONS[backend](q, k, v)


def split_qkv(qkv: torch.Tensor, n: int, length: int, heads: int):
    """q, k, v [n, heads, length, head_dim]: views of a qkv projection [n, length, 3 dim]
    (or [n * length, 3 dim]). Unbinding the q/k/v axis before moving the heads keeps
    the backward to one copy: autograd stacks dq, dk, dv straight into the projection's
    layout. (Indexing qkv[0], qkv[1], qkv[2] would zero-fill three full-size gradients
    and add them; unbinding after the permute would stack and then copy once more.)"""
    q, k, v = qkv.reshape(n, length, 3, heads, -1).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class _GroupViews(torch.autograd.Function):
    """q, k, v of every group of packed sequences, as `split_qkv` views
    [count, heads, length, head_dim] of the packed projection [T, 3 dim], in group order
    (q, k, v of the first group, then of the second, ...).

    The backward writes each group's dq, dk, dv straight into its rows of one [T, 3 dim]
    gradient (`stack` with `out=`): one copy in all, the one each attention call needs
    anyway. Autograd's own views (`split`, then `unbind` per group) would stack every
    group's gradient and then concatenate the groups: a second copy of the whole qkv
    gradient in every block. Traced by torch.compile as it is (no graph break)."""

    @staticmethod
    def forward(ctx, qkv, groups, heads):
        ctx.groups, ctx.heads, ctx.shape = groups, heads, qkv.shape
        views, start = [], 0
        for n, length in groups:
            views += split_qkv(qkv[start:start + n * length], n, length, heads)
            start += n * length
        return tuple(views)

    @staticmethod
    def backward(ctx, *grads):
        d_qkv = grads[0].new_empty(ctx.shape)
        start = 0
        for i, (n, length) in enumerate(ctx.groups):
            rows = d_qkv[start:start + n * length].view(n, length, 3, ctx.heads, -1)
            torch.stack([g.transpose(1, 2) for g in grads[3 * i:3 * i + 3]], dim=2, out=rows)
            start += n * length
        return d_qkv, None, None


def packed_attention(qkv: torch.Tensor, seqs: Seqs, heads: int, backend: str) -> torch.Tensor:
    """Attention of packed tokens within their own sequence: qkv [T, 3 * dim] -> [T, dim]."""
    T, three_dim = qkv.shape
    dim = three_dim // 3
    head_dim = dim // heads
    if backend == "xformers":
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        q, k, v = qkv.view(1, T, 3, heads, head_dim).unbind(2)
        bias = BlockDiagonalMask.from_seqlens(seqs.seqlens())
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias).reshape(T, dim)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = qkv.view(T, 3, heads, head_dim).unbind(1)  # [T, heads, head_dim] each
        cu = seqs.cu_seqlens(qkv.device)
        longest = max(length for _, length in seqs.groups)
        return varlen_attn(q, k, v, cu, cu, longest, longest).reshape(T, dim)
    views = _GroupViews.apply(qkv, seqs.groups, heads)
    outs = []
    for i, (n, length) in enumerate(seqs.groups):
        out = attention(*views[3 * i:3 * i + 3], backend)  # [n, heads, length, d]
        outs.append(out.transpose(1, 2).reshape(n * length, dim))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


@functools.lru_cache(maxsize=None)
def xformers_status() -> tuple:
    """(usable, why not): xformers importable *and* able to run on this CUDA device.

    A wheel built for another torch/CUDA imports fine but has no CUDA kernels (seen on an
    H100 with torch 2.11+cu130 and the registry's xformers 0.0.35: "No operator found for
    memory_efficient_attention_forward"), so one tiny call decides."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    try:
        import xformers
        import xformers.ops as xops
    except Exception as e:
        return False, f"xformers not importable ({type(e).__name__})"
    try:
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
        return True, ""
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, f"xformers {getattr(xformers, '__version__', '?')} cannot run on " \
                      f"this GPU/torch ({first})"


def xformers_available() -> bool:
    return xformers_status()[0]


def varlen_status(device: torch.device) -> tuple:
    """(usable, why not) of the varlen backend on this device: importable *and* able to run
    (one tiny bf16 call: flash attention needs compute capability 8.0 or more)."""
    if device.type != "cuda":
        return False, "torch's varlen_attn runs on CUDA GPUs only"
    return _varlen_probe(str(device))


@functools.lru_cache(maxsize=None)
def _varlen_probe(device: str) -> tuple:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as e:
        return False, f"torch {torch.__version__} has no torch.nn.attention.varlen ({e})"
    try:
        q = torch.zeros(4, 1, 64, device=device, dtype=torch.bfloat16)
        cu = torch.tensor([0, 4], device=device, dtype=torch.int32)
        varlen_attn(q, q, q, cu, cu, 4, 4)
        return True, ""
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, f"varlen_attn cannot run on this GPU/torch ({first})"


def measure_backends(device: torch.device, heads: int, head_dim: int, candidates,
                     n_seqs: int = 64, seq_len: int = 197, reps: int = 5) -> dict:
    """Median ms of a bf16 forward + backward per backend on [n_seqs, heads, seq_len, d]."""
    times = {}
    for name in candidates:
        q, k, v = (torch.randn(n_seqs, heads, seq_len, head_dim, device=device,
                               dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        try:
            runs = []
            for i in range(reps + 2):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                attention(q, k, v, name).sum().backward()
                torch.cuda.synchronize(device)
                if i >= 2:
                    runs.append((time.perf_counter() - t0) * 1e3)
            times[name] = sorted(runs)[len(runs) // 2]
        except Exception as e:  # a backend that cannot run here is simply not chosen
            log.info("attention backend %s unavailable: %s", name, e)
    return times


def resolve_backend(name: str, device: torch.device, heads: int = 6,
                    head_dim: int = 64, packed: bool = True, low_precision: bool = True) -> str:
    """Turn 'auto' into a concrete backend for this device, and log the choice and why."""
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'")
    if name == "xformers" and not (device.type == "cuda" and xformers_available()):
        raise UserError(f"attention=xformers needs a CUDA GPU and a working xformers: "
                        f"{xformers_status()[1]}")
    if name == "varlen":
        if not packed:
            raise UserError("attention=varlen works on packed crops: set model.pack_crops=true "
                            "(or use sdpa)")
        if not low_precision:
            raise UserError("attention=varlen (flash attention) needs bf16 or fp16: set "
                            "train.precision, or use sdpa")
        if not varlen_status(device)[0]:
            raise UserError(f"attention=varlen: {varlen_status(device)[1]}; use sdpa")
    if name != "auto":
        log.info("attention backend: %s (configured)", name)
        return name
    if device.type != "cuda":
        log.info("attention backend: sdpa (CPU: no xformers kernels; SDPA's math kernel)")
        return "sdpa"
    candidates = ["sdpa"] + (["xformers"] if xformers_available() else [])
    if not xformers_available():
        log.info("attention backend xformers not measured: %s", xformers_status()[1])
    times = measure_backends(device, heads, head_dim, candidates)
    choice = min(times, key=times.get) if times else "math"
    log.info("attention backend: %s (measured fwd+bwd, ms: %s)", choice,
             ", ".join(f"{k} {v:.2f}" for k, v in times.items()))
    return choice
