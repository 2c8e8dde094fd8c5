"""Head + loss on every token (official) against the masked-token path of the fast trainer.

    python -m benchmarks.bench_masked_head          # ViT-S/16 and ViT-B/16, batch 128, 10 locals
    python -m benchmarks.bench_masked_head --smoke  # tiny shapes on the CPU

Inputs are backbone outputs (student tokens requiring grad, teacher tokens without) for
2 global crops of 197 tokens and 10 local crops of 37 tokens per image, masks from the
stratified sampler (about 15% of the global patches). Timed: teacher head, student head,
loss and the backward into the tokens, for
- full:         the official path (head on every token of every crop, eager loss);
- masked:       CLS + masked rows gathered by the Triton gather, kernel loss;
- masked_fused: as masked, the last layer fused with the patch loss (fused_head_ce);
each with center2_from=all (teacher MLP on all patches) and =masked.
Reports ms (median, 20/80 %), peak memory and the head's matmul TFLOP/s; rows go to
benchmarks/results/masked_head.jsonl with the device name.
"""
import argparse
import sys
import traceback

import torch

from benchmarks.common import (env_info, peak_memory_mib, peak_memory_reset, print_table,
                               quantiles, record, time_ms)


def build(model, args, device):
    from ibot_fast.config import build_config
    from ibot_fast.loss import build_loss
    from ibot_fast.masking import StratifiedMaskSampler, masked_index
    from ibot_fast.models import ARCHS, MaskedRows, build_head

    cfg = build_config(None, [f"model.arch={model}", f"data.n_local={args.n_local}",
                              f"model.out_dim={args.out_dim}",
                              f"model.patch_out_dim={args.out_dim}",
                              f"model.head_hidden_dim={args.hidden}",
                              f"model.head_bottleneck_dim={args.bottleneck}"])
    dim = ARCHS[model]["dim"]
    B, L = args.batch, args.n_local
    torch.manual_seed(0)
    s_head, t_head = build_head(cfg).to(device), build_head(cfg).to(device)
    for p in t_head.parameters():
        p.requires_grad_(False)
    grid = int(round((args.global_tokens - 1) ** 0.5))
    masks = StratifiedMaskSampler((grid, grid))(2 * B).to(device)
    index, count = masked_index(masks.cpu(), None)
    masked = MaskedRows.from_masks(masks, index.to(device), count, count)
    tokens = {
        "s_g": torch.randn(2 * B, args.global_tokens, dim, device=device),
        "s_l": torch.randn(L * B, args.local_tokens, dim, device=device),
        "t_g": torch.randn(2 * B, args.global_tokens, dim, device=device),
    }
    return cfg, s_head, t_head, masks, masked, tokens, build_loss


def run_full(cfg, s_head, t_head, masks, tokens, loss_fn, dtype, device):
    s_g = tokens["s_g"].detach().requires_grad_(True)
    s_l = tokens["s_l"].detach().requires_grad_(True)
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        with torch.no_grad():
            t_cls, t_patch = t_head(tokens["t_g"])
        cls, patch = s_head(s_g)
        lcls, _ = s_head(s_l)
    out = loss_fn(torch.cat([cls, lcls]), patch, t_cls, t_patch, masks, 1)
    out["loss"].backward()


def run_masked(cfg, s_head, t_head, masked, tokens, loss_fn, dtype, device, fused, center2):
    from ibot_fast.kernels import gather_masked

    s_g = tokens["s_g"].detach().requires_grad_(True)
    s_l = tokens["s_l"].detach().requires_grad_(True)
    idx = masked.token_index()
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        with torch.no_grad():
            t = tokens["t_g"]
            if center2 == "all":
                z = t_head.features(t)
                t_cls = t_head.last_layer(z[:, 0])
                t_rows = gather_masked(z, idx, masked.rows)
                patch_sum = torch.nn.functional.linear(
                    z[:, 1:].float().mean(1).sum(0), t_head.last_layer2.weight().float())
            else:
                n = t.shape[0]
                z = t_head.features(torch.cat([t[:, 0], gather_masked(t, idx, masked.rows)]))
                t_cls, t_rows, patch_sum = t_head.last_layer(z[:n]), z[n:], None
            if not fused:
                t_rows = t_head.last_layer2(t_rows)
        rows = torch.cat([s_g[:, 0], s_l[:, 0], gather_masked(s_g, idx, masked.rows)])
        z = s_head.features(rows)
        n_cls = z.shape[0] - masked.rows
        s_cls = s_head.last_layer(z[:n_cls])
        s_rows = z[n_cls:] if fused else s_head.last_layer2(z[n_cls:])
    last = None
    if fused:
        last = ((s_head.last_layer2.weight_v, s_head.last_layer2.weight_g),
                (t_head.last_layer2.weight_v, t_head.last_layer2.weight_g))
    out = loss_fn.forward_masked(s_cls, s_rows, t_cls, t_rows, masked.weight, masked.rows, 1,
                                 patch_sum, last)
    out["loss"].backward()


def main(argv=None):
    p = argparse.ArgumentParser("bench_masked_head")
    p.add_argument("--models", default="vit_small,vit_base")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--n-local", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    args.global_tokens, args.local_tokens = 197, 37
    args.out_dim, args.hidden, args.bottleneck = 8192, 2048, 256
    if args.smoke:
        args.models, args.batch, args.n_local, args.warmup, args.reps = "vit_demo", 2, 2, 1, 2
        args.global_tokens, args.local_tokens = 65, 17
        args.out_dim, args.hidden, args.bottleneck = 256, 64, 32
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16
    rows = []
    for model in args.models.split(","):
        cfg, s_head, t_head, masks, masked, tokens, build_loss = build(model, args, device)
        variants = [("full", "all", None)] + [
            (name, c2, fused) for name, fused in (("masked", False), ("masked_fused", True))
            for c2 in ("all", "masked")]
        for name, center2, fused in variants:
            impl = "reference" if name == "full" else "fast"
            loss_fn = build_loss(cfg, impl=impl).to(device)
            if name == "full":
                fn = lambda: run_full(cfg, s_head, t_head, masks, tokens, loss_fn, dtype, device)  # noqa: E731
            else:
                fn = lambda: run_masked(cfg, s_head, t_head, masked, tokens, loss_fn, dtype,  # noqa: E731
                                        device, fused, center2)
            row = {"bench": "masked_head", "model": model, "variant": name, "center2": center2,
                   "batch": args.batch, "n_local": args.n_local,
                   "masked_rows": masked.rows, "smoke": args.smoke}
            try:
                peak_memory_reset(device)
                med, q20, q80 = quantiles(time_ms(fn, device, args.warmup, args.reps))
                row.update(ms=med, ms_q20=q20, ms_q80=q80,
                           peak_alloc_mib=peak_memory_mib(device)[0])
            except torch.cuda.OutOfMemoryError:
                row["oom"] = True
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a failed row is recorded, the sweep goes on
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            s_head.zero_grad(set_to_none=True)
            rows.append(row)
        full = next(r for r in rows if r["model"] == model and r["variant"] == "full")
        for r in rows:
            if r["model"] == model and "ms" in r and "ms" in full:
                r["speedup"] = full["ms"] / r["ms"]
                if full.get("peak_alloc_mib") and r.get("peak_alloc_mib"):
                    r["mem_ratio"] = r["peak_alloc_mib"] / full["peak_alloc_mib"]
    path = record("masked_head", rows, device)
    print(f"device: {env_info(device)['device']}; rows appended to {path}")
    print_table(rows, ["model", "variant", "center2", "masked_rows", "ms", "ms_q20", "ms_q80",
                       "peak_alloc_mib", "speedup", "mem_ratio"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
