"""The iBOT loss over the head outputs: centred cross-entropy kernels vs eager and compile.

    python -m benchmarks.bench_centered_ce                    # GPU: rows x K sweep
    python -m benchmarks.bench_centered_ce --rows 7500 --K 65536 --methods triton,fused_head
    python -m benchmarks.bench_centered_ce --smoke            # tiny shapes, any machine

Shapes: rows in {256 (CLS tokens), 7500 (masked patch tokens), 50176 (all patch tokens)}
x K in {8192, 65536}; logits and head operands in bf16 (the trainer's autocast dtype),
features of dimension D = 256. Methods, each timed forward only (`fwd`, no autograd) and
forward + backward (`fwd+bwd`, gradient of the loss rows with respect to the student):

  on logits [rows, K] (student, teacher):
    eager           the twin `ibot_fast.reference.centered_ce.centered_softmax_ce_and_colsum`
    compile         torch.compile of that twin
    triton          `kernels.centered_softmax_ce_and_colsum`
    triton_inplace  the same with inplace_grad=True (gradient written into the logits)
  on features [rows, D] and the weight-normalised last layers (v [K, D], g [K, 1]):
    head+eager      the twin `ibot_fast.reference.fused_head.fused_head_ce`: PyTorch
                    head matmuls, then the eager loss
    head+triton     PyTorch head matmuls (bf16, as autocast runs them), then `triton`
    fused_head      `kernels.fused_head_ce` (kernels/fused_head.py): logits computed on
                    chip, never stored
  tilings of the logits kernel's forward (`--tiles 16x256x4,4x1024x8`: BLOCK_R x BLOCK_K x
  warps), each a method `triton@RxKxW` (its backward keeps the default tiles): the data
  for choosing `_ce_blocks`' GPU configuration

    python -m benchmarks.bench_centered_ce --rows 50176 --K 8192 --methods triton \
        --tiles 16x256x4,8x256x2,32x256x8,4x1024x8

Time: CUDA events, median and 20/80 quantiles after warm-up; inputs are rotated among
copies that together exceed L2 when one copy would fit. `extra_mib`: peak memory allocated
during one call beyond the inputs (gradients included). `gbps`: the bytes counted in
kernels/centered_ce.py per row, forward 2 K elt, forward + backward 5 K elt (in-place
mode 7 K elt), over the median time; `of_copy` is that over the measured device-copy
bandwidth. For the head methods `tflops` counts the useful matmul FLOPs, 4 rows K D
forward and 8 rows K D forward + backward. Shapes that would not fit in free GPU memory
are skipped (status `skip`), out-of-memory errors are recorded (`oom`), and the sweep
stops starting new measurements after --max-minutes.
The smoke run on a machine without a GPU runs the Triton kernels under the interpreter, so
its times say nothing about speed; it checks that the benchmark runs.
"""
import argparse
import contextlib
import importlib
import math
import os
import time
import traceback

import torch
import torch.nn.functional as F

from benchmarks import common

ROWS = (256, 7500, 50176)
KS = (8192, 65536)
D = 256
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
LOGIT_METHODS = ("eager", "compile", "triton", "triton_inplace")
HEAD_METHODS = ("head+eager", "head+triton", "fused_head")
METHODS = LOGIT_METHODS + HEAD_METHODS
PHASES = ("fwd", "fwd+bwd")
# logit elements moved per logit, as counted in kernels/centered_ce.py; with a gradient
# to compute, the in-place mode writes it in its forward and scales it in the backward
ELTS_PER_LOGIT = {("fwd", False): 2, ("fwd+bwd", False): 5, ("fwd", True): 2,
                  ("fwd+bwd", True): 7}
# rough peak extra memory per logit, in bytes, used to skip shapes that cannot fit
EXTRA_BYTES_PER_LOGIT = {"eager": 48, "compile": 16, "triton": 2, "triton_inplace": 0,
                         "head+eager": 56, "head+triton": 8, "fused_head": 0}
ROTATE_BYTES = 256 * 2**20  # inputs rotated until their copies exceed this (> 2 x L2)


def _logit_inputs(rows, K, dtype, device, gen, dim=None):
    student = torch.randn(rows, K, device=device, generator=gen).mul_(2).to(dtype)
    teacher = torch.randn(rows, K, device=device, generator=gen).mul_(2).to(dtype)
    center = torch.randn(K, device=device, generator=gen).mul_(0.3)
    weight = torch.rand(rows, device=device, generator=gen) + 0.05
    return student.requires_grad_(True), teacher, center, weight


def _head_inputs(rows, K, dtype, device, gen, dim):
    def feat():
        return F.normalize(torch.randn(rows, dim, device=device, generator=gen),
                           dim=-1).to(dtype)

    student_v = torch.randn(K, dim, device=device, generator=gen).requires_grad_(True)
    student_g = torch.ones(K, 1, device=device).requires_grad_(True)
    teacher_v = torch.randn(K, dim, device=device, generator=gen)
    teacher_g = torch.ones(K, 1, device=device)
    center = torch.randn(K, device=device, generator=gen).mul_(0.1)
    weight = torch.rand(rows, device=device, generator=gen) + 0.05
    return (feat().requires_grad_(True), student_v, student_g, feat(), teacher_v, teacher_g,
            center, weight)


def _methods(dtype, tiles=()):
    """name -> loss function (inputs tuple -> (loss rows, colsum), differentiable leaves)."""
    from ibot_fast.kernels import centered_ce as kernels
    from ibot_fast.kernels import fused_head
    from ibot_fast.reference import centered_ce as reference
    from ibot_fast.reference import fused_head as reference_head

    temps = (STUDENT_TEMP, TEACHER_TEMP)

    def on_logits(fn, **kwargs):
        def run(inputs):
            student, teacher, center, weight = inputs
            return fn(student, teacher, center, *temps, weight, **kwargs), (student,)
        return run

    def head_then(loss_fn):
        """The unfused head: W = g v / ||v|| in fp32, the matmuls in the feature dtype."""
        def run(inputs):
            feat, v, g, teacher_feat, teacher_v, teacher_g, center, weight = inputs
            w = torch._weight_norm(v, g, 0).to(feat.dtype)
            with torch.no_grad():
                teacher_w = torch._weight_norm(teacher_v, teacher_g, 0).to(feat.dtype)
                teacher = teacher_feat @ teacher_w.t()
            return loss_fn(feat @ w.t(), teacher, center, *temps, weight), (feat, v, g)
        return run

    def fused(fn):
        def run(inputs):
            return fn(*inputs[:7], *temps, inputs[7]), inputs[:3]
        return run

    def autocast(run):
        """The official code path runs the head under autocast: so does the eager baseline."""
        def wrapped(inputs):
            with torch.autocast("cuda", dtype=dtype, enabled=torch.cuda.is_available()):
                return run(inputs)
        return wrapped

    def tiled(blocks):
        """`triton` with the forward's tiles set to `blocks` (while the forward runs)."""
        default = kernels._ce_blocks

        def choose(K, dtype, device, backward=False):
            return default(K, dtype, device, backward) if backward else blocks

        def run(inputs):
            kernels._ce_blocks = choose
            try:
                return on_logits(kernels.centered_softmax_ce_and_colsum)(inputs)
            finally:
                kernels._ce_blocks = default
        return run

    compiled = torch.compile(reference.centered_softmax_ce_and_colsum, dynamic=False)
    return {
        **{_tile_name(b): tiled(b) for b in tiles},
        "eager": on_logits(reference.centered_softmax_ce_and_colsum),
        "compile": on_logits(compiled),
        "triton": on_logits(kernels.centered_softmax_ce_and_colsum),
        "triton_inplace": on_logits(kernels.centered_softmax_ce_and_colsum, inplace_grad=True),
        "head+eager": autocast(fused(reference_head.fused_head_ce)),
        "head+triton": head_then(kernels.centered_softmax_ce_and_colsum),
        "fused_head": fused(fused_head.fused_head_ce),
    }


def _tile_name(blocks):
    return "triton@" + "x".join(map(str, blocks))


def _fits(method, rows, K, dim, elt, device):
    """Whether inputs plus the method's rough extra memory fit in free GPU memory."""
    if device.type != "cuda":
        return True
    inputs = 2 * rows * K * elt if _on_logits(method) else 4 * K * dim * 4
    need = inputs + EXTRA_BYTES_PER_LOGIT.get(method, 2) * rows * K
    return need < 0.9 * torch.cuda.mem_get_info(device)[0]


def bench_shape(rows, K, dim, dtype, methods, fns, device, copy_gbps, warmup, reps,
                deadline):
    """Time the methods on one shape; returns the result rows."""
    elt = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(rows * 131 + K)
    out = []
    for method in methods:
        base = dict(bench="centered_ce", method=method, rows=rows, K=K,
                    D=dim if method in HEAD_METHODS else None, dtype=str(dtype).split(".")[-1])
        if time.monotonic() > deadline:
            out += [dict(base, phase=p, status="time budget spent") for p in PHASES]
            continue
        if not _fits(method, rows, K, dim, elt, device):
            out += [dict(base, phase=p, status="skip") for p in PHASES]
            continue
        make = _logit_inputs if _on_logits(method) else _head_inputs
        try:
            copy = make(rows, K, dtype, device, gen, dim)
            n_bytes = sum(x.numel() * x.element_size() for x in copy)
            copies = [copy] + [make(rows, K, dtype, device, gen, dim)
                               for _ in range(min(7, math.ceil(ROTATE_BYTES / n_bytes) - 1))]
            out += _time_method(fns[method], copies, method, rows, K, elt, device, warmup,
                                reps, copy_gbps, base)
        except torch.cuda.OutOfMemoryError:
            out += [dict(base, phase="fwd+bwd", status="oom")]
        except Exception as e:  # noqa: BLE001 - a failed row is recorded, the sweep goes on
            traceback.print_exc()
            out += [dict(base, phase="fwd+bwd", status=f"error: {type(e).__name__}: {e}"[:300])]
        finally:
            copy = copies = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def _on_logits(method):
    return method in LOGIT_METHODS or method.startswith("triton@")


def _time_method(fn, copies, method, rows, K, elt, device, warmup, reps, copy_gbps, base):
    turn = iter(range(10**9))

    def forward():
        with torch.no_grad():
            fn(copies[next(turn) % len(copies)])

    def forward_backward():
        (loss, _), leaves = fn(copies[next(turn) % len(copies)])
        torch.autograd.grad(loss, leaves, torch.ones_like(loss))

    rows_out = []
    for phase, step in (("fwd", forward), ("fwd+bwd", forward_backward)):
        times = common.time_ms(step, device, warmup=warmup, reps=reps)
        common.peak_memory_reset(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        step()
        peak, _ = common.peak_memory_mib(device)
        med, p20, p80 = common.quantiles(times)
        row = dict(base, phase=phase, status="ok", ms=med, ms_p20=p20, ms_p80=p80,
                   extra_mib=None if peak is None else peak - before / 2**20)
        if method in HEAD_METHODS:
            flops = (4 if phase == "fwd" else 8) * rows * K * base["D"]
            row["tflops"] = flops / (med * 1e-3) / 1e12
        else:
            elts = ELTS_PER_LOGIT[phase, method == "triton_inplace"]
            row["gbps"] = elts * elt * rows * K / (med * 1e-3) / 1e9
            row["of_copy"] = row["gbps"] / copy_gbps if copy_gbps else None
        rows_out.append(row)
    return rows_out


def _one_blas_thread(device):
    """On the CPU the interpreter's tl.dot is numpy.matmul, which multi-threaded OpenBLAS
    slows down by orders of magnitude on a 2-core machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, "blas") if device.type == "cpu" else contextlib.nullcontext()


def _csv(text, cast):
    return [cast(x) for x in text.split(",") if x]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated")
    parser.add_argument("--K", default=",".join(map(str, KS)), help="comma-separated")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {list(METHODS)} (default: all; "
                             "on the CPU all but compile)")
    parser.add_argument("--tiles", default="",
                        help="comma-separated forward tilings RxKxW of the logits kernel to "
                             "time as methods triton@RxKxW (e.g. 16x256x4,4x1024x8)")
    parser.add_argument("--D", type=int, default=D, help="feature dimension of the head")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16",
                                                                "float32"])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, a few repetitions (CPU: Triton interpreter)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--max-minutes", type=float, default=9.0,
                        help="start no new measurement after this many minutes")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA GPU: only --smoke runs on the CPU")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    default_methods = [m for m in METHODS if device.type == "cuda" or m != "compile"]
    methods = _csv(args.methods, str) if args.methods else default_methods
    try:
        tiles = [tuple(int(x) for x in t.split("x")) for t in _csv(args.tiles, str)]
    except ValueError:
        parser.error(f"--tiles takes RxKxW triples like 16x256x4, got {args.tiles!r}")
    if any(len(t) != 3 for t in tiles):
        parser.error(f"--tiles takes RxKxW triples like 16x256x4, got {args.tiles!r}")
    methods += [_tile_name(t) for t in tiles]
    unknown = set(methods) - set(METHODS) - {_tile_name(t) for t in tiles}
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    shapes = [(r, k) for r in _csv(args.rows, int) for k in _csv(args.K, int)]
    dim, warmup, reps = args.D, args.warmup, args.reps
    if args.smoke:
        shapes, dim, warmup, reps = [(37, 1000)], 64, 1, 2
    dynamo = importlib.import_module("torch._dynamo")  # compile: a graph per shape
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, 64)

    dtype = getattr(torch, args.dtype)
    deadline = time.monotonic() + 60 * args.max_minutes
    ceilings = common.measure_ceilings(device)
    fns = _methods(dtype, tiles)
    rows = []
    with _one_blas_thread(device):
        for n_rows, K in shapes:
            rows += bench_shape(n_rows, K, dim, dtype, methods, fns, device,
                                ceilings["copy_gbps"], warmup, reps, deadline)
    for row in rows:
        row.update(copy_gbps=ceilings["copy_gbps"], matmul_tflops=ceilings["matmul_tflops"],
                   smoke=args.smoke)
    path = common.record("centered_ce", rows, device)
    print(f"device: {common.device_name(device)}; measured copy bandwidth: "
          f"{ceilings['copy_gbps'] or '-'} GB/s, bf16 matmul: "
          f"{ceilings['matmul_tflops'] or '-'} TFLOP/s; rows appended to {path}")
    if device.type == "cpu":
        print("CPU smoke run (Triton interpreter): the times below say nothing about speed")
    common.print_table(rows, ["rows", "K", "method", "phase", "status", "ms", "ms_p20",
                              "ms_p80", "extra_mib", "gbps", "of_copy", "tflops"])


if __name__ == "__main__":
    main()
