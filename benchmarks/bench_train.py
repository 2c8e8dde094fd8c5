"""The full training step as users run it: images/sec, peak memory, MFU and start-up time
of a preset, beside the official code's step and the preset's variants, in one run.

    python -m benchmarks.bench_train                       # ViT-S/16 and ViT-B/16 paper presets
    python -m benchmarks.bench_train --preset vit_base_16_paper train.batch_size=64
    python -m benchmarks.bench_train --variant "model.activation_checkpointing=selective_mlp"
    python -m benchmarks.bench_train --with-data folder,webdataset   # + fed from JPEGs on disk
    python -m benchmarks.bench_train --with-data --data-variant "data.num_workers=16"
    python -m benchmarks.bench_train --smoke               # demo preset, CPU, seconds (make test)

What a step does is set by the config only: `--preset` names the recipe (one or several,
comma-separated), `key=value` arguments override it for every row, and each
`--variant "key=value ..."` adds a row. The benchmark's own flags choose what to measure
and how long. Rows, for each preset, in this order (`--rows` picks a subset):

  reference (math)   the preset with train.impl=reference model.attention=math
                     train.compile=false: the official code's step (eager, heads on every
                     token, the explicit softmax attention)
  reference (sdpa)   the same with PyTorch's fused attention
  preset             the preset as a user gets it: `train.compile` and `data.pipeline` are
                     `auto`, so compiled (per block) on a GPU and eager on the CPU
  preset + data (<pipeline>, <source>)   with --with-data: the same step fed by the
                     pipeline the preset resolves to (DALI on a GPU where it imports, else
                     the CPU workers) from JPEGs on disk, an ImageFolder and/or webdataset
                     shards; `vs_synthetic` is its wall-clock images/sec over the preset row's
  dinov2style        the preset's `_dinov2style` twin (config.DINOV2_STYLE on top of it)
  variant / data variant   each --variant (synthetic batches) and --data-variant (fed
                     from disk): the preset with those keys
Each row records its resolved settings (compiled or not, attention backend, pipeline), its
config's difference from the preset, and its speed-up and memory ratio against the first
row of its preset in the same run (`speedup_vs` names it).

Synthetic rows time `Trainer.train_step` on device-resident crops (2 x 224 + 10 x 96 with
the paper presets) and masks from the configured sampler: the model step alone. Data rows
draw every warm-up and timed batch from the trainer's own loader; the JPEGs (about
500 x 375, ~75 KB, `bench_data.synthetic_folder`; 64 x 48 with --smoke) are made once
under --data-dir, as many as the steps and the pipeline's read-ahead take, so no epoch
ends inside the timing. The files sit in the page cache: decode + augmentation + step,
not disk reads. After warm-up every step is timed with CUDA events (wall clock on the
CPU): median and 20/80 quantiles, and `img_per_s_wall` from their sum (periodic stalls
count there, not in the median). Peak memory is torch's allocator over the timed steps
(DALI's own GPU pool is not in it). `startup_s`: seconds from building the trainer to the
end of the warm-up, less the warm-up steps at the median speed: model build, attention
backend timing, compilation, data workers and pipeline start. Compiled rows run in one
process: torch.compile's caches are reset before a row whose model differs from the
previous compiled row's, so each such row pays its own compilation (inductor's on-disk
cache still serves graphs it has seen). A few more steps (`--phases`) run with every
named phase of ibot_fast.train timed by CUDA events (ibot_fast.phases: data, teacher,
student, loss, backward, optimizer, ema, which tile the step, "head" nested inside
teacher and student, and "other" for what none of them covers).

FLOPs per image (`step_flops`) count matmul work, 2 FLOPs per multiply-add, as the
row's config computes it: the student's forward + backward (x3) on every crop (less the
residual branches that `model.efficient_drop_path` skips), the teacher's forward on the
global crops, and the heads on the rows each path runs them on (reference: every token
of every crop; fast: CLS + masked rows, the teacher's MLP on all global tokens when
`loss.center2_from=all`). They are model FLOPs: what activation checkpointing recomputes
is not counted (its cost shows as fewer images/sec at the same FLOPs, a lower MFU).
MFU = achieved FLOP/s / the device's dense bf16 peak (benchmarks.common.PEAK_BF16_TFLOPS);
an unknown device gets no MFU. The fast path does fewer FLOPs per image than the
reference: compare images/sec for speed, MFU for how well each uses the device.
"""
import argparse
import dataclasses
import datetime
import gc
import json
import sys
import time
import traceback

import torch

from benchmarks.common import (env_info, git_sha, measure_ceilings, peak_bf16_tflops,
                               peak_memory_mib, peak_memory_reset, print_table, quantiles,
                               record, time_ms)

PHASES = ("data", "teacher", "student", "head", "loss", "backward", "optimizer", "ema")
ROW_KINDS = ("reference_math", "reference_sdpa", "preset", "data", "dinov2style")
DEFAULT_PRESETS = ["vit_small_16_paper", "vit_base_16_paper"]
# every row: where the trainer writes, and no log line inside the timing
BENCH_KEYS = ["train.output_dir=/tmp/ibot_fast_bench", "train.log_every=1000000"]
REFERENCE = {"reference_math": ["train.impl=reference", "model.attention=math",
                                "train.compile=false"],
             "reference_sdpa": ["train.impl=reference", "model.attention=sdpa",
                                "train.compile=false"]}
# --smoke: any preset shrunk to a tiny model on 32 px crops (SMOKE_MODEL: also bench_memory's)
SMOKE_MODEL = ["data.global_size=32", "data.local_size=16", "model.patch_size=4",
               "model.out_dim=512", "model.patch_out_dim=512", "model.head_hidden_dim=256",
               "model.head_bottleneck_dim=64"]
SMOKE_KEYS = ["model.arch=vit_demo", *SMOKE_MODEL, "train.batch_size=4", "data.n_local=2",
              "data.num_workers=0"]
LABELS = {"reference_math": "reference (math)", "reference_sdpa": "reference (sdpa)"}
IMAGE_SIZE, SMOKE_IMAGE_SIZE = (500, 375), (64, 48)


# -- FLOPs -----------------------------------------------------------------------------

def vit_forward_flops(tokens: int, dim: int, depth: int, patch_pixels: int,
                      keep: float = 1.0) -> float:
    """One image through the backbone: 24 n d^2 + 4 n^2 d per block (times `keep`, the
    mean fraction of samples whose residual branches run), plus the patch embedding."""
    per_block = 24 * tokens * dim**2 + 4 * tokens**2 * dim
    return depth * per_block * keep + 2 * (tokens - 1) * patch_pixels * 3 * dim


def head_flops(rows: float, dim: int, hidden: int, bottleneck: int, out_dim: int,
               mlp: bool = True, last: bool = True, layers: int = 3) -> float:
    """`rows` tokens through the head: its MLP (`layers` linear layers, dim -> hidden ->
    ... -> bottleneck) and its last layer (bottleneck -> out_dim)."""
    f = 0.0
    if mlp:
        widths = [dim] + [hidden] * (layers - 1) + [bottleneck]
        f += 2 * rows * sum(a * b for a, b in zip(widths, widths[1:]))
    if last:
        f += 2 * rows * bottleneck * out_dim
    return f


def step_flops(cfg, masked_rows_per_image: float) -> float:
    """FLOPs per image of one training step of `cfg` (see the module docstring)."""
    from ibot_fast.models import ARCHS

    a = ARCHS[cfg.model.arch]
    d, depth = a["dim"], a["depth"]
    m = cfg.model
    p = m.patch_size
    n_g = (cfg.data.global_size // p) ** 2 + 1
    n_l = (cfg.data.local_size // p) ** 2 + 1
    L = cfg.data.n_local
    h = dict(dim=d, hidden=m.head_hidden_dim, bottleneck=m.head_bottleneck_dim,
             layers=m.head_layers)
    K, K2 = m.out_dim, m.patch_out_dim
    # efficient stochastic depth runs each branch on round(B (1 - rate)) samples only
    keep = 1.0 - (m.drop_path_rate / 2 if m.efficient_drop_path and depth > 1 else 0.0)
    student_bb = 3 * (2 * vit_forward_flops(n_g, d, depth, p * p, keep) +
                      L * vit_forward_flops(n_l, d, depth, p * p, keep))
    teacher_bb = 2 * vit_forward_flops(n_g, d, depth, p * p)
    if cfg.train.impl == "reference":  # heads on every token of every crop
        student_head = 3 * (head_flops(2 + L, out_dim=K, **h) +
                            head_flops(2 * (n_g - 1) + L * (n_l - 1), out_dim=K2, **h))
        teacher_head = head_flops(2, out_dim=K, **h) + head_flops(2 * (n_g - 1), out_dim=K2, **h)
    else:  # CLS rows + masked rows; the teacher's MLP on every global token for c2 from all
        rows = masked_rows_per_image
        student_head = 3 * (head_flops(2 + L, out_dim=K, **h) + head_flops(rows, out_dim=K2, **h))
        if cfg.loss.center2_from == "all":
            teacher_head = head_flops(2 * n_g, out_dim=K, last=False, **h) + \
                head_flops(2, out_dim=K, mlp=False, **h) + \
                head_flops(rows, out_dim=K2, mlp=False, **h)
        else:
            teacher_head = head_flops(2, out_dim=K, **h) + head_flops(rows, out_dim=K2, **h)
    return student_bb + teacher_bb + student_head + teacher_head


# -- the rows of a run -------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One configuration to measure: `overrides` apply on top of `preset`."""
    preset: str  # the headline preset this row belongs to
    kind: str  # reference_math | reference_sdpa | preset | data | dinov2style | variant
    label: str
    build_preset: str  # the preset the config is built from (the _dinov2style twin)
    overrides: list
    source: str = None  # data rows: folder | webdataset


def dinov2style_of(preset: str):
    """(preset to build, extra keys): the `_dinov2style` twin where there is one, else the
    preset with config.DINOV2_STYLE on top."""
    from ibot_fast.config import DINOV2_STYLE, PRESETS

    twin = preset.replace("_paper", "_dinov2style")
    if twin != preset and twin in PRESETS:
        return twin, []
    return preset, [f"{k}={_key_text(v)}" for k, v in DINOV2_STYLE.items()]


def _key_text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def plan_rows(args):
    """Every Row of the run, preset by preset, in the order of the module docstring."""
    base = BENCH_KEYS + (SMOKE_KEYS if args.smoke else []) + args.overrides
    sources = args.with_data or []
    for preset in args.preset:
        for kind in args.rows:
            if kind in REFERENCE:
                yield Row(preset, kind, LABELS[kind], preset, base + REFERENCE[kind])
            elif kind == "preset":
                yield Row(preset, kind, "preset", preset, list(base))
            elif kind == "data":
                for source in sources:
                    yield Row(preset, kind, "preset + data", preset, list(base), source)
            elif kind == "dinov2style":
                twin, extra = dinov2style_of(preset)
                yield Row(preset, kind, "dinov2style", twin, base + extra)
        for variant in args.variant:
            yield Row(preset, "variant", variant, preset, base + variant.split())
        for variant in args.data_variant:
            for source in sources:
                yield Row(preset, "data_variant", f"data + {variant}", preset,
                          base + variant.split(), source)


def data_label(label: str, pipeline: str, source: str) -> str:
    """'preset + data' -> 'preset + data (dali, folder)': what fed the row."""
    return label.replace("data", f"data ({pipeline}, {source})", 1)


def build_row_config(row: Row, args, data_paths: dict):
    """The row's Config: the preset, its overrides, then where its images come from."""
    from ibot_fast.config import build_config, set_key

    if row.source is None:
        where = ["data.source=synthetic"]
    else:
        where = [f"data.source={row.source}", f"data.path={data_paths[row.source]}"]
    cfg = build_config(row.build_preset, row.overrides + where)
    set_key(cfg, "data.synthetic_size", cfg.train.batch_size)
    return cfg


def config_diff(cfg, preset: str) -> dict:
    """{dotted key: value} where the row's config differs from the preset's."""
    from ibot_fast.config import PRESETS, Config, apply_overrides, to_dict

    base = to_dict(apply_overrides(Config(), PRESETS[preset]))
    mine = to_dict(cfg)
    return {f"{s}.{k}": v for s, section in mine.items() for k, v in section.items()
            if base[s][k] != v}


def data_paths(args, images: int) -> dict:
    """{source: data.path} of the JPEGs for --with-data, made once under --data-dir."""
    from benchmarks.bench_data import synthetic_folder, synthetic_shards

    if not args.with_data:
        return {}
    size = SMOKE_IMAGE_SIZE if args.smoke else IMAGE_SIZE
    t0 = time.perf_counter()
    folder = synthetic_folder(images, size, root=args.data_dir)
    paths = {"folder": str(folder)}
    if "webdataset" in args.with_data:
        paths["webdataset"] = str(synthetic_shards(folder))
    print(f"data: {images} JPEGs of {size[0]} x {size[1]} under {folder} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return paths


def images_needed(args, batch: int) -> int:
    """Enough images that no epoch ends inside the timing: the warm-up and timed steps,
    the pipeline's read-ahead, and spare (the same count for every preset of one batch
    size, so the runs of a GPU session share one folder)."""
    return batch * (args.warmup + args.steps + 8)


# -- one row -------------------------------------------------------------------------------

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


def iteration(trainer, i: int) -> int:
    """The schedules' iteration for the i-th benchmark step: past the first few, within
    the run's length (the demo preset's is short)."""
    return (10 + i) % len(trainer.sched.lr)


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
            trainer.train_step(batch, iteration(trainer, i), 1)
        if end is not None:
            end.record()
        phases = timer.total_ms()  # synchronises
    step_ms = start.elapsed_time(end) if start is not None else (time.perf_counter() - t0) * 1e3
    out = {k: v / steps for k, v in phases.items()}
    out["other"] = (step_ms - sum(phases.get(k, 0.0) for k in PHASES if k != "head")) / steps
    return out


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(cfg, device, steps: int, warmup: int, with_data: bool, phases: bool) -> dict:
    """Build a Trainer for cfg, warm it up, time `steps` steps; the row's measurements."""
    from ibot_fast.train import Trainer

    graphs = _graph_count()
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    build_s = time.perf_counter() - t0
    batches = None
    try:
        batch = synthetic_batch(trainer, cfg, device)
        batches = epochs(trainer.loader) if with_data else None
        it = {"i": 0, "wait_s": 0.0}

        def step():
            if with_data:
                w = time.perf_counter()
                b = next(batches)
                it["wait_s"] += time.perf_counter() - w
            else:
                b = batch
            trainer.train_step(b, iteration(trainer, it["i"]), 1)
            it["i"] += 1

        step()
        _sync(device)
        first_step_s = time.perf_counter() - t0 - build_s
        for _ in range(warmup - 1):
            step()
        _sync(device)
        warm_s = time.perf_counter() - t0
        warm_graphs = _graph_count()
        peak_memory_reset(device)
        it["wait_s"] = 0.0
        times = time_ms(step, device, warmup=0, reps=steps)
        alloc, reserved = peak_memory_mib(device)
        med, q20, q80 = quantiles(times)
        B = cfg.train.batch_size
        rows = (batch["mask_count"] / B) if "mask_count" in batch else \
            float(batch["masks"].sum()) / B
        flops = step_flops(cfg, rows)
        result = {
            "img_per_s": B / (med / 1e3), "img_per_s_q20": B / (q80 / 1e3),
            "img_per_s_q80": B / (q20 / 1e3), "img_per_s_wall": B * steps / (sum(times) / 1e3),
            "step_ms": med, "step_ms_q20": q20, "step_ms_q80": q80,
            "peak_alloc_mib": alloc, "peak_reserved_mib": reserved,
            "gflop_per_img": flops / 1e9, "tflops": flops * B / (med / 1e3) / 1e12,
            "build_s": round(build_s, 2), "first_step_s": round(first_step_s, 2),
            "startup_s": round(max(0.0, warm_s - warmup * med / 1e3), 2),
            # torch.compile graphs made in the build and warm-up, and (never, one hopes)
            # inside the timing
            "graphs_compiled": warm_graphs - graphs,
            "graphs_in_timing": _graph_count() - warm_graphs,
            "compiled": trainer.compiled, "attention": trainer.backend,
            "precision": trainer.precision,
        }
        if with_data:
            result["data_wait_ms"] = it["wait_s"] / steps * 1e3  # host time in next(batch)
        if phases:
            result["phases_ms"] = phase_breakdown(trainer, batch, device)
        return result
    finally:
        if batches is not None:
            batches.close()
        trainer.close()
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _model_signature(cfg) -> str:
    """What torch.compile's graphs depend on: everything but the data keys."""
    from ibot_fast.config import to_dict

    return json.dumps({k: v for k, v in to_dict(cfg).items() if k != "data"}, sort_keys=True)


# -- the run -------------------------------------------------------------------------------

def get_args_parser():
    p = argparse.ArgumentParser("bench_train", description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every row (ibot-fast keys lists them)")
    p.add_argument("--preset", action="append", default=None,
                   help="preset(s) to measure, comma-separated or repeated (default "
                   f"{','.join(DEFAULT_PRESETS)}; --smoke: demo)")
    p.add_argument("--rows", default=",".join(ROW_KINDS),
                   help=f"row kinds, in this order: {','.join(ROW_KINDS)} (data: with "
                   "--with-data only)")
    p.add_argument("--variant", action="append", default=[], metavar='"k=v ..."',
                   help="a row of the preset with these overrides (repeatable)")
    p.add_argument("--data-variant", action="append", default=[], metavar='"k=v ..."',
                   help="with --with-data: a row fed from disk with these overrides")
    p.add_argument("--with-data", nargs="?", const="folder", default=None,
                   metavar="folder,webdataset",
                   help="add rows fed from JPEGs on disk: an ImageFolder and/or webdataset "
                   "shards of the same images (default: folder)")
    p.add_argument("--data-dir", default="/tmp",
                   help="where the JPEGs (and shards) are made once and kept")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per row (default 20; --smoke: 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps before the timing, compilation included (default 5; --smoke: 1)")
    p.add_argument("--phases", default="preset",
                   help="row kinds that also get the per-phase breakdown (all, none, or a "
                   "list)")
    p.add_argument("--trace", type=int, default=0, metavar="N",
                   help="also print the N kernels with the most device time per synthetic row")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model (any preset shrunk), 2 steps, CPU")
    p.add_argument("--results-name", default="train")
    p.add_argument("--run-id", default=None,
                   help="tag of this run's rows (default: time and git SHA); one id over "
                   "several calls makes one table (benchmarks.summary --run)")
    return p


def parse_args(argv=None):
    from ibot_fast.config import PRESETS

    args = get_args_parser().parse_args(argv)
    args.preset = [p.strip() for item in (args.preset or (["demo"] if args.smoke
                                                          else DEFAULT_PRESETS))
                   for p in item.split(",") if p.strip()]
    unknown = [p for p in args.preset if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if set(args.rows) - set(ROW_KINDS):
        raise SystemExit(f"--rows takes {', '.join(ROW_KINDS)}, not {args.rows}")
    args.with_data = [s.strip() for s in args.with_data.split(",")] if args.with_data else []
    if set(args.with_data) - {"folder", "webdataset"}:
        raise SystemExit(f"--with-data takes folder, webdataset or both, not {args.with_data}")
    args.phases = {"all": set(ROW_KINDS) | {"variant", "data_variant"}, "none": set()}.get(
        args.phases, {k.strip() for k in args.phases.split(",")})
    args.steps = args.steps or (2 if args.smoke else 20)
    args.warmup = max(1, args.warmup or (1 if args.smoke else 5))
    args.run_id = args.run_id or (datetime.datetime.now().strftime("%Y%m%d-%H%M%S") +
                                  f"-{git_sha()}")
    return args


def main(argv=None):
    from ibot_fast.compiling import resolve_compile
    from ibot_fast.data import resolve_pipeline

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = env_info(device)["device"]
    peak = peak_bf16_tflops(name) if device.type == "cuda" else None
    ceilings = measure_ceilings(device)
    print(f"device: {name}; dense bf16 peak: {peak or 'unknown'} TFLOP/s; measured: "
          f"{ceilings['matmul_tflops']} TFLOP/s matmul, {ceilings['copy_gbps']} GB/s copy; "
          f"run {args.run_id}", flush=True)
    plan = list(plan_rows(args))
    paths = {}
    if any(r.source for r in plan):
        batch = max(build_row_config(r, args, {"folder": "-", "webdataset": "-"}).train.batch_size
                    for r in plan if r.source)
        paths = data_paths(args, images_needed(args, batch))
    rows, first, last_compiled, path = [], {}, None, None
    for spec in plan:
        row = {"bench": "train", "run": args.run_id, "preset": spec.preset, "kind": spec.kind,
               "row": spec.label, "smoke": args.smoke, "with_data": spec.source,
               "overrides": spec.overrides, "peak_tflops": peak,
               "measured_matmul_tflops": ceilings["matmul_tflops"]}
        try:
            cfg = build_row_config(spec, args, paths)
            row.update(model=cfg.model.arch, batch=cfg.train.batch_size,
                       n_local=cfg.data.n_local, config_diff=config_diff(cfg, spec.preset))
            if spec.source:
                row["pipeline"] = resolve_pipeline(cfg.data.pipeline, device)
                row["row"] = data_label(spec.label, row["pipeline"], spec.source)
            if resolve_compile(cfg.train.compile, device)[0]:
                if last_compiled not in (None, _model_signature(cfg)):
                    torch._dynamo.reset()  # each model compiles its own graphs
                last_compiled = _model_signature(cfg)
            print(f"-- {spec.preset}: {row['row']}", flush=True)
            row.update(bench_one(cfg, device, args.steps, args.warmup, spec.source is not None,
                                 spec.kind in args.phases and spec.source is None))
        except torch.cuda.OutOfMemoryError:
            print(f"   out of memory at batch {row.get('batch')}")
            row["oom"] = True
        except Exception as e:  # noqa: BLE001 - a failed row is recorded, the run goes on
            traceback.print_exc()
            lines = str(e).strip().splitlines()
            row["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]
        if peak and "tflops" in row:
            row["mfu"] = row["tflops"] / peak
            if ceilings["matmul_tflops"]:
                row["mfu_vs_measured"] = row["tflops"] / ceilings["matmul_tflops"]
        base = first.setdefault(spec.preset, row) if "img_per_s" in row else first.get(spec.preset)
        add_ratios(row, base, rows)
        rows.append(row)
        path = record(args.results_name, [row], device)  # now: a later timeout keeps it
        if args.trace and "img_per_s" in row and not spec.source:
            print_top_kernels(cfg, device, args.trace)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nrows appended to {path}")
    print_table(rows, ["model", "row", "batch", "img_per_s", "step_ms", "peak_alloc_mib",
                       "gflop_per_img", "mfu", "speedup", "vs_synthetic", "startup_s",
                       "error"])
    for r in rows:
        if r.get("phases_ms"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(
                r["phases_ms"].items(), key=lambda kv: -kv[1]))
            print(f"phases (ms/step; head is inside teacher/student) {r['model']} "
                  f"{r['row']}: {parts}")
    return 0


def add_ratios(row, base, rows):
    """speed-up and memory ratio against the first row of the preset; a data row's
    wall-clock images/sec against the preset's synthetic row."""
    if base is not None and base is not row and "img_per_s" in row:
        row["speedup"] = row["img_per_s"] / base["img_per_s"]
        row["speedup_vs"] = base["row"]
        if base.get("peak_alloc_mib") and row.get("peak_alloc_mib"):
            row["mem_ratio"] = row["peak_alloc_mib"] / base["peak_alloc_mib"]
    if row.get("with_data") and "img_per_s_wall" in row:
        synthetic = next((r for r in rows if r["preset"] == row["preset"] and
                          r["kind"] == "preset" and "img_per_s_wall" in r), None)
        if synthetic is not None:
            row["vs_synthetic"] = row["img_per_s_wall"] / synthetic["img_per_s_wall"]


def print_top_kernels(cfg, device, n: int, steps: int = 3) -> None:
    """The n kernels (or CPU ops) with the most self time over a few steps, from the
    profiler: where the step's time goes, below the level of the named phases."""
    from torch.profiler import ProfilerActivity, profile

    from ibot_fast.train import Trainer

    trainer = Trainer(cfg)
    batch = synthetic_batch(trainer, cfg, device)
    for i in range(2):
        trainer.train_step(batch, iteration(trainer, i), 1)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] +
                 ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(steps):
            trainer.train_step(batch, iteration(trainer, 2 + i), 1)
        if cuda:
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=n, max_name_column_width=70))
    trainer.close()
    del trainer, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
