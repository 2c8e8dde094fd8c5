"""How the student's parameters, its optimizer and the teacher are held: one object per
set-up, chosen once when the trainer is built (`build_params`).

    Replicated  one process, or DDP (a whole copy per process): the official path's
                per-tensor teacher update (`reference.ema.ema_loop_`), torch's AdamW
    Flat        the same processes, the fast path: parameters as views into flat buffers
                (ibot_fast/flat.py), the teacher updated in one kernel launch per buffer,
                or AdamW and the teacher update fused in one pass (`optim.fuse_ema`)
    Sharded     FSDP2 (several processes, `train.parallel=fsdp`; ibot_fast/fsdp.py):
                student, teacher, gradients and AdamW state split over the processes

Each answers the step's questions the same way, so the training step reads the same for
all of them:

    params.zero_grad()
    scaler.scale(loss).backward()
    norm, skip = params.clip_(scaler, clip_grad, clip_mode), ...
    params.step(lr, wd, momentum, frozen_last_layer, skip, scaler)
    params.update_teacher(momentum)

and `state_dict()` / `load_state_dict()` read and write whole (unsharded) networks and
optimizer state in one format, so a run moves between set-ups when it resumes.
"""
import logging

import torch

from . import fsdp
from .flat import FlatParams, ema_flat_
from .models import backbone_state_dict, build_backbone
from .optim import (AdamWEMA, build_optimizer, cancel_last_layer_grads, clip_gradients,
                    flat_group, last_layer_params, param_groups, set_hyperparameters)
from .reference.ema import ema_loop_

log = logging.getLogger("ibot_fast")


class Replicated:
    """A whole student, teacher and optimizer in this process (one process, or DDP)."""

    def __init__(self, student_module, teacher, optimizer, student=None):
        self.student_module, self.teacher, self.optimizer = student_module, teacher, optimizer
        self.student = student if student is not None else student_module  # what to call
        self.trainable = [p for p in student_module.parameters() if p.requires_grad]
        self.last_layer = last_layer_params(student_module)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip_(self, scaler, max_norm: float, mode: str) -> torch.Tensor:
        """Unscale (fp16), clip in place; returns the norm before clipping (no sync)."""
        scaler.unscale_(self.optimizer)
        if max_norm <= 0:
            return torch.zeros((), device=self.trainable[0].device)
        return clip_gradients(self.trainable, max_norm, mode)

    def step(self, lr: float, wd: float, momentum: float, frozen: bool,
             skip: torch.Tensor, scaler) -> None:
        """One AdamW step, skipped on the device when `skip` (a non-finite loss or
        gradient norm on any process) is true; the frozen last layer's gradients are
        dropped first (after clipping: the official order)."""
        set_hyperparameters(self.optimizer, lr, wd)
        if frozen:
            cancel_last_layer_grads(self.last_layer)
        if scaler.is_enabled():  # fp16: the scaler skips steps with inf/nan gradients
            scaler.step(self.optimizer)
            scaler.update()
        elif getattr(self.optimizer, "_step_supports_amp_scaling", False):
            # torch's fused AdamW reads `found_inf` (GradScaler's protocol): skipped on
            # the device, no host sync
            self.optimizer.found_inf = skip.float()
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not skip.item():  # other optimizers (apex): one host sync
            self.optimizer.step()

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        ema_loop_(self.teacher.parameters(), self.student_module.parameters(), momentum)

    def state_dict(self) -> dict:
        return {"student": self.student_module.state_dict(),
                "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        self.student_module.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])

    def teacher_backbone(self, is_main: bool, everywhere: bool = False):
        """The teacher's backbone on rank 0 (every process with `everywhere`), else None."""
        return self.teacher.backbone if is_main or everywhere else None


class Flat(Replicated):
    """The fast path's parameters as views into flat buffers: gradient norms, the teacher
    update and (with `fused`) the AdamW step run over whole buffers."""

    def __init__(self, student_module, teacher, optimizer, flat_student, flat_teacher,
                 fused: bool, student=None):
        super().__init__(student_module, teacher, optimizer, student)
        self.flat_student, self.flat_teacher, self.fused = flat_student, flat_teacher, fused
        self.grad_scale = None  # the global clipping scale the fused step applies itself

    def zero_grad(self) -> None:
        self.flat_student.zero_grad()  # keeps every .grad a view into the flat buffer

    def clip_(self, scaler, max_norm: float, mode: str) -> torch.Tensor:
        """Global norm: one norm per flat buffer and one scale, applied to the buffers (or,
        fused, by the AdamW + EMA pass). Per tensor (official): as `Replicated`."""
        self.grad_scale = None
        if max_norm <= 0 or mode != "global":
            return super().clip_(scaler, max_norm, mode)
        scaler.unscale_(self.optimizer)
        grads = list(self.flat_student.grad.values())
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if self.fused:
            self.grad_scale = scale
        else:
            for g in grads:
                g.mul_(scale.to(g.dtype))
        return norm

    def step(self, lr, wd, momentum, frozen, skip, scaler) -> None:
        if not self.fused:
            return super().step(lr, wd, momentum, frozen, skip, scaler)
        set_hyperparameters(self.optimizer, lr, wd)
        self.optimizer.step(momentum=momentum, frozen_last_layer=frozen,
                            grad_scale=self.grad_scale, found_inf=skip.float())

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        if not self.fused:  # fused: the AdamW + EMA pass has updated the teacher
            ema_flat_(self.flat_teacher, self.flat_student, momentum)  # a launch per dtype


class Sharded(Replicated):
    """FSDP2: every process holds a shard of each parameter, gradient and moment; the
    checkpoint format is the unsharded one (ibot_fast/fsdp.py)."""

    def __init__(self, student_module, teacher, optimizer, mesh, cfg):
        super().__init__(student_module, teacher, optimizer)
        self.mesh, self.cfg = mesh, cfg

    def clip_(self, scaler, max_norm: float, mode: str) -> torch.Tensor:
        if max_norm <= 0:
            return torch.zeros((), device=fsdp.local(self.trainable[0]).device)
        return fsdp.clip_gradients_sharded(self.trainable, max_norm, mode, self.mesh)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        fsdp.ema_sharded_(self.teacher, self.student_module, momentum)  # the local shards

    def state_dict(self) -> dict:
        """Whole tensors on rank 0 ({} elsewhere); every process must call it."""
        return {"student": fsdp.full_state_dict(self.student_module),
                "teacher": fsdp.full_state_dict(self.teacher),
                "optimizer": fsdp.optimizer_state_dict(self.optimizer)}

    def load_state_dict(self, ckpt: dict) -> None:
        """Every process holds the whole checkpoint and keeps its shards."""
        fsdp.load_full_state_dict(self.student_module, ckpt["student"])
        fsdp.load_full_state_dict(self.teacher, ckpt["teacher"])
        fsdp.load_optimizer_state_dict(self.optimizer, ckpt["optimizer"])

    def teacher_backbone(self, is_main: bool, everywhere: bool = False):
        """A whole copy gathered from the shards; every process must call it."""
        state = fsdp.full_state_dict(self.teacher, everywhere)
        if not (is_main or everywhere):
            return None
        backbone = build_backbone(self.cfg, attention_backend=self.teacher.backbone.blocks[0]
                                  .attn.backend)
        backbone.load_state_dict(backbone_state_dict(state))
        return backbone.to(fsdp.local(next(self.teacher.parameters())).device)


def build_params(cfg, student, teacher, device, world_size: int, precision: str,
                 fast: bool):
    """The set-up for this run (module docstring), with the networks placed, wrapped or
    sharded in place and the optimizer built. `student` and `teacher` come unplaced."""
    sharded = cfg.train.parallel == "fsdp" and world_size > 1
    if sharded:
        fsdp.check_config(cfg, precision, device, world_size)
        if fast and cfg.optim.fuse_ema:
            log.info("optim.fuse_ema: not under FSDP (the fused pass needs flat buffers; "
                     "FSDP shards the parameters): AdamW, then the teacher update")
        mesh = fsdp.build_mesh(device, cfg.train.fsdp_shard_size)
        # in place: each unit's shards go to the device, no whole copy lands there
        fsdp.shard_networks(student, teacher, mesh,
                            param_dtype=torch.bfloat16 if precision == "bf16" else None,
                            reshard_after_forward=cfg.train.fsdp_reshard_after_forward)
        return Sharded(student, teacher, build_optimizer(cfg, student, fused=fast), mesh, cfg)
    student, teacher = student.to(device), teacher.to(device)
    flat_student = flat_teacher = None
    if fast:  # before DDP wraps the student: DDP keeps the .grad views (flat.py)
        flat_student = FlatParams(student, flat_group)
        flat_teacher = FlatParams(teacher, like=flat_student, grads=False)
    wrapped = torch.nn.parallel.DistributedDataParallel(
        student, device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=False) if world_size > 1 else student
    if not fast:
        return Replicated(student, teacher, build_optimizer(cfg, student, fused=False),
                          wrapped)
    fused = cfg.optim.fuse_ema
    if fused:
        optimizer = AdamWEMA(param_groups(student), flat_student, flat_teacher,
                             cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    else:
        optimizer = build_optimizer(cfg, student, fused=cfg.optim.name == "adamw")
    return Flat(student, teacher, optimizer, flat_student, flat_teacher, fused, wrapped)
