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
_initialised = None  # init()'s answer, (rank, world_size, device), while its group lives
srun_env: dict = {}  # the torchrun variables init() derived for an srun task ({}: none)


def init(device_pref: str = "auto"):
    """Initialise from torchrun's environment, or an `srun` step's (a group that already
    exists is used as it is). Returns (rank, world_size, device); a second call (the
    training command, then its Trainer) returns the first one's answer."""
    global _created, _initialised, srun_env
    from . import UserError, slurm
    if _initialised is not None and dist.is_initialized():
        return _initialised
    try:
        launched = slurm.torchrun_env()
    except ValueError as e:
        raise UserError(str(e)) from None
    srun_env = launched or srun_env
    os.environ.update(launched)
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible")
    if dist.is_initialized():  # the caller's group
        world_size, rank = dist.get_world_size(), dist.get_rank()
    else:
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
        check_own_gpus(device)
    _initialised = (rank, world_size, device)
    return _initialised


def check_own_gpus(device) -> None:
    """One-line error when processes share a GPU. The ids travel through the rendezvous
    store, not NCCL: NCCL's first collective itself fails on a shared GPU, with a
    traceback. Skipped where torch does not report the GPU's uuid."""
    from . import UserError
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is None:
        return
    shared = shared_devices(store_gather(f"{socket.gethostname()} {uuid}"))
    if shared:
        gpu, ranks = shared[0]
        raise UserError(f"processes {ranks} share one GPU ({gpu}): give each process its "
                        "own (as many processes per node as GPUs; SLURM: --gpus-per-task=1 "
                        "or --ntasks-per-node=<GPUs per node>)")


def store_gather(value: str) -> list:
    """Every process's string, by rank, through the process group's rendezvous store (no
    collective of the backend). Every process must call it, the same number of times."""
    global _store_rounds
    store = dist.distributed_c10d._get_default_store()
    _store_rounds += 1
    key = f"ibot_fast/gather{_store_rounds}/"
    store.set(key + str(dist.get_rank()), value)
    return [store.get(key + str(r)).decode() for r in range(dist.get_world_size())]


_store_rounds = 0


def shared_devices(devices: list) -> list:
    """[(device, [ranks])] for each device that several ranks hold."""
    holders = {}
    for r, device in enumerate(devices):
        holders.setdefault(device, []).append(r)
    return [(device, ranks) for device, ranks in holders.items() if len(ranks) > 1]


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
    global _created, _initialised
    if _created and is_initialized():
        dist.destroy_process_group()
    _created = False
    _initialised = None


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
