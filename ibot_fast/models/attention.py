"""Attention backends: the only module that knows about them.

    math      explicit softmax(q k^T / sqrt(d)) v in the input dtype: the reference
    sdpa      torch.nn.functional.scaled_dot_product_attention (flash / cuDNN /
              memory-efficient kernels on a GPU, chosen by PyTorch)
    xformers  xformers.ops.memory_efficient_attention (optional; GPU only)
    auto      the fastest available: xformers or sdpa on a GPU, sdpa on the CPU

All take q, k, v as [B, heads, N, head_dim] and return the same layout.
"""
import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("math", "sdpa", "xformers")


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


_FUNCTIONS = {"math": math_attention, "sdpa": sdpa_attention, "xformers": xformers_attention}


def xformers_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops  # noqa: F401
        return True
    except Exception:
        return False


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn 'auto' into a concrete backend for this device and log why."""
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'")
    if name == "xformers" and not (device.type == "cuda" and xformers_available()):
        raise RuntimeError("attention=xformers needs a CUDA GPU and an importable xformers")
    if name != "auto":
        return name
    choice = "sdpa"
    reason = "PyTorch SDPA (flash/cuDNN/efficient kernels)" if device.type == "cuda" else \
        "CPU: SDPA (math kernel)"
    log.info("attention backend: %s (%s)", choice, reason)
    return choice


def attention(q, k, v, backend: str = "math"):
    """Multi-head attention on [B, heads, N, head_dim] tensors with the named backend."""
    return _FUNCTIONS[backend](q, k, v)
