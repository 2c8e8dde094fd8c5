"""Shared test set-up.

Without a CUDA GPU the Triton kernels run under the interpreter: TRITON_INTERPRET=1 must
be set before Triton is first imported, so it is set here, at collection time. Tests that
need a GPU carry the `gpu` marker and are skipped without one (a skip proves nothing).
"""
import importlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The interpreter's tl.dot is numpy's: multi-threaded BLAS on two cores makes it
    # hundreds of times slower than one thread.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)

# Import every kernel now, while TRITON_INTERPRET is what it will stay: a kernel first
# imported under another setting would be built for the wrong target.
for _name in ("centered_ce", "fused_head", "masked_gather", "ema", "adamw_ema"):
    importlib.import_module(f"ibot_fast.kernels.{_name}")

# One intra-op thread: the tests' models are tiny, so a second OpenMP thread costs more in
# synchronisation than it gains, and on a 2-core machine shared with anything else (the
# multi-process tests' workers, another job) every parallel region waits for a core: a
# step of the demo ViT took 3.5x longer with 2 threads than with 1 on a loaded machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an earlier one set (a benchmark's main()
    sets its own)."""
    torch.set_num_threads(1)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run while active, by overload packet name (`counts`)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_counter():
    """The OpCounter class: `with op_counter() as c: ...; c.counts`."""
    return OpCounter


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def demo_with_local_crops(request, monkeypatch):
    """The tests use the `demo` preset as their small model. Its recipe has no local crops
    (on the 32 px digits a local crop is a stroke, docs/demo.md), but the code paths of
    local crops (packing, the student's second pass, the loss's local terms, resume of the
    data order) must stay covered: in-process tests see the preset with 4 local crops.
    Tests that start processes, and module-scoped fixtures (set up before this one), name
    their own `data.n_local`; tests of the recipe as shipped carry `shipped_demo`."""
    if request.node.get_closest_marker("shipped_demo") is None:
        from ibot_fast.config import PRESETS

        monkeypatch.setitem(PRESETS["demo"], "data.n_local", 4)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors: an element a kernel forgets to write shows."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture
def twins(monkeypatch):
    """CPU tensors take the pure-PyTorch twins (e.g. for fp64), even under the interpreter."""
    import ibot_fast.kernels.utils as utils

    monkeypatch.setattr(utils, "interpreter_on", lambda: False)
