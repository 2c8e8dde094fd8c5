"""Regional compilation: one compiled transformer block, reused by every block.

`train.compile=auto` (the default) compiles on CUDA and runs eagerly on the CPU, where
inductor's C++ kernels are slower to build than the short runs they would serve.

What is compiled is `models.vit.run_block`, the function that runs one block (with its
activation checkpointing), not the whole network: every block of the student and of the
teacher has the same code and the same shapes, so torch.compile traces and optimises one
block and reuses it for all of them (DINOv3 and torchtitan compile per block for the same
reason). Start-up compilation is that of a few block graphs instead of a whole ViT, and
the rest of the network (patch embedding, masking, the heads, the loss kernels) runs
eagerly around it.

The graphs a run needs, and why nothing recompiles once it trains: global crops and
local crops (two shapes, or one packed stream); the first block, whose stochastic-depth
rate is 0 (the others' rates are a symbolic float: `models.vit.drop_path`); the teacher
(no grad). The batch is the same every step (the last, incomplete batch of an epoch is
dropped), the masked-token count never reaches a block (it only sizes the heads' row
buffer, which is fixed per run), and evaluation (k-NN) calls the blocks directly
(`get_intermediate_layers`), eagerly, and leaves the teacher in training mode.

If compilation fails at start (no C++ compiler, a Triton that cannot build, an inductor
error on this machine), `compile_backbones` says why in one warning line and the run goes
on eagerly: it compiles one block, forward and backward, on the run's own shapes before
the first step (`probe`), and that graph is reused by the training steps.

CUDA graphs (`train.cuda_graphs`): a small model's step is many short kernels, so the
host's launches can set its pace; the compiled blocks can instead be replayed as CUDA
graphs, one launch each: torch.compile's mode "reduce-overhead" (CUDA Graph Trees), per
block, forward and backward. What makes that sound here:
- static shapes: every block sees the same shapes at every step (the batch is fixed, the
  last incomplete batch dropped; the masked-row buffer never reaches a block), so a
  block's graphs are recorded in the first steps and replayed after
  (tests/test_compiling.py records the shapes of a multi-epoch run);
- no host synchronisation inside the blocks, nor anywhere in a step but its logging
  (tests/test_compiling.py counts the ops that would wait for the GPU);
- gradients that outlive a replay: a graph's outputs are overwritten by its next
  replay, and the fast path's flat gradient buffers take each weight gradient by an
  in-place add (the reference path's AccumulateGrad would keep the graph's tensor).
Each block's parameters are the graph's inputs (one recording per block). CUDA Graph
Trees start a new "generation" at each call made with no backward pending (each teacher
block, which runs without grad, and the student's first block); such a call copies its
token input into the graph's input buffer. The heads, the loss and the optimizer run
eagerly around the graphs, so the masked-row buffer (which an i.i.d. batch may grow)
needs no static size. `check_cuda_graphs` refuses the settings where this cannot hold;
gpu-marked tests check that graphed steps equal eager ones and that no graph is skipped.
"""
import contextlib
import logging

import torch

from . import UserError
from .models.vit import run_block

log = logging.getLogger("ibot_fast")

# The backend torch.compile uses (tests swap in one that fails, to check the fallback).
BACKEND = "inductor"


def resolve_compile(setting: str, device: torch.device):
    """(compile?, why) for `train.compile` = auto | true | false on this device (or a
    bool, from code that sets the key directly)."""
    if isinstance(setting, bool):
        setting = "true" if setting else "false"
    if setting == "auto":
        if device.type == "cuda":
            return True, "auto: CUDA device"
        return False, f"auto: eager on {device.type}"
    return setting == "true", "configured"


def check_cuda_graphs(cfg, device: torch.device, sharded: bool = False) -> bool:
    """`train.cuda_graphs`, or a one-line UserError where CUDA graphs cannot work."""
    if not cfg.train.cuda_graphs:
        return False
    if device.type != "cuda":
        raise UserError("train.cuda_graphs=true needs a CUDA GPU: set it to false here")
    if not resolve_compile(cfg.train.compile, device)[0]:
        raise UserError("train.cuda_graphs=true replays the compiled blocks: it needs "
                        "train.compile=auto or true")
    if cfg.train.impl != "fast":
        raise UserError("train.cuda_graphs=true needs train.impl=fast (its flat gradient "
                        "buffers: a graph's outputs are overwritten at its next replay)")
    if sharded:
        raise UserError("train.cuda_graphs=true does not work with train.parallel=fsdp: "
                        "FSDP gathers each block's weights into new memory at every step")
    log.info("train.cuda_graphs: the compiled blocks replay as CUDA graphs")
    return True


def compiled_block_runner(cuda_graphs: bool = False):
    """A compiled `run_block`: one function, hence one cache of graphs, for every block it
    is given; replayed as CUDA graphs with `cuda_graphs` (mode reduce-overhead)."""
    if cuda_graphs and BACKEND == "inductor":
        return torch.compile(run_block, backend=BACKEND, mode="reduce-overhead")
    return torch.compile(run_block, backend=BACKEND)


def compile_backbones(backbones, probe=None, autocast=contextlib.nullcontext,
                      cuda_graphs: bool = False) -> bool:
    """Run the blocks of every backbone through one compiled `run_block` (replayed as CUDA
    graphs with `cuda_graphs`); returns True, or False (and warns once, leaving them
    eager) when compiling fails.

    probe: (tokens, seqs), the input of the first backbone's blocks in a training step
    (tokens [2B, 1 + N, dim] and seqs None, or packed [T, dim] and their `Seqs`); one
    block (the second: one with stochastic depth, as all but the first are) runs forward
    and backward on random tokens of that shape under `autocast`, so that a compiler that
    cannot work on this machine fails here, before the first step, rather than inside it.
    The probe leaves no gradients and no random draws behind, and the graph it compiles
    is the one the training steps use."""
    runner = compiled_block_runner(cuda_graphs)
    backbone = backbones[0]
    if probe is not None:
        tokens, seqs = probe
        block = backbone.blocks[min(1, len(backbone.blocks) - 1)]
        try:
            with torch.random.fork_rng(devices=[tokens.device]
                                       if tokens.device.type == "cuda" else []):
                x = torch.randn_like(tokens, requires_grad=True)
                with autocast():
                    out = runner(block, x, seqs, backbone.activation_checkpointing)
                torch.autograd.grad(out.float().sum(), x)
        except Exception as e:  # noqa: BLE001: any failure to compile means "eager"
            log.warning("train.compile: compiling failed (%s); the run goes on eagerly",
                        _root_cause(e))
            return False
    for b in backbones:
        b.block_runner = runner
    return True


def _root_cause(error: BaseException) -> str:
    """'Type: first line' of the innermost error (torch.compile wraps the compiler's own
    error in BackendCompilerFailed)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is None:
            break
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
