"""Post-backward phase: teacher EMA and the student's AdamW step, ViT-S/B/L + iBOT head.

    python -m benchmarks.bench_ema                       # GPU: ViT-S/16, ViT-B/16, ViT-L/16
    python -m benchmarks.bench_ema --models vit_b --reps 50
    python -m benchmarks.bench_ema --smoke               # tiny shapes, seconds, any machine

Parameter sets follow docs/design.md §1.3: patch embedding (conv 3x16x16 -> D, with bias),
CLS token, positional embedding 197 x D, mask token 1 x D; per block two LayerNorms, qkv
(3D x D + 3D), proj (D x D + D), fc1 (4D x D + 4D), fc2 (D x 4D + D); final LayerNorm;
head Linear(D, 2048), Linear(2048, 2048), Linear(2048, 256) with biases, last layer
v [8192, 256] and g [8192, 1]. All fp32 (master weights), in `ibot_fast.flat.FlatParams`
buffers (the per-parameter methods run on the same tensors, as views).

Rows (time: CUDA events, median and 20/80 quantiles after warm-up; every buffer is far
larger than L2, so no input rotation):
  ema    loop       the official `for t, s: t.mul_(m).add_((1 - m) * s)`
  ema    foreach    `foreach_ema_` (torch._foreach_lerp_)
  ema    flat       `ema_` on the flat buffers: one launch
  step   torch      torch AdamW(fused=True).step() on the parameters, then `ema_`
  step   fused      `adamw_ema_`, one launch per parameter group (decay, no decay)
  clip   torch      clip_grad_norm_(3.0, foreach) + AdamW(fused=True) + `ema_`
  clip   fused      vector_norm(flat grads) -> grad_scale + `adamw_ema_`
GB/s counts the minimum bytes of the job (kernel docstrings), per fp32 element: EMA 12 B
(read teacher, student; write teacher), AdamW + EMA 36 B (read grad, moments, param,
teacher; write moments, param, teacher), with clipping 40 B (+ one read of the grads for
the norm). `of_copy` is that figure over the device's measured copy bandwidth
(`benchmarks.common.measure_ceilings`); on the CPU there is no ceiling.
The smoke run on a machine without a GPU runs the Triton kernels under the interpreter,
so its times say nothing about speed; it checks that the benchmark runs.
"""
import argparse
import os
import traceback

import torch
from torch import nn

from benchmarks import common

MODELS = {  # name: (embed dim, depth)
    "vit_s": (384, 12),
    "vit_b": (768, 12),
    "vit_l": (1024, 24),
}
HEAD = dict(out_dim=8192, hidden=2048, bottleneck=256)
SMOKE_MODEL = ("smoke", 32, 1)
SMOKE_HEAD = dict(out_dim=64, hidden=48, bottleneck=16)
BYTES_PER_ELEMENT = {"ema": 12, "step": 36, "clip": 40}
CLIP = 3.0


def param_shapes(dim, depth, out_dim, hidden, bottleneck, patch=16, tokens=197):
    """(name, shape) of the iBOT student: ViT backbone and DINO head (docs/design.md §1.3)."""
    shapes = [("backbone.patch_embed.proj.weight", (dim, 3, patch, patch)),
              ("backbone.patch_embed.proj.bias", (dim,)),
              ("backbone.cls_token", (1, 1, dim)),
              ("backbone.pos_embed", (1, tokens, dim)),
              ("backbone.masked_embed", (1, dim))]
    for i in range(depth):
        b = f"backbone.blocks.{i}"
        shapes += [(f"{b}.norm1.weight", (dim,)), (f"{b}.norm1.bias", (dim,)),
                   (f"{b}.attn.qkv.weight", (3 * dim, dim)), (f"{b}.attn.qkv.bias", (3 * dim,)),
                   (f"{b}.attn.proj.weight", (dim, dim)), (f"{b}.attn.proj.bias", (dim,)),
                   (f"{b}.norm2.weight", (dim,)), (f"{b}.norm2.bias", (dim,)),
                   (f"{b}.mlp.fc1.weight", (4 * dim, dim)), (f"{b}.mlp.fc1.bias", (4 * dim,)),
                   (f"{b}.mlp.fc2.weight", (dim, 4 * dim)), (f"{b}.mlp.fc2.bias", (dim,))]
    shapes += [("backbone.norm.weight", (dim,)), ("backbone.norm.bias", (dim,))]
    for i, (n_in, n_out) in enumerate([(dim, hidden), (hidden, hidden), (hidden, bottleneck)]):
        shapes += [(f"head.mlp.{2 * i}.weight", (n_out, n_in)), (f"head.mlp.{2 * i}.bias", (n_out,))]
    shapes += [("head.last_layer.weight_g", (out_dim, 1)),
               ("head.last_layer.weight_v", (out_dim, bottleneck))]
    return shapes


def build_module(shapes, device, seed) -> nn.Module:
    """A parameter-only module with these (dotted) names, random values."""
    g = torch.Generator(device=device).manual_seed(seed)
    root = nn.Module()
    for name, shape in shapes:
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        data = torch.empty(shape, device=device).normal_(std=0.02, generator=g)
        module.register_parameter(leaf, nn.Parameter(data))
    return root


def _row(model, kind, method, numel, times, copy_gbps, baseline_ms=None):
    med, p20, p80 = common.quantiles(times)
    nbytes = BYTES_PER_ELEMENT[kind] * numel
    gbps = nbytes / (med * 1e-3) / 1e9
    return {"bench": "ema", "model": model, "kind": kind, "method": method,
            "numel_m": round(numel / 1e6, 2), "bytes_per_element": BYTES_PER_ELEMENT[kind],
            "ms": med, "ms_p20": p20, "ms_p80": p80, "gbps": gbps,
            "of_copy": gbps / copy_gbps if copy_gbps else None,
            "speedup": baseline_ms / med if baseline_ms else 1.0}


def bench_model(name, dim, depth, head, device, copy_gbps, warmup, reps):
    """Time every method on one parameter set; returns the rows."""
    from ibot_fast.flat import FlatParams, ema_flat_
    from ibot_fast.kernels.adamw_ema import adamw_ema_
    from ibot_fast.kernels.ema import foreach_ema_
    from ibot_fast.reference.ema import ema_loop_

    shapes = param_shapes(dim, depth, **head)
    student_module = build_module(shapes, device, seed=0)
    teacher_module = build_module(shapes, device, seed=1)
    for p in teacher_module.parameters():
        p.requires_grad = False
    student = FlatParams(student_module)
    teacher = FlatParams(teacher_module, like=student, grads=False)
    numel = sum(s.numel for s in student.slots)
    with torch.no_grad():
        student.grad[torch.float32].normal_(std=1e-3)
    s_params, t_params = list(student_module.parameters()), list(teacher_module.parameters())
    m = 0.996
    time = lambda fn: common.time_ms(fn, device, warmup=warmup, reps=reps)  # noqa: E731

    def ema_loop():
        ema_loop_(t_params, s_params, m)

    def ema_foreach():
        foreach_ema_(t_params, s_params, m)

    def ema_flat():
        ema_flat_(teacher, student, m)

    groups = student.param_groups()
    for group in groups:
        group["weight_decay"] = 0.04 if group["group"] == "decay" else 0.0
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), fused=True)
    exp_avg, exp_avg_sq = student.zeros_like(), student.zeros_like()
    steps = {seg: torch.zeros((), device=device) for seg in student.segments}

    def fused_step(grad_scale=None):
        for seg in student.segments:
            adamw_ema_(seg.of(student.data), seg.of(student.grad), seg.of(exp_avg),
                       seg.of(exp_avg_sq), seg.of(teacher.data), steps[seg], lr=1e-4,
                       weight_decay=0.04 if seg.group == "decay" else 0.0, momentum=m,
                       grad_scale=grad_scale)

    def torch_step():
        optimizer.step()
        ema_flat_(teacher, student, m)

    def clip_torch_step():
        torch.nn.utils.clip_grad_norm_(s_params, CLIP, foreach=True)
        torch_step()

    def clip_fused_step():
        norm = torch.linalg.vector_norm(student.grad[torch.float32])
        fused_step(grad_scale=(CLIP / (norm + 1e-6)).clamp_(max=1.0))

    rows = []
    for kind, methods in (("ema", [("loop", ema_loop), ("foreach", ema_foreach),
                                   ("flat", ema_flat)]),
                          ("step", [("torch", torch_step), ("fused", fused_step)]),
                          ("clip", [("torch", clip_torch_step), ("fused", clip_fused_step)])):
        baseline_ms = None  # the first method of each kind
        for method, fn in methods:
            times = time(fn)
            rows.append(_row(name, kind, method, numel, times, copy_gbps, baseline_ms))
            baseline_ms = baseline_ms or common.quantiles(times)[0]
    student.check()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {sorted(MODELS)}")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny parameter set, a few repetitions (CPU: Triton interpreter)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA GPU: only --smoke runs on the CPU")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
    if args.smoke:
        configs, head, warmup, reps = [SMOKE_MODEL], SMOKE_HEAD, 1, 3
    else:
        unknown = set(args.models.split(",")) - set(MODELS)
        if unknown:
            parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(MODELS)}")
        configs = [(n, *MODELS[n]) for n in args.models.split(",")]
        head, warmup, reps = HEAD, args.warmup, args.reps

    ceilings = common.measure_ceilings(device)
    rows = []
    for name, dim, depth in configs:
        try:
            rows += bench_model(name, dim, depth, head, device, ceilings["copy_gbps"], warmup,
                                reps)
        except Exception as e:  # noqa: BLE001 - a failed model is recorded, the sweep goes on
            traceback.print_exc()
            rows.append({"bench": "ema", "model": name, "error": f"{type(e).__name__}: {e}"[:300]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row.update(copy_gbps=ceilings["copy_gbps"], smoke=args.smoke)
    path = common.record("ema", rows, device)
    print(f"device: {common.device_name(device)}; measured copy bandwidth: "
          f"{ceilings['copy_gbps'] or '-'} GB/s; rows appended to {path}")
    if device.type == "cpu":
        print("CPU smoke run (Triton interpreter): the times below say nothing about speed")
    common.print_table(rows, ["model", "kind", "method", "numel_m", "ms", "ms_p20", "ms_p80",
                              "bytes_per_element", "gbps", "of_copy", "speedup"])


if __name__ == "__main__":
    main()
