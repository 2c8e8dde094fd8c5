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
set in a YAML file (`--config FILE.yaml`; `ibot-fast keys --preset P --yaml` writes a
complete one) and overridden as `key=value` (see `ibot-fast keys`); `--resume` continues
from the output folder's checkpoint when there is one (or from a path), so the same
command restarts a pre-empted job.

Layout: `Trainer.train_step` is one iteration, top to bottom; `Trainer.run` is the loop,
with what ends it and when to save decided in one place (`Trainer.after_step`). How the
parameters are held (one process or DDP, flat buffers, FSDP) is one object chosen at start
(ibot_fast/params.py); checkpoint files are ibot_fast/checkpoint.py's `Checkpointer`.
There is no host synchronisation inside a step except on logging steps.
"""
import argparse
import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import UserError, checkpoint, dist, print_error, slurm
from .compiling import check_cuda_graphs, compile_backbones, resolve_compile
from .config import build_config, derived, to_dict, to_yaml
from .control import Signals, Status
from .data import build_train_loader
from .logger import MetricSinks, Progress, setup_logging
from .loss import build_loss, koleo_loss
from .masking import buffer_rows, sampler_from_config
from .models import ARCHS, MaskedRows, build_student_teacher
from .models.attention import Seqs, resolve_backend
from .params import build_params
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
                   help="demo | vit_small_16_paper | vit_base_16_paper | vit_large_16_paper "
                   "(and *_dinov2style; ibot-fast keys --help)")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="keys from a YAML file (ibot-fast keys --yaml writes one), applied "
                   "after the preset and before the key=value overrides")
    p.add_argument("--data", default=None,
                   help="ImageFolder root, or webdataset shards (x.tar, a glob, "
                   "train-{0000..0146}.tar): sets data.source and data.path")
    p.add_argument("--output-dir", default=None, help="sets train.output_dir")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the output folder's checkpoint if there is one (else "
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
    return build_config(args.preset, overrides, args.config)


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
        self.koleo = cfg.loss.koleo_weight > 0
        self.checkpointer = checkpoint.Checkpointer(
            self.out_dir, cfg.train.save_every, cfg.train.keep_every,
            cfg.train.save_every_iters, self.is_main)
        self.checkpointer.remove_stale_temporaries()

        self.backend = self._build_networks(resuming=bool(resume))
        self.loss = build_loss(cfg).to(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self._build_data()

        self.epoch, self.batch_in_epoch, self.iteration = 0, 0, 0
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self.nonfinite_run = torch.zeros_like(self.nonfinite_total)
        self.nonfinite_max_run = torch.zeros_like(self.nonfinite_total)
        self.grad_norm = torch.zeros((), device=self.device)  # last step's, before clipping
        self.n_bad_images = 0
        self.signals = Signals()
        if resume:
            self.load(None if resume == "auto" else Path(resume))
        # log.jsonl, TensorBoard, W&B: the curves go on from the iteration resumed at
        self.metrics = MetricSinks(self.out_dir, cfg, self.iteration, enabled=self.is_main)
        log.info("iBOT %s: %s, %d process(es)%s, device %s, precision %s, attention %s, "
                 "global batch %d, lr %.3g, %d iterations/epoch",
                 cfg.train.impl, cfg.model.arch, self.world_size, self._parallel_name(),
                 self.device, self.precision, self.backend, self.derived["global_batch"],
                 self.derived["lr"], self.iters_per_epoch)

    # -- what the trainer holds -------------------------------------------------------------

    @property
    def student(self):  # what the step calls (DDP-wrapped across processes)
        return self.params.student

    @property
    def student_module(self):  # the student itself
        return self.params.student_module

    @property
    def teacher(self):
        return self.params.teacher

    @property
    def optimizer(self):
        return self.params.optimizer

    @property
    def sharded(self) -> bool:
        return hasattr(self.params, "mesh")

    def _parallel_name(self) -> str:
        mesh = getattr(self.params, "mesh", None)
        if mesh is not None and mesh.ndim == 2:
            replicas, shards = mesh.shape
            return f" (HSDP: {replicas} replicas of {shards} shards" + (
                "; nothing is sharded: DDP keeps less)" if shards == 1 else ")")
        return " (FSDP)" if mesh is not None else " (DDP)" if self.world_size > 1 else ""

    def _build_networks(self, resuming: bool) -> str:
        """Student and teacher, placed, wrapped or sharded, with their optimizer
        (`self.params`) and compiled blocks; returns the attention backend."""
        cfg = self.cfg
        arch = ARCHS[cfg.model.arch]
        backend = resolve_backend(cfg.model.attention, self.device, arch["heads"],
                                  arch["dim"] // arch["heads"], packed=cfg.model.pack_crops,
                                  low_precision=self.precision in ("bf16", "fp16"))
        torch.manual_seed(cfg.train.seed)  # same initial weights on every process
        student, teacher = build_student_teacher(cfg, backend)
        if cfg.model.init_from and not resuming:  # pre-trained weights for both (a
            # resumed run has its own: the file may be gone by then)
            init_networks(student, teacher, cfg.model.init_from, cfg.model.init_which,
                          trusted=cfg.train.trust_pickle)
        if cfg.train.parallel == "fsdp" and self.world_size == 1:
            log.info("train.parallel=fsdp with one process: nothing to shard")
        if self.fast and cfg.optim.fuse_ema and (cfg.optim.name != "adamw" or
                                                self.precision == "fp16"):
            raise UserError("optim.fuse_ema=true needs optim.name=adamw and bf16/fp32")
        self.params = build_params(cfg, student, teacher, self.device, self.world_size,
                                   self.precision, self.fast)
        self.compiled = self._compile()
        torch.manual_seed(cfg.train.seed + self.rank)  # stochastic depth differs by process
        return backend

    def _compile(self) -> bool:
        """Regional compilation (ibot_fast/compiling.py) of the student's and teacher's
        blocks, when `train.compile` resolves to it; probed before the first step
        (except under FSDP, whose collectives the probe would have to join)."""
        graphs = check_cuda_graphs(self.cfg, self.device, self.sharded)
        wanted, why = resolve_compile(self.cfg.train.compile, self.device)
        log.info("train.compile: %s (%s)", "regional, per block" if wanted else "off", why)
        if not wanted:
            return False
        backbone = self.student_module.backbone
        return compile_backbones([backbone, self.teacher.backbone],
                                 None if self.sharded else self._probe_tokens(backbone),
                                 self.autocast, cuda_graphs=graphs)

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
        """Stop the data workers and close the metric writers (the trainer's state stays
        usable)."""
        self.metrics.close()
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

    # -- one step ----------------------------------------------------------------------------

    def train_step(self, batch, it: int, epoch: int) -> dict:
        """One iteration: schedules, teacher forward, student forward, loss, backward,
        clip, optimizer step, teacher update. Returns the loss terms (device tensors)."""
        o = self.cfg.optim
        hp = self.sched.at(it)
        with phase("data"):
            global_crops, local_crops, masks = (batch[k].to(self.device, non_blocking=True)
                                                for k in ("globals", "locals", "masks"))
            masked = self.masked_rows(batch, masks)  # None on the official full-token path
        with self.autocast():
            with phase("teacher"), torch.no_grad():
                teacher = self.teacher_forward(global_crops, masked)
            with phase("student"):
                student = self.student_forward(global_crops, masks, local_crops, masked)
        with phase("loss"):
            losses = self.loss_terms(student, teacher, masks, masked, batch, epoch)
        self.params.zero_grad()
        with phase("backward"):
            self.scaler.scale(losses["loss"]).backward()
        with phase("optimizer"):
            self.grad_norm = self.params.clip_(self.scaler, o.clip_grad, o.clip_mode)
            skip = self.count_nonfinite(losses["loss"], self.grad_norm)
            self.params.step(hp["lr"], hp["wd"], hp["momentum"],
                             epoch < o.freeze_last_layer, skip, self.scaler)
        with phase("ema"):
            self.params.update_teacher(hp["momentum"])
        return losses

    def masked_rows(self, batch, masks):
        """The fast path's masked patch tokens as rows of a fixed-size buffer."""
        if not self.fast:
            return None
        index = batch["mask_index"].to(self.device, non_blocking=True)  # pinned: no wait
        return MaskedRows.from_masks(masks, index, batch["mask_count"], index.numel())

    def teacher_forward(self, global_crops, masked):
        if masked is None:  # official: heads on every token
            return self.teacher(global_crops)
        return self.teacher.forward_teacher_masked(
            global_crops, masked, self.cfg.loss.center2_from,
            patch_features=self.cfg.loss.fused_last_layer)

    def student_forward(self, global_crops, masks, local_crops, masked):
        if masked is None:
            return self.student(global_crops, masks, local_crops)
        return self.student(global_crops, masks, local_crops, masked=masked,
                            patch_features=self.cfg.loss.fused_last_layer)

    def loss_terms(self, student, teacher, masks, masked, batch, epoch) -> dict:
        """The iBOT loss (and DINOv2's KoLeo term when loss.koleo_weight > 0)."""
        if masked is None:
            losses = self.loss(student.cls, student.patch, teacher.cls, teacher.patch, masks,
                               epoch)
        else:
            last_layers = None
            if self.cfg.loss.fused_last_layer:  # the fused last layer + loss kernel reads them
                s, t = self.student_module.head.last_layer2, self.teacher.head.last_layer2
                last_layers = ((s.weight_v, s.weight_g), (t.weight_v, t.weight_g))
            losses = self.loss.forward_masked(student.cls, student.patch, teacher.cls,
                                              teacher.patch, masked.weight,
                                              batch["mask_count"], epoch, teacher.patch_sum,
                                              last_layers)
        if self.koleo:  # per global crop, over this process's images
            koleo = sum(koleo_loss(crop) for crop in student.backbone_cls.chunk(2))
            losses["koleo"] = koleo
            losses["loss"] = losses["loss"] + self.cfg.loss.koleo_weight * koleo
        return losses

    def count_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """A device flag: this step's loss or gradient norm is not finite on some process
        (then every process skips the step); the counters stay on the device."""
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        if self.world_size > 1:  # one scalar, no host sync
            bad = dist.all_reduce_(bad.float(), op=torch.distributed.ReduceOp.MAX) > 0
        self.nonfinite_total += bad
        self.nonfinite_run = (self.nonfinite_run + 1) * bad
        self.nonfinite_max_run = torch.maximum(self.nonfinite_max_run, self.nonfinite_run)
        return bad

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict:
        self._write_config()
        bar = Progress(self.cfg.train.epochs, self.iters_per_epoch, self.iteration,
                       enabled=self.is_main)
        try:
            with self.signals:
                status = self._loop(bar)
        finally:
            bar.close()
            self.metrics.close()
        bad_images = self.total_bad_images()
        log.info("training %s at epoch %d, iteration %d (non-finite steps skipped: %d, "
                 "unreadable images skipped: %d)", status, self.epoch, self.iteration,
                 int(self.nonfinite_total), bad_images)
        return {"status": status, "epoch": self.epoch, "iteration": self.iteration,
                "nonfinite": int(self.nonfinite_total), "bad_images": bad_images}

    def _loop(self, bar) -> Status:
        log_every = self.cfg.train.log_every
        while self.epoch < self.cfg.train.epochs:
            self.loader.set_epoch(self.epoch, self.batch_in_epoch)
            t_last, it_last = time.time(), self.iteration
            for batch in self.loader:
                losses = self.train_step(batch, self.iteration, self.epoch)
                self.iteration += 1
                self.batch_in_epoch += 1
                self.n_bad_images += batch["n_bad"]
                epoch_done = self.batch_in_epoch == self.iters_per_epoch
                logged = self.iteration % log_every == 0 or epoch_done
                if logged:
                    now = time.time()
                    record = self.log_step(losses, (self.iteration - it_last) / (now - t_last))
                    t_last, it_last = time.time(), self.iteration
                    bar.update(self.epoch, self.batch_in_epoch, self.iteration, record)
                else:
                    bar.update(self.epoch, self.batch_in_epoch, self.iteration)
                if epoch_done:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                status = self.after_step(epoch_done, logged)
                if status is not None:
                    return status
        return Status.FINISHED

    def after_step(self, epoch_done: bool, logged: bool):
        """What happens between steps, in one place: whether to stop (a signal,
        `train.stop_at_iter`), whether to save (`Checkpointer`'s policy, a stop, SIGUSR1),
        the k-NN at an epoch's end. Returns the status to stop with, or None.

        Signals are read at every step boundary with one process; with several, on
        logging steps and at epoch ends, where every process reads them (their flags are
        all-reduced). On the last epoch's end the run finishes whatever arrived."""
        t = self.cfg.train
        last = epoch_done and self.epoch == t.epochs
        stop = requeue = save = False
        if not last and (self.world_size == 1 or logged or epoch_done):
            stop, requeue, save = self.signals.agreed(self.world_size, self.device)
        reached = not last and bool(t.stop_at_iter) and self.iteration >= t.stop_at_iter
        status = (Status.PREEMPTED if stop else Status.REQUEUED if requeue else
                  Status.STOPPED if reached else None)
        ckpt = self.checkpointer
        keep = ckpt.kept_copy(self.epoch) if epoch_done else None
        due = ckpt.due_at_epoch_end(self.epoch, last) if epoch_done else \
            ckpt.due_inside_epoch(self.iteration)
        if (due or status or save) and ckpt.saved_at != self.iteration:
            self.save(keep)
        if status in (Status.PREEMPTED, Status.REQUEUED):
            return status  # pre-emption leaves little time: no k-NN
        if epoch_done and self.cfg.eval.knn_every and \
                (self.epoch % self.cfg.eval.knn_every == 0 or last):
            self.evaluate_knn()
        return status

    def log_step(self, losses: dict, iters_per_s: float) -> dict:
        """The only host synchronisation of the loop: read the device counters and losses."""
        hp = self.sched.at(self.iteration - 1)
        record = {
            "iter": self.iteration, "epoch": self.epoch,
            **{k: float(v.detach()) for k, v in losses.items()},
            **self.loss.cls_target_entropies(),
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
        self.metrics.write(record)
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

    def whole_teacher_backbone(self, everywhere: bool = False):
        """The teacher's backbone, whole, on rank 0 (None elsewhere; `everywhere`: on
        every process). Under FSDP a copy gathered from the shards: every process must
        call it."""
        return self.params.teacher_backbone(self.is_main, everywhere)

    def evaluate_knn(self):
        from .eval.knn import knn_eval_backbone

        # every process extracts its shard of the images (all-gathered)
        results = knn_eval_backbone(self.cfg, self.whole_teacher_backbone(everywhere=True),
                                    self.device)
        if self.is_main:
            log.info("k-NN at epoch %d: %s", self.epoch,
                     ", ".join(f"k={k}: {a:.2f}%" for k, a in results.items()))
            self.metrics.write({"iter": self.iteration, "epoch": self.epoch,
                                **{f"knn_top1_k{k}": a for k, a in results.items()}})
        dist.barrier()

    # -- checkpoints -------------------------------------------------------------------------

    def network_state_dicts(self) -> dict:
        """Unsharded student, teacher and optimizer state. Under FSDP every process must
        call it (it gathers the shards) and only rank 0 gets the tensors."""
        return self.params.state_dict()

    def state_dict(self) -> dict:
        return {
            **self.network_state_dicts(),
            "loss": self.loss.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "iteration": self.iteration, "global_batch": self.derived["global_batch"],
            "config": to_dict(self.cfg),
            "rng": dist.all_gather_object(checkpoint.rng_state()),
            "counters": {"nonfinite_total": int(self.nonfinite_total),
                         "nonfinite_run": int(self.nonfinite_run),
                         "bad_images": self.total_bad_images()},
        }

    def save(self, keep: str = None):
        """The checkpoint (and the kept copy `keep`, a file name). Every process must call
        it: the RNG states, and under FSDP the shards, are gathered; a failed write (a
        full disk) stops every process with the writer's one-line error."""
        state = self.state_dict()
        error = None
        try:
            path = self.checkpointer.save(state, self.iteration, keep)
        except UserError as e:
            error = str(e)
        if self.world_size > 1:
            error = next((e for e in dist.all_gather_object(error) if e), None)
        if error:
            raise UserError(error)
        if self.is_main:
            log.info("checkpoint: %s (epoch %d, iteration %d)", path, self.epoch, self.iteration)
        dist.barrier()

    def load(self, path: Path = None):
        """Resume from `path`, or (None) from the output folder's latest checkpoint,
        falling back to the previous one when the latest does not read or fit."""
        cfg_dict, trusted = to_dict(self.cfg), self.cfg.train.trust_pickle
        if path is None:
            path, ckpt = self.checkpointer.load_for_resume(cfg_dict, trusted)
        else:  # no whole copy per process in host memory
            ckpt = checkpoint.load(path, mmap=True, trusted=trusted)
            checkpoint.check_compatible(ckpt, cfg_dict, path)
        method, operational = checkpoint.changed_settings(ckpt, cfg_dict)
        if method:  # allowed (a longer run, a new lr), but never silent
            log.warning("resuming %s with settings that differ from its own: %s", path,
                        "; ".join(method))
        if operational:
            log.info("resuming %s; changed: %s", path, "; ".join(operational))
        self.params.load_state_dict(ckpt)
        # what stays on the CPU (optimizer steps; every moment of a CPU run) would still
        # read the mapped file, keeping it on disk after the next save replaces it
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.device.type == "cpu":
                    state[key] = value.clone()
        self.loss.load_state_dict(ckpt["loss"])
        if ckpt.get("scaler"):
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
        self.checkpointer.saved_at = self.iteration
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
        # a checkpoint without global_batch: the batch per process x the processes
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
            self.out_dir.mkdir(parents=True, exist_ok=True)
            resolved = {**to_dict(self.cfg), "derived": self.derived,
                        "precision": self.precision}
            (self.out_dir / "config.json").write_text(json.dumps(resolved, indent=2))
            d = self.derived
            (self.out_dir / "config.yaml").write_text(to_yaml(self.cfg, header=[
                "The resolved config of this run: `ibot-fast train --config config.yaml` "
                "reads it back.",
                f"Derived: global batch {d['global_batch']} ({d['world_size']} process(es)), "
                f"lr {d['lr']:.6g}, precision {self.precision} (config.json has them all).",
            ]))


def train(cfg, resume=None) -> dict:
    trainer = Trainer(cfg, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


def resume_choice(cfg, resume):
    """`--resume` (no path) continues the output folder's checkpoint when there is one
    and starts a new run when there is none, so one command serves a job's first start
    and its requeues after pre-emption. Without `--resume`, an output folder that already
    holds a checkpoint is an error: a new run would overwrite it."""
    folder = checkpoint.Checkpointer(cfg.train.output_dir)
    ckpt = folder.latest
    existing = next((p for p in (ckpt, folder.previous) if p.is_file()), None)
    if resume == "auto" and existing is None:
        log.info("--resume: no checkpoint in %s yet, starting a new run", ckpt.parent)
        return None
    if resume is None and existing is not None:
        raise UserError(f"{existing} holds an earlier run: add --resume to continue it, or "
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
        status = train(cfg, agreed_resume_choice(cfg, args.resume, world_size))["status"]
        if status is Status.REQUEUED:
            requeued = slurm.requeue_job()  # outside SLURM (SIGUSR2 by hand): only says so
            if slurm.job_id() is None:
                status = Status.STOPPED
            elif not requeued:
                status = Status.NOT_REQUEUED  # the checkpoint is saved; exit 1 tells
        code = status.exit_code
    except UserError as e:
        print_error(e)
        code = 2
    except BaseException:
        dist.destroy()
        raise
    return dist.end(code)


if __name__ == "__main__":
    sys.exit(main())
