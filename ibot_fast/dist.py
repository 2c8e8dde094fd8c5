"""torch.distributed set-up for torchrun or `srun` (NCCL on GPUs, gloo on the CPU). No
launcher here; SLURM's variables are read in `ibot_fast/slurm.py`.

Single process: nothing is initialised and every helper degrades to the trivial answer.
"""
import logging
import os
import socket
import sys

import torch
import torch.distributed as dist


_created = False  # init() created the process group (so end() may end the process)
srun_env: dict = {}  # the torchrun variables init() derived for an srun task ({}: none)


def init(device_pref: str = "auto"):
    """Initialise from torchrun's environment, or an `srun` step's (a group that already
    exists is used as it is). Returns (rank, world_size, device)."""
    global _created, srun_env
    from . import UserError, slurm
    try:
        srun_env = launched = slurm.torchrun_env()
    except ValueError as e:
        raise UserError(str(e)) from None
    os.environ.update(launched)
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and launched and torch.cuda.device_count() == 1:
        local_rank = 0  # srun bound this task to its own GPU (--gpus-per-task, --gpu-bind)
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                        f"device(s) visible: start at most that many processes per node "
                        f"(or train.device=cpu)")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        _created = True
    if use_cuda and world_size > 1:
        props = torch.cuda.get_device_properties(device)
        gpu = (socket.gethostname(), str(getattr(props, "uuid", device.index)))
        shared = shared_devices(all_gather_object(gpu))
        if shared:
            (host, uuid), ranks = shared[0]
            raise UserError(f"processes {ranks} on {host} share one GPU ({uuid}): give each "
                            "process its own (as many processes per node as GPUs; SLURM: "
                            "--gpus-per-task=1 or --ntasks-per-node=<GPUs per node>)")
    return rank, world_size, device


def shared_devices(devices: list) -> list:
    """[(device, [ranks])] for each device that several ranks hold."""
    holders = {}
    for r, device in enumerate(devices):
        holders.setdefault(tuple(device), []).append(r)
    return [(device, ranks) for device, ranks in holders.items() if len(ranks) > 1]


def env_rank() -> int:
    """This process's rank from the launcher's variables (torchrun's RANK, or an srun
    task's SLURM_PROCID), before `init`; 0 for a single process."""
    from . import slurm
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("SLURM_PROCID", "0")) if slurm.is_srun_step() else 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier():
    if is_initialized():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj):
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy():
    """Destroy the process groups if `init` created them (a caller's own are left alone)."""
    global _created
    if _created and is_initialized():
        dist.destroy_process_group()
    _created = False


def end(exit_code: int) -> int:
    """The last call of a command (`ibot_fast.train.main`, `ibot_fast.cli.main`): destroy
    the process groups `init` created and, when they spanned several processes, leave at
    once with `os._exit(exit_code)` (stdio and logs flushed first); otherwise return
    `exit_code`. A process group the caller made itself is left alone, and the call
    returns.

    Why not return: destroying the groups does not stop gloo's worker threads (they stop
    when the C++ process group is freed, at interpreter shutdown). A worker that has just
    finished the last all-gather then drops its tensors' Python references; if that
    happens while the interpreter is finalizing, taking the GIL ends the thread inside a
    C++ destructor and the process aborts ("terminate called without an active
    exception", SIGABRT, after every checkpoint was written: caught in a core dump,
    4 runs in 37 on a loaded 2-core machine, 0 in 25 with this). Skipping the
    finalization removes the race. A command that fails with an exception other than a
    UserError still exits through the interpreter (its traceback, then exit code 1, or
    rarely this abort: non-zero either way).
    """
    several = _created and is_initialized() and dist.get_world_size() > 1
    destroy()
    if not several:
        return exit_code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
