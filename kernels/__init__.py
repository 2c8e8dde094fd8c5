"""Triton kernels of the fast path, installed as `ibot_fast.kernels`.

One file per op, holding its kernel(s), plain host functions that launch them, a thin
autograd wrapper and the public functional; the op's pure-PyTorch twin is the file of the
same name in `ibot_fast.reference`. `ce_stats.py` holds what the two centred
cross-entropy ops (`centered_ce.py`, `fused_head.py`) share, `utils.py` the dispatch and
launch helpers. Every public function dispatches on its inputs: CUDA tensors run
the Triton kernel; CPU tensors run the kernel under the Triton interpreter when
`TRITON_INTERPRET=1` is set, else the twin (see `kernels.utils.use_triton`).

Importing this package imports neither Triton nor any kernel: the public names below are
resolved on first use, so a machine without Triton can still import the trainer.
"""
import importlib

# public name -> module (in this package) that defines it
_PUBLIC = {
    "centered_softmax_ce": "centered_ce",
    "centered_softmax_ce_and_colsum": "centered_ce",
    "fused_head_ce": "fused_head",
    "gather_masked": "masked_gather",
    "ema_": "ema",
    "foreach_ema_": "ema",
    "adamw_ema_": "adamw_ema",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ibot_fast.kernels' has no attribute '{name}'")
    module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
    return getattr(module, name)


def __dir__():
    return __all__
