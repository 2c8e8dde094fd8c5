"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the student and the teacher.

`train.parallel=fsdp` shards every parameter, its gradient and its AdamW moments across
the processes (docs/design.md §2.8), instead of keeping a whole copy
of each on every process as DDP does. Per process, parameter state falls from
16 bytes x P (fp32 weight, gradient, two moments) + 4 x P (the teacher) to 20 x P /
world size, plus the gathered weights: one block at a time with
`reshard_after_forward=True`, every block of the student from its forward to its
backward with False.

How it is laid out:
- Each transformer block is one FSDP unit; the rest of a network (patch embedding,
  tokens, final norm, the head) is the root unit. Student and teacher are sharded the
  same way, so the two hold the same slice of each parameter on each process and the
  EMA runs on the local shards, with no communication.
- `reshard_after_forward=True` (`train.fsdp_reshard_after_forward`, ZeRO-3) frees a
  block's gathered weights after its forward and gathers them again in the backward;
  false keeps them from forward to backward (ZeRO-2, DINOv2's SHARD_GRAD_OP: one
  all-gather fewer per block and step, more memory). The teacher, which has no backward,
  always reshards.
- Under bf16 the weights are gathered in bf16 (`MixedPrecisionPolicy`), half the
  all-gather bytes; the shards, gradients (reduce-scattered in fp32) and AdamW state stay
  fp32. Autocast still decides each op's compute dtype, so the numbers are those of DDP
  + autocast except that LayerNorm weights, biases, the tokens and the head's g and v
  are read rounded to bf16 (as in DINOv2's FSDP set-up; g v / ||v|| is still computed
  in fp32).
- `train.fsdp_shard_size=S` (HSDP, for several nodes): the processes form groups of S
  consecutive ranks (torchrun numbers a node's processes consecutively, so S = processes
  per node keeps each group on one node). Each group holds one sharded copy; the groups
  are replicas of each other. All-gathers and reduce-scatters stay inside a group (on
  the node's fast links); between nodes only the gradient shards are all-reduced, once
  per step, as DDP does. Per process, parameter state is 20 x P / S. 0 (the default)
  shards over all processes.
- Gradient clipping and the teacher EMA work on the local shards (`local`): one
  all-reduce of the squared norms over a shard group for clipping, none for the EMA.
- Checkpoints hold full, unsharded tensors in the same format as a DDP run's (the
  optimizer state keyed by parameter index, as torch's AdamW writes it), so a run can
  move between DDP and FSDP, and between process counts, when it resumes.

Not combined with it (a one-line error at start-up, `check_config`; in one process
`fsdp` shards nothing and they all work): the fused last layer (the loss reads the head's
weight outside the head's forward, where FSDP has it sharded), apex's optimizers (their
kernels want whole local tensors, and LAMB's trust ratio would be taken per shard), fp16
(untested with FSDP2's gradient scaling) and, on the CPU only, `model.residual_fp32` in
bf16. `optim.fuse_ema` (the paper presets') needs flat buffers, which sharded parameters
cannot be: under FSDP AdamW and the teacher update run as two passes (logged).
"""
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor, distribute_tensor


def check_config(cfg, precision: str, device: torch.device, world_size: int) -> None:
    """One-line error for what does not combine with sharding (module docstring), or for
    a shard size that does not divide the processes."""
    from . import UserError

    size = cfg.train.fsdp_shard_size
    if size > world_size or (size and world_size % size):  # (>= 0: config.validate)
        raise UserError(f"train.fsdp_shard_size={size} must divide the {world_size} "
                        "processes (e.g. the processes per node), or be 0 for all of them")
    for bad, why in ((cfg.loss.fused_last_layer, "loss.fused_last_layer=true (the loss "
                      "reads the head's weight, which FSDP keeps sharded)"),
                     (cfg.optim.name != "adamw", f"optim.name={cfg.optim.name} (use adamw)"),
                     (precision == "fp16", "train.precision=fp16 (use bf16)"),
                     (cfg.model.residual_fp32 and precision == "bf16" and device.type == "cpu",
                      "model.residual_fp32=true in bf16 on the CPU (CPU autocast runs "
                      "LayerNorm with the bf16-gathered weights on the fp32 stream)")):
        if bad:
            raise UserError(f"train.parallel=fsdp does not combine with {why}; use "
                            "train.parallel=ddp or change that key")


def build_mesh(device: torch.device, shard_size: int = 0):
    """The processes as a 1-D mesh (shard over all), or with `shard_size` (HSDP) a 2-D
    mesh ("replicate", "shard") whose rows are groups of `shard_size` consecutive ranks."""
    world = dist.get_world_size()
    if not shard_size or shard_size == world:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (world // shard_size, shard_size),
                            mesh_dim_names=("replicate", "shard"))


def shard_networks(student, teacher, mesh, param_dtype=None,
                   reshard_after_forward: bool = True) -> None:
    """fully_shard each block, then the whole network, for the student and the teacher
    (in place), over `mesh` (`build_mesh`: 2-D is HSDP). `param_dtype`: the dtype weights
    are gathered in (None: as stored)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype,
                                  reduce_dtype=torch.float32 if param_dtype else None,
                                  cast_forward_inputs=False)  # autocast picks op dtypes
    for net, reshard in ((student, reshard_after_forward), (teacher, True)):
        for block in net.backbone.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    # entry points other than `forward`, around which FSDP must gather the weights: the
    # teacher's masked path, and the checkpointed part of each student block (run_block)
    register_fsdp_forward_method(teacher, "forward_teacher_masked")
    for block in student.backbone.blocks:
        register_fsdp_forward_method(block, "up_to_mlp")
    # up_to_mlp returns the MLP branch's output, a view (F.linear on 3-D input), and FSDP2
    # warns once per process that an in-place op on it would skip its pre-backward hook.
    # add_mlp adds it out of place (FSDP equals one process with checkpointing on unpacked
    # crops, the case that warns: tests/test_ddp.py). Appended: a user's -W filter wins.
    warnings.filterwarnings("ignore", category=UserWarning, append=True,
                            message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view")


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a plain tensor is its own shard)."""
    return t.to_local() if isinstance(t, DTensor) else t


# -- clipping and EMA on the shards --------------------------------------------------------

def clip_gradients_sharded(params, max_norm: float, mode: str = "global",
                           mesh=None) -> torch.Tensor:
    """`optim.clip_gradients` for sharded parameters: the squared norms of the local
    shards, summed over one shard group in one all-reduce, give each parameter's full
    norm (`mesh`'s "shard" dimension; under HSDP the other groups hold the same shards,
    and summing over them too would count every shard once per group). Returns the total
    norm (a device tensor, no host sync)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads = [local(p.grad) for p in params]
    squares = torch.stack([n.float() ** 2 for n in torch._foreach_norm(grads)])
    dist.all_reduce(squares, group=mesh.get_group("shard") if mesh is not None else None)
    if mode == "global":
        total = squares.sum().sqrt()
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total
    norms = squares.sqrt()
    torch._foreach_mul_(grads, list(torch.clamp(max_norm / (norms + 1e-6), max=1.0)))
    return torch.linalg.vector_norm(norms)


@torch.no_grad()
def ema_sharded_(teacher: torch.nn.Module, student: torch.nn.Module, m: float) -> None:
    """t <- m t + (1 - m) s on the local shards (the same slices on both networks)."""
    t = [local(p) for p in teacher.parameters()]
    s = [local(p.detach()) for p in student.parameters()]
    if [x.shape for x in t] != [x.shape for x in s]:
        raise ValueError("teacher and student are not sharded alike")
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, s, alpha=1 - m)


# -- full state dicts ----------------------------------------------------------------------
# Written here rather than with torch.distributed.checkpoint.state_dict: its loader leaves
# the alias of a shared parameter (head.last_layer2 is head.last_layer when shared_head)
# unsharded and then fails to copy it into the DTensor.

def _gather(state: dict, keep: bool) -> dict:
    """Each DTensor of a state dict gathered whole (a collective: every process calls it,
    in the same order), moved to the CPU one at a time; returned only where `keep`."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            value = _gather(value, keep)
        elif isinstance(value, DTensor):
            value = value.full_tensor()
            value = value.cpu() if keep else None
        if keep:
            out[key] = value
    return out


def full_state_dict(module: torch.nn.Module, everywhere: bool = False) -> dict:
    """The unsharded state dict on rank 0 (CPU tensors), {} elsewhere (`everywhere`: on
    every process). Every process must call it."""
    return _gather(module.state_dict(), keep=everywhere or dist.get_rank() == 0)


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` (a DTensor's placements; a plain tensor: unchanged)."""
    if not isinstance(like, DTensor):
        return full
    full = full.to(device=like.device, dtype=like.dtype)
    # every process holds the same whole tensor: each keeps its own slice, no traffic
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def load_full_state_dict(module: torch.nn.Module, state: dict) -> None:
    """Load an unsharded state dict (present on every process) into a sharded module;
    strict, as `load_state_dict`."""
    current = module.state_dict()
    module.load_state_dict({k: _shard_like(v, current[k]) if k in current else v
                            for k, v in state.items()})


def optimizer_state_dict(optimizer) -> dict:
    """The optimizer's state with every moment gathered whole: torch's own format, the
    same as a DDP run's. Rank 0 gets it, {} elsewhere; every process calls."""
    state = optimizer.state_dict()
    keep = dist.get_rank() == 0
    gathered = _gather({i: s for i, s in state["state"].items()}, keep)
    return {"state": gathered, "param_groups": state["param_groups"]} if keep else {}


def load_optimizer_state_dict(optimizer, state: dict) -> None:
    """Inverse of `optimizer_state_dict`: whole moments (from a DDP or FSDP run, present on
    every process) sharded as their parameters, then torch's own loader."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sharded = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        sharded[i] = {k: _shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape
                      else v for k, v in s.items()}
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})
