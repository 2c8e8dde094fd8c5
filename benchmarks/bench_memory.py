"""Peak memory of one full training step, counted tensor by tensor: on any device, CPU too.

A GPU reports its peak through the caching allocator (`bench_train` prints it); a CPU
has no such counter. This script counts instead: every tensor storage created during
one `Trainer.train_step` is added when an op creates it and subtracted when it is freed
(`LiveBytes`, a TorchDispatchMode that sees every op, the backward's included), on top of
the state that lives across steps (student and teacher weights, optimizer state, centers,
flat buffers), counted once. That is `torch.cuda.max_memory_allocated` less the
allocator's rounding and the kernels' workspaces, so the paths (reference, fast,
activation checkpointing) can be compared at full model size and real crop sizes on a
machine without a GPU, with a few images per step. The step's peak above the persistent
state is a fixed part (gradients, the autocast copies of the weights) plus a part that
grows linearly with the batch (activations), so each path is measured at two batch sizes
and the line through them gives the bytes per image and the peak at a chosen batch
(`--scale-to`, 128 by default). On a GPU the allocator's peak is printed beside the
count, as a check of the count.

    python -m benchmarks.bench_memory --models vit_small --batch 1,2
    python -m benchmarks.bench_memory --smoke        # tiny model, seconds (make test)

The same pass takes a census of the work (`Traffic`): the FLOPs of the matmuls and of
attention, and the bytes that every other op reads and writes, per image. On a GPU the
first two are tensor-core time; in an eager step every other op is at least one
memory-bound kernel, so its bytes over the copy bandwidth are a floor on the time they
take. It shows, without a GPU, what an option saves in elementwise traffic (such as the
casts around autocast's fp32 LayerNorm); it is not a timing.

On the CPU the step runs under CUDA autocast's fp32 policy by default
(`--autocast-policy cuda`, benchmarks/cuda_autocast.py): the CPU's own autocast runs
LayerNorm and softmax in bf16 where CUDA's runs them in fp32, and counted under its own
policy a step kept 8-25% less than the H100's allocator reported. Under CUDA's policy
the counts of six H100-measured configurations (ViT-S/B; reference with math or SDPA
attention, fast) came within -6% to +0.4% of the allocator's peaks (README in
results/). The Triton kernels run under TRITON_INTERPRET=1 when it is set (their buffers
are the ones a GPU allocates) and through their PyTorch twins otherwise (which
materialise [rows, K] intermediates: a little more memory than the kernels). Rows go to
benchmarks/results/memory.jsonl (smoke rows to results/smoke/).
"""
import argparse
import gc
import weakref
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.bench_train import SMOKE_MODEL, synthetic_batch
from benchmarks.common import env_info, print_table, record
from benchmarks.cuda_autocast import CudaAutocastPolicy


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created while active and still alive, on `device`'s
    type (all devices when None); `peak` is the largest value seen. A storage is counted
    once however many views share it; outputs that alias an input (views, in-place and
    out= ops) add nothing. Buffers that compiled (Inductor) code allocates inside its
    kernels are not seen: measure eager steps."""

    def __init__(self, device: torch.device = None):
        super().__init__()
        self.device_type = None if device is None else torch.device(device).type
        self.now = 0
        self.peak = 0
        self._alive = {}

    def _freed(self, key, nbytes):
        if self._alive.pop(key, None) is not None:
            self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or \
                    (self.device_type is not None and t.device.type != self.device_type):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._alive:
                continue
            self._alive[key] = nbytes
            weakref.finalize(storage, self._freed, key, nbytes)
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


_METADATA = {"set_", "resize_", "as_strided_", "detach_", "requires_grad_", "record_stream"}
_FACTORIES = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "zeros", "zeros_like", "new_zeros", "ones", "ones_like", "full", "full_like",
              "new_full", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "randperm",
              "arange", "scalar_tensor", "lift_fresh", "lift_fresh_copy"}
_GATHERS = {"index", "index_select", "gather", "embedding"}


def matmul_flops(name: str, args, out) -> float:
    """FLOPs of a matmul-class aten op (mm, addmm, bmm, baddbmm, convolution), else 0."""
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = args[-2], args[-1]
        return 2.0 * a.numel() * b.shape[-1]
    if name == "convolution":
        return 2.0 * out.numel() * args[1][0].numel()
    return 0.0


def attention_flops(name: str, args) -> float:
    """FLOPs of an SDPA kernel call (q [.., N, d], k [.., M, d]): 4 N M d per head
    forward; its backward 2.5 x that (flash recomputes q k^T). The backward ops take the
    output gradient first and q second, which gives the same product for self-attention
    (N = M), the only kind here."""
    if "scaled_dot_product" not in name and "attention" not in name:
        return 0.0
    q, k = args[0], args[1]
    forward = 4.0 * q.numel() * k.shape[-2]
    return 2.5 * forward if name.endswith("_backward") else forward


class Traffic(TorchDispatchMode):
    """What one step asks of a GPU, op by op (every aten op, the backward's included):
    matmul FLOPs, attention FLOPs, and the bytes every other op reads and writes (its
    tensor arguments and outputs at their sizes; views move nothing, factories and fills
    only write, gathers read what they write). In eager mode each such op is at least
    one memory-bound kernel, so `other_bytes` / bandwidth is a floor on their time;
    `by_op` splits it by op name."""

    def __init__(self):
        super().__init__()
        self.matmul_flops = 0.0
        self.attention_flops = 0.0
        self.other_bytes = 0
        self.by_op = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        flat_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        mm = matmul_flops(name, args, out)
        attn = attention_flops(name, args)
        if mm or attn:
            self.matmul_flops += mm
            self.attention_flops += attn
            return out
        if name in _METADATA or func.is_view or (not func._schema.is_mutable and flat_out and all(
                any(o.untyped_storage().data_ptr() == i.untyped_storage().data_ptr()
                    for i in flat_in) for o in flat_out)):
            return out  # a view or alias: no data moves
        written = sum(_nbytes(t) for t in flat_out)
        if name in _FACTORIES:
            moved = written
        elif name in _GATHERS:
            moved = 2 * written + sum(_nbytes(t) for t in flat_in
                                      if not t.is_floating_point())
        else:
            moved = written + sum(_nbytes(t) for t in flat_in)
        self.other_bytes += moved
        self.by_op[name] = self.by_op.get(name, 0) + moved
        return out


def persistent_bytes(trainer) -> int:
    """Bytes of the distinct storages that live across steps."""
    tensors = []
    for module in (trainer.student_module, trainer.teacher, trainer.loss):
        tensors += list(module.state_dict(keep_vars=True).values())
        tensors += [p.grad for p in module.parameters() if p.grad is not None]
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for flat in (getattr(trainer.params, "flat_student", None),
                 getattr(trainer.params, "flat_teacher", None)):
        if flat is not None:
            tensors += tree_flatten([v for k, v in vars(flat).items() if k != "module"])[0]
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def measure(cfg, device, cuda_policy: bool = False) -> dict:
    """Persistent MiB, and the step's peak above it (counted; allocator peak on a GPU).
    `cuda_policy`: the step runs under CUDA autocast's fp32 policy (`CudaAutocastPolicy`;
    CPU only), so the count keeps the fp32 copies a GPU keeps."""
    from ibot_fast.train import Trainer

    trainer = Trainer(cfg)
    batch = synthetic_batch(trainer, cfg, device)
    trainer.train_step(batch, 10, 1)  # optimizer state exists from here on
    if getattr(trainer.params, "flat_student", None) is None:
        trainer.optimizer.zero_grad(set_to_none=True)  # the step allocates them again
    gc.collect()
    base = persistent_bytes(trainer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    with LiveBytes(device) as live, Traffic() as traffic, \
            (CudaAutocastPolicy() if cuda_policy else nullcontext()):
        trainer.train_step(batch, 11, 1)
    row = {"persistent_mib": base / 2**20, "step_peak_mib": live.peak / 2**20,
           "matmul_gflop": traffic.matmul_flops / 1e9,
           "attention_gflop": traffic.attention_flops / 1e9,
           "other_gib": traffic.other_bytes / 2**30,
           "other_gib_by_op": {k: v / 2**30 for k, v in traffic.by_op.items()}}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["allocator_step_peak_mib"] = \
            (torch.cuda.max_memory_allocated(device) - allocated_before) / 2**20
    del trainer, batch
    gc.collect()
    return row


PATHS = {
    # label: overrides
    "reference (math)": ["train.impl=reference", "model.attention=math"],
    "reference (sdpa)": ["train.impl=reference", "model.attention=sdpa"],
    # the official code under AMP keeps the residual stream in fp32 (model.residual_fp32)
    "reference (math) fp32 residual": ["train.impl=reference", "model.attention=math",
                                        "model.residual_fp32=true"],
    "fast": ["train.impl=fast"],
    "fast selective": ["train.impl=fast", "model.activation_checkpointing=selective"],
    "fast selective_mlp": ["train.impl=fast", "model.activation_checkpointing=selective_mlp"],
    "fast full": ["train.impl=fast", "model.activation_checkpointing=full"],
    "fast fp32 residual": ["train.impl=fast", "model.residual_fp32=true"],
    # autocast's fp32 LayerNorm (the official code's; the fast rows run it in bf16)
    "fast fp32 layernorm": ["train.impl=fast", "model.layernorm_fp32=true"],
}
FAST = ["model.pack_crops=true", "model.efficient_drop_path=true", "loss.center2_from=masked",
        "masks.sampler=stratified", "model.layernorm_fp32=false"]


def get_args_parser():
    p = argparse.ArgumentParser("bench_memory", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vit_small,vit_base",
                   type=lambda s: [m.strip() for m in s.split(",") if m.strip()])
    p.add_argument("--paths", default=",".join(PATHS),
                   type=lambda s: [m.strip() for m in s.split(",") if m.strip()])
    p.add_argument("--batch", default="1,2", type=lambda s: [int(b) for b in s.split(",")],
                   help="two batch sizes to measure (the line through them extrapolates)")
    p.add_argument("--scale-to", type=int, default=128,
                   help="also print the peak extrapolated to this batch")
    p.add_argument("--n-local", type=int, default=10)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--autocast-policy", choices=("cuda", "native"), default="cuda",
                   help="on the CPU: cuda (the default) runs the step under CUDA autocast's "
                   "fp32 policy (LayerNorm, softmax, sums and norms in fp32), so the count "
                   "keeps what a GPU keeps; native, the CPU autocast's own (all in bf16)")
    p.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    p.add_argument("--results-name", default="memory")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from ibot_fast.config import build_config

    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        raise SystemExit(f"unknown path {unknown[0]!r}; choose from: {', '.join(PATHS)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.models = ["vit_demo"] if args.models == ["vit_small", "vit_base"] else args.models
        args.n_local = min(args.n_local, 2)
    cuda_policy = device.type == "cpu" and args.autocast_policy == "cuda"
    policy = "native" if device.type == "cuda" else args.autocast_policy
    print(f"device: {env_info(device)['device']}; batch {args.batch}, 2 global + "
          f"{args.n_local} local crops, {args.precision}, autocast policy {policy}")
    if len(args.batch) != 2 or args.batch[0] >= args.batch[1]:
        raise SystemExit("--batch takes two increasing batch sizes, e.g. 1,2")
    rows = []
    for model in args.models:
        for label in args.paths:
            print(f"-- {model} {label}", flush=True)
            small, large = (measure(build_config(None, _overrides(args, model, label, b, device)),
                                    device, cuda_policy) for b in args.batch)
            per_img = (large["step_peak_mib"] - small["step_peak_mib"]) / \
                (args.batch[1] - args.batch[0])
            per_img_of = {k: (large[k] - small[k]) / (args.batch[1] - args.batch[0])
                          for k in ("matmul_gflop", "attention_gflop", "other_gib")}
            by_op = {k: (v - small["other_gib_by_op"].get(k, 0.0)) /
                     (args.batch[1] - args.batch[0])
                     for k, v in large.pop("other_gib_by_op").items()}
            small.pop("other_gib_by_op")
            fixed = large["step_peak_mib"] - per_img * args.batch[1]
            row = {"bench": "memory", "model": model, "path": label, "batch": args.batch,
                   "n_local": args.n_local, "precision": args.precision, "smoke": args.smoke,
                   "autocast_policy": policy,
                   "overrides": _overrides(args, model, label, args.batch[1], device),
                   **large, "step_fixed_mib": fixed, "step_mib_per_img": per_img,
                   f"peak_mib_at_{args.scale_to}":
                       large["persistent_mib"] + fixed + per_img * args.scale_to,
                   **{f"{k}_per_img": v for k, v in per_img_of.items()},
                   "other_gib_per_img_by_op": dict(sorted(
                       ((k, v) for k, v in by_op.items() if abs(v) > 1e-4),
                       key=lambda kv: -kv[1])[:25])}
            if "allocator_step_peak_mib" in small:
                row["allocator_step_peak_mib_small"] = small["allocator_step_peak_mib"]
            rows.append(row)
    for r in rows:
        ref = next((x for x in rows if x["model"] == r["model"]
                    and x["path"] == "reference (math)"), None)
        if ref is not None:
            r["per_img_ratio_vs_math_ref"] = r["step_mib_per_img"] / ref["step_mib_per_img"]
    path = record(args.results_name, rows, device)
    print(f"\nrows appended to {path}")
    print_table(rows, ["model", "path", "persistent_mib", "step_fixed_mib", "step_mib_per_img",
                       f"peak_mib_at_{args.scale_to}", "per_img_ratio_vs_math_ref",
                       "matmul_gflop_per_img", "attention_gflop_per_img", "other_gib_per_img"]
                + (["step_peak_mib", "allocator_step_peak_mib"] if device.type == "cuda" else []))
    return 0


def _overrides(args, model, label, batch, device):
    overrides = [f"model.arch={model}", f"train.batch_size={batch}",
                 f"data.synthetic_size={batch}", f"data.n_local={args.n_local}",
                 "data.source=synthetic", "data.num_workers=0",
                 f"train.precision={args.precision}", "train.log_every=1000000",
                 "train.output_dir=/tmp/ibot_fast_bench", f"train.device={device.type}"]
    if args.smoke:
        overrides += SMOKE_MODEL
    return overrides + (FAST if label.startswith("fast") else []) + PATHS[label]


if __name__ == "__main__":
    raise SystemExit(main())
