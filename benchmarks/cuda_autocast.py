"""CUDA autocast's float32 policy, replayed on the CPU, so that a memory count made on the
CPU keeps the tensors a GPU keeps.

The two autocasts agree on the matmuls (linear, conv, bmm, SDPA: bf16) but not on the
rest. CUDA's runs LayerNorm in fp32 (the bf16 input is cast up, the output stays fp32:
the LayerNorm keeps that fp32 copy for its backward and the next linear casts its output
back down), and softmax, log_softmax, sums and norms produce fp32; the CPU's runs all of
these in the input's dtype. A count on the CPU therefore missed a GPU's fp32 copies
(on the code the H100 measured, its allocator peaks were 8-25% above the CPU-policy
counts, and within 6% of the counts under this policy: benchmarks/results/README.md).

`CudaAutocastPolicy` is a TorchFunctionMode: while it and a CPU autocast region are
active, the ops of CUDA's lists below get CUDA's treatment: the "fp32" ops see their
low-precision floating inputs cast to fp32 (an ordinary autograd cast, as CUDA's
autocast makes above autograd, so the backward's saved tensors are the GPU's), the
"fp32 output" ops get `dtype=torch.float32` when the caller gave none. The lists are
PyTorch's (`AT_FORALL_FP32`, `AT_FORALL_FP32_SET_OPT_DTYPE` in aten's
autocast_mode.h), restricted to what Python code reaches by name; the matmul list needs
nothing, as the CPU's autocast already casts those. It intercepts Python-level calls
(F.layer_norm, Tensor.softmax, torch.sum, ...), which is where this project's code calls
them; ops reached from inside C++ composites are not seen.

    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy():
        y = F.layer_norm(x_bf16, ...)   # fp32, as on a GPU
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# CUDA: cast low-precision inputs to fp32, run in fp32 (AT_FORALL_FP32)
FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus",
    "layer_norm", "group_norm", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist",
    "renorm", "logsumexp", "interpolate", "upsample",
})
# CUDA: an fp32 output unless the caller asked for a dtype (AT_FORALL_FP32_SET_OPT_DTYPE,
# and norm, which autocast gives an fp32 dtype argument)
FP32_OUTPUT = frozenset({
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "vector_norm", "matrix_norm",
    "sum", "norm",
})
_LOW = (torch.float16, torch.bfloat16)


def _low(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in _LOW


def _up(t):
    return t.float() if _low(t) else t


def _normalize(input, p=2.0, dim=1, eps=1e-12, out=None):
    """F.normalize as CUDA's autocast runs it: the norm in fp32 (so the quotient, and
    the output, are fp32); the division keeps its low-precision input for its backward."""
    denom = input.norm(p, dim, keepdim=True, dtype=torch.float32).clamp_min(eps)
    return input / denom.expand_as(input)


class CudaAutocastPolicy(TorchFunctionMode):
    """While active inside a CPU autocast region, ops follow CUDA autocast's fp32 lists
    (module docstring). Outside autocast it changes nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not torch.is_autocast_enabled("cpu") or not name:
            return func(*args, **kwargs)
        if name == "normalize" and func is F.normalize and args and _low(args[0]):
            return _normalize(*args, **kwargs)
        if name in FP32 and any(_low(a) for a in (*args, *kwargs.values())):
            args = tuple(_up(a) for a in args)
            kwargs = {k: _up(v) for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        if name in FP32_OUTPUT and args and _low(args[0]) and kwargs.get("dtype") is None:
            kwargs["dtype"] = torch.float32
            return func(*args, **kwargs)
        return func(*args, **kwargs)
