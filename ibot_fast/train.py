"""Pre-train a Vision Transformer with iBOT.

Single process (a GPU if there is one, else the CPU):

    python -m ibot_fast.train --preset demo
    ibot-fast train --preset vit_small_16_paper --data /data/imagenet --output-dir runs/vits16

One node, 8 GPUs (DDP over NCCL; gloo when run on CPUs):

    torchrun --nproc_per_node=8 -m ibot_fast.train --preset vit_small_16_paper \\
        --data /data/imagenet --output-dir runs/vits16

FSDP2 instead of DDP (student, teacher, gradients and AdamW state sharded; ibot_fast/fsdp.py):
add `train.parallel=fsdp` (the vit_large_16_paper preset's choice). On several nodes add
`train.fsdp_shard_size=<processes per node>` too (HSDP): shards within each node, replicas
across nodes.

Several nodes: add `--nnodes N --node_rank R --master_addr HOST --master_port PORT` to
torchrun on each node. SLURM: one `srun` task per GPU, no torchrun (ibot_fast/slurm.py;
examples/slurm_train.sbatch requeues itself at the time limit). Any config key can be
overridden as `key=value` (see `ibot-fast keys`); `--resume` continues from <output_dir>/checkpoint.pth when it exists
(or from a path), so the same command restarts a pre-empted job.

The step (`Trainer.train_step`) reads top to bottom: schedules, teacher forward, student
forward, loss, backward + clip + optimizer step, teacher EMA. There is no host
synchronisation inside a step except on logging steps (every `train.log_every`).
"""
import argparse
import logging
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import UserError, checkpoint, dist, fsdp, print_error, slurm
from .config import build_config, derived, to_dict
from .data import build_train_loader
from .logger import JsonLog, ProgressBar, setup_logging
from .flat import FlatParams, ema_flat_
from .loss import build_loss, koleo_loss
from .compiling import compile_backbones, resolve_compile
from .masking import buffer_rows, sampler_from_config
from .models import (ARCHS, MaskedRows, backbone_state_dict, build_backbone,
                     build_student_teacher)
from .models.attention import Seqs, resolve_backend
from .optim import (AdamWEMA, build_optimizer, cancel_last_layer_grads, clip_gradients,
                    ema_loop_, flat_group, last_layer_params, param_groups,
                    set_hyperparameters)
from .phases import phase
from .pretrained import init_networks
from .schedules import build_schedules

log = logging.getLogger("ibot_fast")



class TrainingDiverged(UserError):
    """Too many non-finite losses in a row."""


def get_args_parser():
    p = argparse.ArgumentParser(
        "ibot-fast train", description="iBOT pre-training. Overrides: key=value, e.g. "
        "train.batch_size=64 optim.lr=0.0005 (ibot-fast keys lists every key).")
    p.add_argument("--preset", default=None,
                   help="demo | vit_small_16_paper | vit_base_16_paper | vit_large_16_paper")
    p.add_argument("--data", default=None,
                   help="ImageFolder root, or webdataset shards (x.tar, a glob, "
                   "train-{0000..0146}.tar): sets data.source and data.path")
    p.add_argument("--output-dir", default=None, help="sets train.output_dir")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from <output_dir>/checkpoint.pth if it exists (else "
                   "start), or from the given path")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def config_from_args(args):
    overrides = list(args.overrides)
    if args.data:
        shards = args.data.endswith(".tar") or "{" in args.data or "*.tar" in args.data
        overrides += [f"data.source={'webdataset' if shards else 'folder'}",
                      f"data.path={args.data}"]
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    return build_config(args.preset, overrides)


class Trainer:
    """Everything one process needs to train: networks, loss, optimizer, data, state."""

    def __init__(self, cfg, resume=None):
        self.cfg = cfg
        self.rank, self.world_size, self.device = dist.init(cfg.train.device)
        self.is_main = self.rank == 0
        if self.world_size > 1 and len(set(dist.all_gather_object(str(resume)))) > 1:
            raise UserError(f"the processes disagree on whether to resume (some see "
                            f"{cfg.train.output_dir}/checkpoint.pth, some do not): the output "
                            "folder must be on a file system that every node shares")
        setup_logging(self.is_main)
        if dist.srun_env:
            log.info("started by srun: %s processes, rendezvous at %s:%s",
                     *(dist.srun_env[k] for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")))
        self.out_dir = Path(cfg.train.output_dir)
        self.derived = derived(cfg, self.world_size)
        self.precision = self._resolve_precision()
        self.fast = cfg.train.impl == "fast"
        self.fuse_ema = self.fast and cfg.optim.fuse_ema
        self.koleo = cfg.loss.koleo_weight > 0
        self.resuming = bool(resume)

        self.backend = backend = self._build_networks()
        self.loss = build_loss(cfg).to(self.device)
        self._build_optimizer()
        self._build_data()

        self.epoch, self.batch_in_epoch, self.iteration = 0, 0, 0
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self.nonfinite_run = torch.zeros_like(self.nonfinite_total)
        self.nonfinite_max_run = torch.zeros_like(self.nonfinite_total)
        self.grad_norm = torch.zeros((), device=self.device)  # last step's, before clipping
        self.n_bad_images = 0
        self.stop_requested = False  # SIGTERM: checkpoint, then exit
        self.requeue_requested = False  # SIGUSR2: checkpoint, requeue the SLURM job, exit
        self.save_requested = False  # SIGUSR1: checkpoint, then go on
        self.saved_at = -1  # the iteration of the last checkpoint this process wrote
        self.json_log = JsonLog(self.out_dir / "log.jsonl", enabled=self.is_main)
        if resume:
            self.load(self.out_dir / "checkpoint.pth" if resume == "auto" else Path(resume))
        log.info("iBOT %s: %s, %d process(es)%s, device %s, precision %s, attention %s, "
                 "global batch %d, lr %.3g, %d iterations/epoch",
                 cfg.train.impl, cfg.model.arch, self.world_size,
                 self._parallel_name(),
                 self.device, self.precision,
                 backend, self.derived["global_batch"], self.derived["lr"],
                 self.iters_per_epoch)

    def _parallel_name(self) -> str:
        if self.mesh is not None and self.mesh.ndim == 2:
            replicas, shards = self.mesh.shape
            return f" (HSDP: {replicas} replicas of {shards} shards" + (
                "; nothing is sharded: DDP keeps less)" if shards == 1 else ")")
        return " (FSDP)" if self.sharded else " (DDP)" if self.world_size > 1 else ""

    def _build_networks(self) -> str:
        """Student (DDP-wrapped or FSDP-sharded across processes) and teacher; returns the
        attention backend."""
        cfg = self.cfg
        arch = ARCHS[cfg.model.arch]
        backend = resolve_backend(cfg.model.attention, self.device, arch["heads"],
                                  arch["dim"] // arch["heads"], packed=cfg.model.pack_crops,
                                  low_precision=self.precision in ("bf16", "fp16"))
        torch.manual_seed(cfg.train.seed)  # same initial weights on every process
        student, teacher = build_student_teacher(cfg, backend)
        if cfg.model.init_from and not self.resuming:  # pre-trained weights for both (a
            # resumed run has its own: the file may be gone by then)
            init_networks(student, teacher, cfg.model.init_from, cfg.model.init_which)
        self.sharded = cfg.train.parallel == "fsdp" and self.world_size > 1
        if self.sharded:
            fsdp.check_config(cfg, self.precision, self.device, self.world_size)
            # not moved here: fully_shard moves each unit's shards to the device, so no
            # whole copy of a network lands there
            self.student_module, self.teacher = student, teacher
        else:
            if cfg.train.parallel == "fsdp":
                log.info("train.parallel=fsdp with one process: nothing to shard")
            self.student_module = student.to(self.device)
            self.teacher = teacher.to(self.device)
        self.flat_student = self.flat_teacher = None
        if self.fast and not self.sharded:  # parameters as views into flat buffers:
            # one-launch EMA / clipping (FSDP shards its own way: fsdp.py)
            self.flat_student = FlatParams(self.student_module, flat_group)
            self.flat_teacher = FlatParams(self.teacher, like=self.flat_student, grads=False)
        self.student = self.student_module
        self.mesh = None
        if self.sharded:  # in place: the parameters become DTensor shards
            self.mesh = fsdp.build_mesh(self.device, cfg.train.fsdp_shard_size)
            fsdp.shard_networks(self.student_module, self.teacher, self.mesh,
                                param_dtype=torch.bfloat16 if self.precision == "bf16" else None,
                                reshard_after_forward=cfg.train.fsdp_reshard_after_forward)
        elif self.world_size > 1:
            self.student = torch.nn.parallel.DistributedDataParallel(
                self.student_module, device_ids=[self.device] if self.device.type == "cuda"
                else None, broadcast_buffers=False)
        self.compiled = self._compile()
        torch.manual_seed(cfg.train.seed + self.rank)  # stochastic depth differs by process
        self.last_layer = last_layer_params(self.student_module)
        self.student_params = [p for p in self.student_module.parameters() if p.requires_grad]
        return backend

    def _compile(self) -> bool:
        """Regional compilation (ibot_fast/compiling.py) of the student's and teacher's
        blocks, when `train.compile` resolves to it; probed before the first step
        (except under FSDP, whose collectives the probe would have to join)."""
        wanted, why = resolve_compile(self.cfg.train.compile, self.device)
        log.info("train.compile: %s (%s)", "regional, per block" if wanted else "off", why)
        if not wanted:
            return False
        backbone = self.student_module.backbone
        return compile_backbones([backbone, self.teacher.backbone],
                                 None if self.sharded else self._probe_tokens(backbone),
                                 self.autocast)

    def _probe_tokens(self, backbone):
        """(tokens, seqs) shaped as the student's blocks see them in a step."""
        cfg, d = self.cfg, self.derived
        n_global, n_local = 2 * cfg.train.batch_size, cfg.data.n_local * cfg.train.batch_size
        low = self.precision in ("bf16", "fp16") and not cfg.model.residual_fp32
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision) \
            if low else torch.float32
        if cfg.model.pack_crops and n_local and self.fast:
            seqs = Seqs([(n_global, d["n_patches"] + 1), (n_local, d["n_local_patches"] + 1)])
            return torch.empty(seqs.total, backbone.embed_dim, dtype=dtype,
                               device=self.device), seqs
        return torch.empty(n_global, d["n_patches"] + 1, backbone.embed_dim, dtype=dtype,
                           device=self.device), None

    def _build_optimizer(self):
        cfg = self.cfg
        if self.fuse_ema:
            if cfg.optim.name != "adamw" or self.precision == "fp16":
                raise UserError("optim.fuse_ema=true needs optim.name=adamw and bf16/fp32")
            self.optimizer = AdamWEMA(param_groups(self.student_module), self.flat_student,
                                      self.flat_teacher, cfg.optim.betas,
                                      weight_decay=cfg.optim.weight_decay)
        else:
            self.optimizer = build_optimizer(cfg, self.student_module,
                                             fused=self.fast and cfg.optim.name == "adamw")
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def _build_data(self):
        cfg = self.cfg
        self.mask_rows = None  # fast path: rows of the masked-token buffer (static shape)
        if self.fast:
            sampler = sampler_from_config(cfg.masks, self.derived["grid"]) \
                if cfg.masks.enabled else None
            n_crops = 2 * cfg.train.batch_size
            self.mask_rows = buffer_rows(sampler, n_crops) if sampler else 64
        self.loader = build_train_loader(cfg, self.world_size, self.rank, self.mask_rows,
                                         device=self.device)
        self.iters_per_epoch = self.loader.batches_per_epoch
        self.sched = build_schedules(cfg, self.iters_per_epoch, self.derived["lr"])

    def close(self):
        """Stop the data workers (the trainer's state stays usable)."""
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()

    def _resolve_precision(self) -> str:
        p = self.cfg.train.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" else "fp32"
            log.info("train.precision: %s (auto: %s)", p, "bf16 autocast on CUDA"
                     if p == "bf16" else f"fp32 on {self.device.type}")
        elif p == "fp16" and self.device.type != "cuda":
            raise UserError("train.precision=fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
        return p

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- one step ------------------------------------------------------------------------

    def train_step(self, batch, it: int, epoch: int) -> dict:
        hp = self.sched.at(it)
        set_hyperparameters(self.optimizer, hp["lr"], hp["wd"])
        with phase("data"):
            global_crops, local_crops, masks = (batch[k].to(self.device, non_blocking=True)
                                                for k in ("globals", "locals", "masks"))
        if self.fast:
            losses = self.forward_masked(batch, global_crops, local_crops, masks, epoch)
        else:
            losses = self.forward_full(global_crops, local_crops, masks, epoch)
        self.backward_and_step(losses["loss"], epoch, hp["momentum"])
        if not self.fuse_ema:
            with phase("ema"):
                self.update_teacher(hp["momentum"])
        return losses

    def forward_full(self, global_crops, local_crops, masks, epoch) -> dict:
        """Official path: heads on every token, eager loss."""
        with self.autocast():
            with phase("teacher"), torch.no_grad():
                teacher_cls, teacher_patch = self.teacher(global_crops)
            with phase("student"):
                student_cls, student_patch, *cls_tokens = self.student(
                    global_crops, masks, local_crops, global_cls=self.koleo)
        with phase("loss"):
            losses = self.loss(student_cls, student_patch, teacher_cls, teacher_patch, masks,
                               epoch)
            if self.koleo:
                self.add_koleo(losses, cls_tokens[0])
        return losses

    def add_koleo(self, losses: dict, tokens: torch.Tensor) -> None:
        """DINOv2's KoLeo term on the student's backbone CLS tokens of the global crops
        [2B, dim], each crop's over this process's images (loss.koleo_weight; in place:
        `koleo`, `loss`)."""
        koleo = sum(koleo_loss(crop) for crop in tokens.chunk(2))
        losses["koleo"] = koleo
        losses["loss"] = losses["loss"] + self.cfg.loss.koleo_weight * koleo

    def forward_masked(self, batch, global_crops, local_crops, masks, epoch) -> dict:
        """Fast path: the heads see [CLS tokens ; masked patch tokens] only (issue 4)."""
        count = batch["mask_count"]
        index = batch["mask_index"].to(self.device, non_blocking=True)  # pinned: no host wait
        masked = MaskedRows.from_masks(masks, index, count, index.numel())
        fused = self.cfg.loss.fused_last_layer
        with self.autocast():
            with phase("teacher"):
                teacher_cls, teacher_patch, patch_sum = self.teacher.forward_teacher_masked(
                    global_crops, masked, self.cfg.loss.center2_from, patch_features=fused)
            with phase("student"):
                student_cls, student_patch, *cls_tokens = self.student(
                    global_crops, masks, local_crops, masked=masked, patch_features=fused,
                    global_cls=self.koleo)
        last_layers = None
        if fused:
            s_last = self.student_module.head.last_layer2
            t_last = self.teacher.head.last_layer2
            last_layers = ((s_last.weight_v, s_last.weight_g), (t_last.weight_v, t_last.weight_g))
        with phase("loss"):
            losses = self.loss.forward_masked(student_cls, student_patch, teacher_cls,
                                              teacher_patch, masked.weight, count, epoch,
                                              patch_sum, last_layers)
            if self.koleo:
                self.add_koleo(losses, cls_tokens[0])
        return losses

    def backward_and_step(self, loss: torch.Tensor, epoch: int, momentum: float) -> None:
        """Backward, drop frozen last-layer grads, clip, and step unless non-finite."""
        frozen = epoch < self.cfg.optim.freeze_last_layer
        if self.flat_student is not None:
            self.flat_student.zero_grad()  # keeps .grad as views into the flat buffer
        else:
            self.optimizer.zero_grad(set_to_none=True)
        with phase("backward"):
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        with phase("optimizer"):
            self.clip_and_step(loss, frozen, momentum)

    def clip_and_step(self, loss: torch.Tensor, frozen: bool, momentum: float) -> None:
        """In the official order: unscale, clip (the frozen last layer's gradients count
        in a global norm), drop the frozen last layer's gradients, step."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.grad_norm = self.clip_gradients()
        if frozen:
            cancel_last_layer_grads(self.last_layer)
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        if self.world_size > 1:  # every process skips if any process's loss is bad (one
            # scalar on the device, no host sync; the norm alone agrees only when clipping)
            bad = dist.all_reduce_(bad.float(), op=torch.distributed.ReduceOp.MAX) > 0
        if self.fuse_ema:  # AdamW + EMA in one pass; clipping folded in as grad_scale
            self.optimizer.momentum, self.optimizer.frozen_last_layer = momentum, frozen
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        elif self.scaler:  # GradScaler skips steps with inf/nan gradients itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif getattr(self.optimizer, "_step_supports_amp_scaling", False):
            self.optimizer.found_inf = bad.float()  # fused AdamW skips on device, no sync
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not bad.item():  # other optimizers: one host sync
            self.optimizer.step()
        self.nonfinite_total += bad
        self.nonfinite_run = (self.nonfinite_run + 1) * bad
        self.nonfinite_max_run = torch.maximum(self.nonfinite_max_run, self.nonfinite_run)

    def clip_gradients(self) -> torch.Tensor:
        """Global-norm (or official per-parameter) clipping; returns the norm, no sync.

        Flat buffers: one norm and one scale per buffer; with the fused AdamW + EMA step
        the scale is not applied here but read by the kernel (`grad_scale`).
        """
        o = self.cfg.optim
        if o.clip_grad <= 0:
            return torch.zeros((), device=self.device)
        if self.sharded:
            return fsdp.clip_gradients_sharded(self.student_params, o.clip_grad, o.clip_mode,
                                               self.mesh)
        if self.flat_student is None or o.clip_mode != "global":
            return clip_gradients(self.student_params, o.clip_grad, o.clip_mode)
        grads = list(self.flat_student.grad.values())
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
        scale = torch.clamp(o.clip_grad / (norm + 1e-6), max=1.0)
        if self.fuse_ema:
            self.optimizer.grad_scale = scale
        else:
            for g in grads:
                g.mul_(scale.to(g.dtype))
        return norm

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        if self.flat_teacher is not None:
            ema_flat_(self.flat_teacher, self.flat_student, momentum)  # one launch per dtype
        elif self.sharded:
            fsdp.ema_sharded_(self.teacher, self.student_module, momentum)  # local shards
        else:
            ema_loop_(self.teacher, self.student_module, momentum)  # the official loop

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
        self._write_config()
        bar = ProgressBar(cfg.train.epochs, self.iters_per_epoch, enabled=self.is_main)
        status = "finished"
        try:
            while self.epoch < cfg.train.epochs:
                status = self.train_epoch(bar)
                if status == "epoch":
                    status = self.end_of_epoch()
                if status != "epoch":
                    break
            else:
                status = "finished"
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if status == "epoch":
            status = "finished"
        bad_images = self.total_bad_images()
        log.info("training %s at epoch %d, iteration %d (non-finite steps skipped: %d, "
                 "unreadable images skipped: %d)", status, self.epoch, self.iteration,
                 int(self.nonfinite_total), bad_images)
        return {"status": status, "epoch": self.epoch, "iteration": self.iteration,
                "nonfinite": int(self.nonfinite_total), "bad_images": bad_images}

    def train_epoch(self, bar) -> str:
        cfg = self.cfg
        self.loader.set_epoch(self.epoch, self.batch_in_epoch)
        t_last, it_last = time.time(), self.iteration
        for batch in self.loader:
            losses = self.train_step(batch, self.iteration, self.epoch)
            self.iteration += 1
            self.batch_in_epoch += 1
            self.n_bad_images += batch["n_bad"]
            is_log_step = (self.iteration % cfg.train.log_every == 0 or
                           self.batch_in_epoch == self.iters_per_epoch)
            if is_log_step:
                now = time.time()
                record = self.log_step(losses, (self.iteration - it_last) / (now - t_last))
                t_last, it_last = time.time(), self.iteration
                bar.update(self.epoch, self.batch_in_epoch,
                           f"loss {record['loss']:.4f}  {record['img_per_s']:.0f} img/s",
                           force=True)
            else:
                bar.update(self.epoch, self.batch_in_epoch, "")
            # the epoch's last batch: stop_at_iter and signals are acted on by
            # end_of_epoch, once the epoch is complete
            last_batch = self.batch_in_epoch == self.iters_per_epoch
            if cfg.train.stop_at_iter and self.iteration >= cfg.train.stop_at_iter and \
                    not last_batch:
                self.save()
                return "stopped"
            # signals are acted on at a step boundary; with several processes only on
            # logging steps, where all of them agree (an all-reduce of the flags)
            if (self.world_size == 1 or is_log_step) and not last_batch:
                status = self._act_on_requests()
                if status:
                    return status
        return "epoch"

    def end_of_epoch(self) -> str:
        """The epoch's checkpoint (and kept copy), then its k-NN; returns "epoch" to go
        on, or the status to stop with: `stop_at_iter` reached or a signal received on
        the epoch's last batch are acted on here, once the epoch is complete. A signal
        that stops the run skips the k-NN (pre-emption leaves little time)."""
        cfg = self.cfg
        self.epoch += 1
        self.batch_in_epoch = 0
        last = self.epoch == cfg.train.epochs
        stop, requeue, save = (False,) * 3 if last else self._agreed_requests()
        stopping = not last and bool(cfg.train.stop_at_iter) and \
            self.iteration >= cfg.train.stop_at_iter
        keep = cfg.train.keep_every and self.epoch % cfg.train.keep_every == 0
        if self.epoch % cfg.train.save_every == 0 or last or keep or stop or requeue or \
                save or stopping:
            self.save(also=f"checkpoint{self.epoch:04d}.pth" if keep else None)
        if stop or requeue:
            return "preempted" if stop else "requeued"
        if cfg.eval.knn_every and (self.epoch % cfg.eval.knn_every == 0 or last):
            self.evaluate_knn()
        return "stopped" if stopping else "epoch"

    def log_step(self, losses: dict, iters_per_s: float) -> dict:
        """The only host synchronisation of the loop: read the device counters and losses."""
        hp = self.sched.at(self.iteration - 1)
        record = {
            "iter": self.iteration, "epoch": self.epoch,
            **{k: float(v.detach()) for k, v in losses.items()},
            **hp,
            "teacher_temp": self.loss.teacher_temp(self.epoch),
            "teacher_patch_temp": self.loss.teacher_patch_temp(self.epoch),
            "img_per_s": iters_per_s * self.derived["global_batch"],
            "nonfinite_total": int(self.nonfinite_total),
            **({"grad_norm": float(self.grad_norm)} if self.cfg.optim.clip_grad > 0 else {}),
            "bad_images": self.total_bad_images(),  # all processes: they decide alike
        }
        bad_images, read = record["bad_images"], self.iteration * self.derived["global_batch"]
        if self.device.type == "cuda":
            record["mem_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.json_log.write(record)
        if bad_images > max(10, self.cfg.data.max_bad_fraction * read):
            self.save()
            raise UserError(f"{bad_images} of {read} image reads failed (more than "
                            f"data.max_bad_fraction={self.cfg.data.max_bad_fraction}): is the "
                            "data corrupt? (checkpoint saved)")
        max_run = int(self.nonfinite_max_run)
        if max_run >= self.cfg.train.max_nonfinite:
            self.save()
            raise TrainingDiverged(
                f"{max_run} non-finite losses in a row by iteration {self.iteration}: the run "
                "diverged (checkpoint saved); lower optim.lr, raise optim.warmup_epochs or "
                "use train.precision=bf16/fp32")
        self.nonfinite_max_run.zero_()
        return record

    def total_bad_images(self) -> int:
        """Unreadable images skipped by all processes (each counts its own; a resumed
        run restores the total on rank 0). Every process must call it."""
        if self.world_size == 1:
            return self.n_bad_images
        return int(dist.all_reduce_(torch.tensor(self.n_bad_images, device=self.device)))

    def _on_signal(self, signum, frame):
        if signum == signal.SIGTERM:
            log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
            self.stop_requested = True
        elif signum == signal.SIGUSR2:
            log.warning("SIGUSR2 (the SLURM time limit is near): saving a checkpoint at the "
                        "next step boundary, then requeueing the job")
            self.requeue_requested = True
        else:
            log.info("SIGUSR1: saving a checkpoint at the next step boundary")
            self.save_requested = True

    def _act_on_requests(self):
        """Checkpoint if a signal asked for it; returns the status to stop with
        ("preempted": SIGTERM, which wins, so scancel never brings a job back;
        "requeued": SIGUSR2, the command then requeues the job) or None to go on."""
        stop, requeue, save = self._agreed_requests()
        if (stop or requeue or save) and self.saved_at != self.iteration:
            self.save()
        return "preempted" if stop else "requeued" if requeue else None

    def _agreed_requests(self):
        """(stop, requeue, save): local flags, or, with several processes, any process's."""
        flags = (self.stop_requested, self.requeue_requested, self.save_requested)
        self.save_requested = False
        if self.world_size == 1:
            return flags
        t = torch.tensor([float(f) for f in flags], device=self.device)
        return tuple(bool(v > 0) for v in dist.all_reduce_(t).tolist())

    def whole_teacher_backbone(self, everywhere: bool = False):
        """The teacher's backbone, whole, on rank 0 (None elsewhere; `everywhere`: on
        every process). Under FSDP a copy gathered from the shards: every process must
        call it."""
        if not self.sharded:
            return self.teacher.backbone if self.is_main or everywhere else None
        state = fsdp.full_state_dict(self.teacher, everywhere)
        if not (self.is_main or everywhere):
            return None
        backbone = build_backbone(self.cfg, attention_backend=self.backend)
        backbone.load_state_dict(backbone_state_dict(state))
        return backbone.to(self.device)

    def evaluate_knn(self):
        from .eval.knn import knn_eval_backbone

        # every process extracts its shard of the images (all-gathered)
        results = knn_eval_backbone(self.cfg, self.whole_teacher_backbone(everywhere=True),
                                    self.device)
        if self.is_main:
            log.info("k-NN at epoch %d: %s", self.epoch,
                     ", ".join(f"k={k}: {a:.2f}%" for k, a in results.items()))
            self.json_log.write({"iter": self.iteration, "epoch": self.epoch,
                                 **{f"knn_top1_k{k}": a for k, a in results.items()}})
        dist.barrier()

    # -- checkpoints ---------------------------------------------------------------------

    def network_state_dicts(self) -> dict:
        """Unsharded student, teacher and optimizer state. Under FSDP every process must
        call it (it gathers the shards) and only rank 0 gets the tensors."""
        if self.sharded:
            return {"student": fsdp.full_state_dict(self.student_module),
                    "teacher": fsdp.full_state_dict(self.teacher),
                    "optimizer": fsdp.optimizer_state_dict(self.optimizer)}
        return {"student": self.student_module.state_dict(),
                "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def state_dict(self) -> dict:
        return {
            **self.network_state_dicts(),
            "loss": self.loss.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "iteration": self.iteration, "global_batch": self.derived["global_batch"],
            "config": to_dict(self.cfg),
            "rng": dist.all_gather_object(checkpoint.rng_state()),
            "counters": {"nonfinite_total": int(self.nonfinite_total),
                         "nonfinite_run": int(self.nonfinite_run),
                         "bad_images": self.total_bad_images()},
        }

    def save(self, also: str = None):
        """checkpoint.pth (and the file `also`, when given). Every process must call it:
        the RNG states, and under FSDP the shards, are gathered."""
        state = self.state_dict()
        if self.is_main:
            path = checkpoint.save(self.out_dir / "checkpoint.pth", state)
            if also:
                checkpoint.copy(path, self.out_dir / also)
            log.info("checkpoint: %s (epoch %d, iteration %d)", path, self.epoch, self.iteration)
        dist.barrier()
        self.saved_at = self.iteration

    def load(self, path: Path):
        ckpt = checkpoint.load(path, mmap=True)  # no whole copy per process in host memory
        checkpoint.check_compatible(ckpt, to_dict(self.cfg), path)
        method, operational = checkpoint.changed_settings(ckpt, to_dict(self.cfg))
        if method:  # allowed (a longer run, a new lr), but never silent
            log.warning("resuming %s with settings that differ from its own: %s", path,
                        "; ".join(method))
        if operational:
            log.info("resuming %s; changed: %s", path, "; ".join(operational))
        if self.sharded:  # every process holds the whole checkpoint, keeps its shards
            fsdp.load_full_state_dict(self.student_module, ckpt["student"])
            fsdp.load_full_state_dict(self.teacher, ckpt["teacher"])
            fsdp.load_optimizer_state_dict(self.optimizer, ckpt["optimizer"])
        else:
            self.student_module.load_state_dict(ckpt["student"])
            self.teacher.load_state_dict(ckpt["teacher"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        # what stays on the CPU (optimizer steps; every moment of a CPU run) would still
        # read the mapped file, keeping it on disk after the next save replaces it
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.device.type == "cpu":
                    state[key] = value.clone()
        self.loss.load_state_dict(ckpt["loss"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self._restore_position(ckpt, path)
        rng = ckpt["rng"]
        checkpoint.set_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        if self.rank >= len(rng):  # more processes than saved states: not rank 0's streams
            seed = self.cfg.train.seed + 1_000_003 * self.rank + self.iteration
            torch.manual_seed(seed)  # (CUDA's generators too)
        counters = ckpt.get("counters", {})
        self.nonfinite_total.fill_(counters.get("nonfinite_total", 0))
        self.nonfinite_run.fill_(counters.get("nonfinite_run", 0))
        self.n_bad_images = counters.get("bad_images", 0) if self.is_main else 0
        log.info("resumed from %s at epoch %d, iteration %d", path, self.epoch, self.iteration)

    def _restore_position(self, ckpt: dict, path) -> None:
        """Epoch, batch and iteration from the checkpoint. When the epoch length has
        changed (another global batch: another number of processes or
        train.batch_size; or another dataset size), the official code's rule: the
        epoch counts, the iteration is recomputed from it with this run's epoch length
        (the schedules are per iteration, epochs x this run's batches per epoch long),
        and the lr follows this run's global batch. Mid-epoch, the run goes on at the
        same place in the epoch's image order (the permutation does not depend on the
        batch; with another dataset size, the same offset), rounded down to a whole
        batch of the new size, and never past the epoch's last batch: at most one new
        global batch of images is seen twice in that epoch."""
        self.epoch, self.batch_in_epoch = ckpt["epoch"], ckpt["batch_in_epoch"]
        self.iteration = ckpt["iteration"]
        batch, per_epoch = self.derived["global_batch"], self.iters_per_epoch
        # absent before 2026-11-23: the batch per process times the processes (RNG states)
        saved = ckpt.get("global_batch") or \
            ckpt["config"]["train"]["batch_size"] * len(ckpt.get("rng") or [None])
        if self.iteration != self.epoch * per_epoch + self.batch_in_epoch or saved != batch:
            images = self.batch_in_epoch * saved
            # never past the epoch's last batch: its end (checkpoint, k-NN) must still run
            self.batch_in_epoch = min(images // batch, per_epoch - 1)
            self.iteration = self.epoch * per_epoch + self.batch_in_epoch
            log.warning(
                "resuming %s at another global batch or epoch length: %d batches of %d "
                "images (%d process(es) x %d), trained at batches of %d: the lr is scaled to "
                "this batch (%.3g) and the run goes on at epoch %d, image %d of its order "
                "(batch %d), iteration %d of %d (the checkpoint's was %d)", path, per_epoch, batch,
                self.world_size, self.cfg.train.batch_size, saved, self.derived["lr"],
                self.epoch, images, self.batch_in_epoch, self.iteration, len(self.sched.lr),
                ckpt["iteration"])
        if self.batch_in_epoch >= per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.iteration = self.epoch * per_epoch

    def _write_config(self):
        if self.is_main:
            import json

            self.out_dir.mkdir(parents=True, exist_ok=True)
            resolved = {**to_dict(self.cfg), "derived": self.derived,
                        "precision": self.precision}
            (self.out_dir / "config.json").write_text(json.dumps(resolved, indent=2))


def train(cfg, resume=None) -> dict:
    trainer = Trainer(cfg, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


def resume_choice(cfg, resume):
    """`--resume` (no path) continues <output_dir>/checkpoint.pth when there is one and
    starts a new run when there is none, so one command serves a job's first start and
    its requeues after pre-emption. Without `--resume`, an output folder that already
    holds a checkpoint is an error: a new run would overwrite it."""
    ckpt = Path(cfg.train.output_dir) / "checkpoint.pth"
    if resume == "auto" and not ckpt.is_file():
        log.info("--resume: no checkpoint in %s yet, starting a new run", ckpt.parent)
        return None
    if resume is None and ckpt.is_file():
        raise UserError(f"{ckpt} holds an earlier run: add --resume to continue it, or "
                        "pass another --output-dir (nothing was written)")
    if resume not in (None, "auto") and ckpt.is_file() and \
            Path(resume).resolve() != ckpt.resolve():
        raise UserError(f"{ckpt} holds another run, which continuing {resume} there would "
                        "overwrite: pass another --output-dir (nothing was written)")
    return resume


def agreed_resume_choice(cfg, resume, world_size: int):
    """`resume_choice` on every process, which must all decide alike: a refusal on any
    of them (an output folder that is not shared by all nodes can hold a checkpoint for
    some and none for others) is a one-line error on all, instead of a hang."""
    try:
        choice, error = resume_choice(cfg, resume), None
    except UserError as e:
        choice, error = None, str(e)
    if world_size == 1:
        if error:
            raise UserError(error)
        return choice
    answers = dist.all_gather_object((str(choice), error))
    errors = [e for _, e in answers if e]
    if errors:
        raise UserError(errors[0])
    if len({c for c, _ in answers}) > 1:
        raise UserError(f"the processes disagree on whether to resume (some see "
                        f"{cfg.train.output_dir}/checkpoint.pth, some do not): the output "
                        "folder must be on a file system that every node shares")
    return choice


def parse_args(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume key=value ...`: argparse took the first override for the path
        args.overrides.insert(0, args.resume)
        args.resume = "auto"
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        rank, world_size, _ = dist.init(cfg.train.device)
        setup_logging(rank == 0)  # resume_choice says what it chose
        result = train(cfg, agreed_resume_choice(cfg, args.resume, world_size))
        if result["status"] == "requeued":
            if slurm.job_id() is None:  # SIGUSR2 by hand: nothing to requeue
                result["status"] = "stopped"
            if not slurm.requeue_job():
                result["status"] = "not requeued"  # the checkpoint is saved; exit 1 tells
        code = 0 if result["status"] in ("finished", "stopped", "preempted", "requeued") else 1
    except UserError as e:
        print_error(e)
        code = 2
    except BaseException:
        dist.destroy()
        raise
    return dist.end(code)


if __name__ == "__main__":
    sys.exit(main())
