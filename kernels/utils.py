"""Small helpers shared by the kernel files: when to launch Triton, block sizes."""
import os

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
    return device == "cpu" and interpreter_on()


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
