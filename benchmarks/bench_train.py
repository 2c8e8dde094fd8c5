"""Full training step: images/sec, peak memory, MFU and a per-phase breakdown,
the fast path against the reference path (official semantics, eager), in one run.

    python -m benchmarks.bench_train                      # ViT-S/16 and ViT-B/16, batch 128
    python -m benchmarks.bench_train --models vit_large --batch 64
    python -m benchmarks.bench_train --compile            # torch.compile of the fast path too
    python -m benchmarks.bench_train --with-data          # include the data pipeline
    python -m benchmarks.bench_train --with-data --pipeline dali --workers 16
    python -m benchmarks.bench_train --smoke              # tiny model, 2 steps, CPU (make test)

Each configuration builds a `Trainer` and times `train_step` on device-resident synthetic
crops (2 x 224 + 10 x 96 by default) with masks from the configured sampler, so the model
step is measured, not the data path (`--with-data` feeds batches from the configured
pipeline instead: synthetic JPEGs on disk (bench_data's, 500 x 375), decoded and augmented
by DALI or the CPU workers, enough of them for the whole run, so no epoch restarts inside
the timing). After
warm-up, every step is timed with CUDA events (median and 20/80 quantiles); peak memory is
read over the timed steps; a few more steps run with every named phase of
ibot_fast.train timed by CUDA events (ibot_fast.phases: data, teacher, student, loss,
backward, optimizer, ema, which tile the step, "head" nested inside teacher and student,
and "other" for what none of them covers).

FLOPs per image (`step_flops`) count matmul work, 2 FLOPs per multiply-add: the student's
forward + backward (x3) on every crop, the teacher's forward on the global crops, and the
heads on the rows each path actually runs them on (reference: every token of every crop;
fast: CLS + masked rows, the teacher MLP on all patch tokens when center2_from=all).
They are model FLOPs: what activation checkpointing recomputes is not counted (its cost
shows as fewer images/sec at the same FLOPs per image, so a lower MFU).
MFU = achieved FLOP/s / the device's dense bf16 peak (benchmarks.common.PEAK_BF16_TFLOPS);
an unknown device prints no MFU. The fast path does fewer FLOPs per image than the
reference: compare images/sec for speed, MFU for how well each uses the device.
"""
import argparse
import gc
import sys
import time
import traceback

import torch

from ibot_fast.models.vit import CHECKPOINTING

from benchmarks.common import (env_info, measure_ceilings, peak_bf16_tflops, peak_memory_mib,
                               peak_memory_reset, print_table, quantiles, record, time_ms)

PHASES = ("data", "teacher", "student", "head", "loss", "backward", "optimizer", "ema")
# --smoke: a tiny model on 32 px crops (also bench_memory's)
SMOKE_MODEL = ["data.global_size=32", "data.local_size=16", "model.patch_size=4",
               "model.out_dim=512", "model.patch_out_dim=512", "model.head_hidden_dim=256",
               "model.head_bottleneck_dim=64"]


# -- FLOPs -----------------------------------------------------------------------------

def vit_forward_flops(tokens: int, dim: int, depth: int, patch_pixels: int) -> float:
    """One image through the backbone: 24 n d^2 + 4 n^2 d per block, plus patch embed."""
    per_block = 24 * tokens * dim**2 + 4 * tokens**2 * dim
    return depth * per_block + 2 * (tokens - 1) * patch_pixels * 3 * dim


def head_flops(rows: float, dim: int, hidden: int, bottleneck: int, out_dim: int,
               mlp: bool = True, last: bool = True) -> float:
    f = 0.0
    if mlp:
        f += 2 * rows * (dim * hidden + hidden * hidden + hidden * bottleneck)
    if last:
        f += 2 * rows * bottleneck * out_dim
    return f


def step_flops(cfg, impl: str, masked_rows_per_image: float) -> float:
    """FLOPs per image of one training step (see the module docstring)."""
    from ibot_fast.models import ARCHS

    a = ARCHS[cfg.model.arch]
    d, depth = a["dim"], a["depth"]
    p = cfg.model.patch_size
    n_g = (cfg.data.global_size // p) ** 2 + 1
    n_l = (cfg.data.local_size // p) ** 2 + 1
    L = cfg.data.n_local
    m = cfg.model
    h = dict(dim=d, hidden=m.head_hidden_dim, bottleneck=m.head_bottleneck_dim)
    K = m.out_dim
    student_bb = 3 * (2 * vit_forward_flops(n_g, d, depth, p * p) +
                      L * vit_forward_flops(n_l, d, depth, p * p))
    teacher_bb = 2 * vit_forward_flops(n_g, d, depth, p * p)
    if impl == "reference":  # heads on every token of every crop
        student_head = 3 * head_flops(2 * n_g + L * n_l, out_dim=K, **h)
        teacher_head = head_flops(2 * n_g, out_dim=K, **h)
    else:  # CLS rows + masked rows; teacher MLP on all patches for center2_from=all
        student_head = 3 * head_flops(2 + L + masked_rows_per_image, out_dim=K, **h)
        if cfg.loss.center2_from == "all":
            teacher_head = head_flops(2 * n_g, out_dim=K, last=False, **h) + \
                head_flops(2 + masked_rows_per_image, out_dim=K, mlp=False, **h)
        else:
            teacher_head = head_flops(2 + masked_rows_per_image, out_dim=K, **h)
    return student_bb + teacher_bb + student_head + teacher_head


# -- one configuration -------------------------------------------------------------------

def synthetic_batch(trainer, cfg, device, seed=0):
    """Device-resident crops and masks shaped like a real batch."""
    from ibot_fast.masking import masked_index, sampler_from_config

    g = torch.Generator().manual_seed(seed)
    B, L = cfg.train.batch_size, cfg.data.n_local
    S, s = cfg.data.global_size, cfg.data.local_size
    grid = (S // cfg.model.patch_size,) * 2
    sampler = sampler_from_config(cfg.masks, grid)
    masks = sampler(2 * B)
    batch = {
        "globals": torch.randn(2 * B, 3, S, S, generator=g).to(device),
        "locals": torch.randn(L * B, 3, s, s, generator=g).to(device),
        "masks": masks.to(device),
        "n_bad": 0,
    }
    if trainer.mask_rows is not None:
        index, count = masked_index(masks, trainer.mask_rows)
        batch["mask_index"], batch["mask_count"] = index.to(device), count
    return batch


def phase_breakdown(trainer, batch, device, steps: int = 5) -> dict:
    """ms per step of each named phase (ibot_fast.phases), timed with CUDA events around
    each range, so the backward kernels that autograd's thread launches count under
    "backward". The top-level phases tile the step; "head" is nested inside teacher and
    student; "other" is what no top-level phase covers (schedules, launch gaps)."""
    from ibot_fast.phases import PhaseTimer

    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2)) \
        if device.type == "cuda" else (None, None)
    with PhaseTimer(device) as timer:
        t0 = time.perf_counter()
        if start is not None:
            start.record()
        for i in range(steps):
            trainer.train_step(batch, 10 + i, 1)
        if end is not None:
            end.record()
        phases = timer.total_ms()  # synchronises
    step_ms = start.elapsed_time(end) if start is not None else (time.perf_counter() - t0) * 1e3
    out = {k: v / steps for k, v in phases.items()}
    out["other"] = (step_ms - sum(phases.get(k, 0.0) for k in PHASES if k != "head")) / steps
    return out


def jpeg_folder(n: int, size) -> str:
    """A folder of n synthetic (width, height) JPEGs (bench_data's, made once under /tmp)
    for --with-data."""
    from benchmarks.bench_data import synthetic_folder

    return str(synthetic_folder(n, size))


def epochs(loader, first: int = 1):
    """The loader's batches, epoch after epoch (set_epoch before each), without end."""
    epoch = first
    while True:
        loader.set_epoch(epoch)
        empty = True
        for b in loader:
            empty = False
            yield b
        if empty:
            raise RuntimeError("the data loader yielded no batch in a whole epoch")
        epoch += 1


def bench_one(cfg, device, steps: int, warmup: int, with_data: bool, compile_: bool,
              profile_phases: bool) -> dict:
    from ibot_fast.train import Trainer

    cfg.train.compile = compile_
    trainer = Trainer(cfg)
    batch = synthetic_batch(trainer, cfg, device)
    batches = epochs(trainer.loader) if with_data else None
    it = {"i": 0}

    def step():
        b = next(batches) if with_data else batch
        trainer.train_step(b, 10 + it["i"] % 50, 1)
        it["i"] += 1

    for _ in range(warmup):
        step()
    peak_memory_reset(device)
    times = time_ms(step, device, warmup=0, reps=steps)
    alloc, reserved = peak_memory_mib(device)
    med, q20, q80 = quantiles(times)
    B = cfg.train.batch_size
    rows = (batch["mask_count"] / B) if "mask_count" in batch else \
        float(batch["masks"].sum()) / B
    flops = step_flops(cfg, cfg.train.impl, rows)
    result = {
        "img_per_s": B / (med / 1e3), "img_per_s_q20": B / (q80 / 1e3),
        "img_per_s_q80": B / (q20 / 1e3), "step_ms": med, "step_ms_q20": q20,
        "step_ms_q80": q80, "peak_alloc_mib": alloc, "peak_reserved_mib": reserved,
        "gflop_per_img": flops / 1e9, "tflops": flops * B / (med / 1e3) / 1e12,
    }
    if profile_phases:
        result["phases_ms"] = phase_breakdown(trainer, batch, device)
    del trainer, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def configs(args):
    """(label, overrides) for every model x impl to measure."""
    workers = args.workers if args.with_data else 0
    base = [f"data.n_local={args.n_local}", "data.source=synthetic",
            f"data.num_workers={workers}",
            f"data.pipeline={args.pipeline if args.with_data else 'cpu'}",
            "train.output_dir=/tmp/ibot_fast_bench", "train.log_every=1000000",
            f"masks.sampler={args.sampler}", f"train.precision={args.precision}"]
    for model in args.models:
        batch = args.batch or (64 if model == "vit_large" else 128)
        common = base + [f"model.arch={model}", f"train.batch_size={batch}",
                         f"data.synthetic_size={batch}"]
        if args.with_data:  # JPEGs on disk, as a real dataset (DALI decodes them on the GPU)
            images = batch * (args.steps + args.warmup + 2)
            common += ["data.source=folder",
                       f"data.path={jpeg_folder(images, (64, 48) if args.smoke else (500, 375))}"]
        if args.smoke:
            common += SMOKE_MODEL
        for impl in args.impls:
            extra = [f"train.impl={impl}"]
            if impl == "fast":
                extra += [f"model.pack_crops={args.pack}", f"loss.center2_from={args.center2}",
                          f"loss.fused_last_layer={args.fused_last_layer}",
                          f"optim.fuse_ema={args.fuse_ema}", f"optim.clip_mode={args.clip_mode}",
                          f"model.attention={args.attention}",
                          f"model.efficient_drop_path={args.efficient_drop_path}",
                          f"model.layernorm_fp32={args.layernorm_fp32}",
                          f"model.activation_checkpointing={args.checkpointing}"]
            else:
                extra += ["model.attention=math" if args.reference_math else "model.attention=sdpa"]
            yield model, impl, False, common + extra
            if impl == "fast" and args.compile:
                yield model, impl, True, common + extra


def get_args_parser():
    p = argparse.ArgumentParser("bench_train", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vit_small,vit_base",
                   type=lambda s: [m.strip() for m in s.split(",") if m.strip()])
    p.add_argument("--impls", default="reference,fast",
                   type=lambda s: [m.strip() for m in s.split(",") if m.strip()])
    p.add_argument("--batch", type=int, default=0, help="per GPU (default 128, 64 for vit_large)")
    p.add_argument("--n-local", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default="auto")
    p.add_argument("--sampler", default="stratified", choices=("iid", "stratified"))
    p.add_argument("--center2", default="masked", choices=("all", "masked"))
    p.add_argument("--pack", default="true")
    p.add_argument("--attention", default="auto")
    p.add_argument("--fused-last-layer", default="false")
    p.add_argument("--fuse-ema", default="false")
    p.add_argument("--clip-mode", default="per_param", choices=("per_param", "global"),
                   help="fast path's gradient clipping (the reference path: per_param)")
    p.add_argument("--efficient-drop-path", default="true")
    p.add_argument("--layernorm-fp32", default="false",
                   help="fast path: model.layernorm_fp32 (false: LayerNorms in bf16)")
    p.add_argument("--checkpointing", default="none", choices=CHECKPOINTING,
                   help="fast path: model.activation_checkpointing")
    p.add_argument("--reference-math", action="store_true",
                   help="reference path with the math attention (the official code's)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    p.add_argument("--with-data", action="store_true", help="feed batches from the data path")
    p.add_argument("--pipeline", default="auto", choices=("auto", "dali", "cpu"),
                   help="with --with-data: data.pipeline (auto: DALI on a GPU when installed)")
    p.add_argument("--workers", type=int, default=8,
                   help="with --with-data: data.num_workers (CPU workers / DALI threads)")
    p.add_argument("--no-phases", action="store_true", help="skip the per-phase breakdown")
    p.add_argument("--trace", type=int, default=0, metavar="N",
                   help="also print the N kernels with the most device time per config")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps, CPU")
    p.add_argument("--results-name", default="train")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from ibot_fast.config import build_config

    if args.smoke:
        args.models = ["vit_demo"] if args.models == ["vit_small", "vit_base"] else args.models
        args.batch = args.batch or 4
        args.n_local = min(args.n_local, 2)
        args.steps, args.warmup = 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = env_info(device)["device"]
    peak = peak_bf16_tflops(name) if device.type == "cuda" else None
    ceilings = measure_ceilings(device)
    print(f"device: {name}; dense bf16 peak: {peak or 'unknown'} TFLOP/s; measured: "
          f"{ceilings['matmul_tflops']} TFLOP/s matmul, {ceilings['copy_gbps']} GB/s copy")
    rows = []
    for model, impl, compiled, overrides in configs(args):
        cfg = build_config(None, overrides)
        label = f"{model} {impl}{' +compile' if compiled else ''}"
        print(f"-- {label}", flush=True)
        try:
            res = bench_one(cfg, device, args.steps, args.warmup, args.with_data, compiled,
                            not args.no_phases)
        except torch.cuda.OutOfMemoryError:
            print(f"   out of memory at batch {cfg.train.batch_size}")
            res = {"oom": True}
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a failed row is recorded, the sweep goes on
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"[:500]}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = {"bench": "train", "model": model, "impl": impl, "compile": compiled,
               "batch": cfg.train.batch_size, "n_local": cfg.data.n_local,
               "precision": cfg.train.precision, "with_data": args.with_data,
               "smoke": args.smoke, "overrides": overrides, **res,
               "peak_tflops": peak, "measured_matmul_tflops": ceilings["matmul_tflops"]}
        if peak and "tflops" in res:
            row["mfu"] = res["tflops"] / peak
            if ceilings["matmul_tflops"]:
                row["mfu_vs_measured"] = res["tflops"] / ceilings["matmul_tflops"]
        rows.append(row)
        add_ratios(rows)  # against the reference row of this model, measured just before
        path = record(args.results_name, [row], device)  # now: a later timeout keeps it
        if args.trace and "error" not in res and "oom" not in res:
            print_top_kernels(cfg, device, args.trace)
    print(f"\nrows appended to {path}")
    print_table(rows, ["model", "impl", "compile", "batch", "img_per_s", "step_ms",
                       "peak_alloc_mib", "gflop_per_img", "tflops", "mfu", "speedup",
                       "mem_ratio"])
    for r in rows:
        if r.get("phases_ms"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(
                r["phases_ms"].items(), key=lambda kv: -kv[1]))
            print(f"phases (ms/step; head is inside teacher/student) {r['model']} "
                  f"{r['impl']}{' +compile' if r.get('compile') else ''}: {parts}")
    return 0


def print_top_kernels(cfg, device, n: int, steps: int = 3) -> None:
    """The n kernels (or CPU ops) with the most self time over a few steps, from the
    profiler: where the step's time goes, below the level of the named phases."""
    from torch.profiler import ProfilerActivity, profile

    from ibot_fast.train import Trainer

    trainer = Trainer(cfg)
    batch = synthetic_batch(trainer, cfg, device)
    for i in range(2):
        trainer.train_step(batch, 10 + i, 1)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] +
                 ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(steps):
            trainer.train_step(batch, 20 + i, 1)
        if cuda:
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=n, max_name_column_width=70))
    del trainer, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def add_ratios(rows):
    """speedup and memory ratio of each fast row against the reference row of its model."""
    ref = {r["model"]: r for r in rows if r["impl"] == "reference" and "img_per_s" in r}
    for r in rows:
        base = ref.get(r["model"])
        if base and "img_per_s" in r and r["impl"] != "reference":
            r["speedup"] = r["img_per_s"] / base["img_per_s"]
            if base.get("peak_alloc_mib") and r.get("peak_alloc_mib"):
                r["mem_ratio"] = r["peak_alloc_mib"] / base["peak_alloc_mib"]


if __name__ == "__main__":
    sys.exit(main())
