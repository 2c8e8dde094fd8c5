"""Small helpers shared by the kernel files: when to launch Triton, block sizes, grids."""
import functools
import os

import numpy as np
import torch


def interpreter_on() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the public functional should launch the Triton kernel for these inputs.

    CUDA tensors: yes. CPU tensors: only under `TRITON_INTERPRET=1` (tests), else the
    caller runs the op's pure-PyTorch twin. Mixed devices are an error.
    """
    devices = {t.device.type for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: {sorted(devices)}")
    device = devices.pop() if devices else "cpu"
    if device == "cuda":
        return True
    if device == "cpu" and interpreter_on():
        check_interpreter()
        return True
    return False


@functools.lru_cache(maxsize=None)
def check_interpreter() -> None:
    """Fail in one line on a Triton interpreter that cannot run with this numpy.

    Triton 3.6's interpreter turns a program id (a 1-element array) into a loop bound
    with `int(array)`, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); later Triton releases squeeze the array first.
    """
    import triton.runtime.interpreter as interp
    with open(interp.__file__) as f:
        unsqueezed = "int(self.handle.data))" in f.read()
    if unsqueezed and np.lib.NumpyVersion(np.__version__) >= "2.4.0":
        import triton
        raise RuntimeError(
            f"the Triton {triton.__version__} interpreter cannot run with numpy "
            f"{np.__version__}: install numpy<2.4 (as `make test` does) or a newer triton")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device, per_sm: int) -> int:
    """Programs a grid should have to fill the device: `per_sm` per SM on a GPU. Under the
    interpreter (which runs programs one after another) 16, small, and still enough to
    exercise the code paths that split work across programs."""
    if device.type == "cuda":
        return per_sm * _sm_count(device.index if device.index is not None else
                                  torch.cuda.current_device())
    return 16


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_warps_for(block: int) -> int:
    """A common warp-count heuristic for row-wise kernels (Liger / Triton tutorials)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4
