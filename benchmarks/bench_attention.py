"""Attention backends and sequence packing for the student's 2 global + 10 local crops.

    python -m benchmarks.bench_attention                 # ViT-S/16 and ViT-B/16, batch 128
    python -m benchmarks.bench_attention --smoke         # tiny shapes on the CPU

Two measurements, forward + backward, bf16 on a GPU:
1. attention alone on the packed problem (2B sequences of 197 tokens and 10B of 37,
   heads x 64): ibot_fast's per-group SDPA ("split", what `packed_attention` does for
   sdpa/math), xformers with a block-diagonal mask, SDPA on nested jagged tensors
   (torch.nested, layout=torch.jagged), FlexAttention with a document mask
   (torch.compile'd), and torch's variable-length flash attention (one call with
   cumulative sequence lengths, no per-group split or concatenation: not yet measured on a
   GPU); a variant that cannot run here is reported as unavailable;
2. the student backbone on all crops: two passes (pack_crops=false) vs one packed pass,
   for each backend that runs here: images/sec and peak memory.
Rows go to benchmarks/results/attention.jsonl with the device name.
"""
import argparse
import sys

import torch

from benchmarks.common import (env_info, peak_memory_mib, peak_memory_reset, print_table,
                               quantiles, record, time_ms)


def attention_variants():
    """name -> fn(q, k, v, seqs) with q, k, v [T, heads, d]; returns [T, heads, d]."""
    from ibot_fast.models.attention import packed_attention

    def split(q, k, v, seqs, backend="sdpa"):
        T, H, d = q.shape
        qkv = torch.stack([q, k, v], 1).reshape(T, 3 * H * d)
        return packed_attention(qkv, seqs, H, backend).view(T, H, d)

    def xformers(q, k, v, seqs):
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        bias = BlockDiagonalMask.from_seqlens(seqs.seqlens())
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]

    def nested(q, k, v, seqs):
        lengths = torch.tensor(seqs.seqlens(), device=q.device)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        nq, nk, nv = (torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2)
                      for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(nq, nk, nv)
        return out.transpose(1, 2).values()

    def varlen(q, k, v, seqs):
        """One flash-attention call over every sequence (torch >= 2.10, CUDA only)."""
        from torch.nn.attention.varlen import varlen_attn

        lengths = torch.tensor(seqs.seqlens(), device=q.device, dtype=torch.int32)
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32)])
        longest = max(length for _, length in seqs.groups)
        return varlen_attn(q, k, v, cu, cu, longest, longest)

    flex_cache = {}

    def flex(q, k, v, seqs):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        key = (q.shape, q.device)
        if key not in flex_cache:
            ids = torch.repeat_interleave(torch.arange(len(seqs.seqlens()), device=q.device),
                                          torch.tensor(seqs.seqlens(), device=q.device))

            def same_doc(b, h, qi, ki):
                return ids[qi] == ids[ki]

            T = q.shape[0]
            # _compile=True builds the mask block by block; without it the [T, T] mask is
            # materialised first (ViT-B, batch 128, 2 + 10 crops: 71 GiB asked on an H100)
            mask = create_block_mask(same_doc, None, None, T, T, device=q.device,
                                     _compile=q.device.type == "cuda")
            flex_cache[key] = (mask, torch.compile(flex_attention))
        mask, fn = flex_cache[key]
        out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                 block_mask=mask)
        return out[0].transpose(0, 1)

    return {"split_sdpa": split, "split_math": lambda *a: split(*a, backend="math"),
            "xformers_blockdiag": xformers, "sdpa_nested_jagged": nested, "flex": flex,
            "varlen_flash": varlen}


def bench_attention_only(args, device, dtype, heads, head_dim, B):
    from ibot_fast.models.attention import Seqs

    seqs = Seqs([(2 * B, args.global_tokens), (args.n_local * B, args.local_tokens)])
    rows = []
    ref = None
    g = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(seqs.total, heads, head_dim, device=device, dtype=dtype, generator=g)
              for _ in range(3)]
    for name, fn in attention_variants().items():
        q, k, v = (x.clone().requires_grad_(True) for x in inputs)
        row = {"bench": "attention_only", "variant": name, "heads": heads, "batch": B}
        try:
            out = fn(q, k, v, seqs)
            if ref is None:
                ref = out.detach().float()
            row["max_err_vs_first"] = float((out.detach().float() - ref).abs().max())

            def step():
                fn(q, k, v, seqs).sum().backward()

            peak_memory_reset(device)
            med, q20, q80 = quantiles(time_ms(step, device, args.warmup, args.reps))
            row.update(ms=med, ms_q20=q20, ms_q80=q80,
                       peak_alloc_mib=peak_memory_mib(device)[0])
        except Exception as e:  # not available on this device / build
            row["unavailable"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
    return rows


def bench_backbone(args, device, dtype, model, B):
    from ibot_fast.models.attention import varlen_status, xformers_available
    from ibot_fast.models.vit import vit

    backends = ["math", "sdpa"] + (["xformers"] if xformers_available() else []) + \
        (["varlen"] if varlen_status(device)[0] else [])
    rows = []
    for backend in backends:
        for pack in ((True,) if backend == "varlen" else (False, True)):  # unpacked: sdpa
            torch.manual_seed(0)
            net = vit(model, args.global_size, args.patch, drop_path_rate=0.1,
                      attention_backend=backend, pack_crops=pack).to(device)
            g = torch.randn(2 * B, 3, args.global_size, args.global_size, device=device)
            loc = torch.randn(args.n_local * B, 3, args.local_size, args.local_size,
                              device=device)
            masks = torch.rand(2 * B, (args.global_size // args.patch) ** 2, device=device) < 0.15
            row = {"bench": "backbone", "model": model, "backend": backend, "packed": pack,
                   "batch": B}

            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    tg, tl = net.forward_crops(g, masks, loc)
                    loss = tg.float().mean() + tl.float().mean()
                loss.backward()

            try:
                peak_memory_reset(device)
                med, q20, q80 = quantiles(time_ms(step, device, args.warmup, args.reps))
                row.update(img_per_s=B / (med / 1e3), ms=med, ms_q20=q20, ms_q80=q80,
                           peak_alloc_mib=peak_memory_mib(device)[0])
            except Exception as e:
                row["unavailable"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            del net
    return rows


def main(argv=None):
    p = argparse.ArgumentParser("bench_attention")
    p.add_argument("--models", default="vit_small,vit_base")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--n-local", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    args.global_size, args.local_size, args.patch = 224, 96, 16
    if args.smoke:
        args.models, args.batch, args.n_local = "vit_demo", 2, 2
        args.global_size, args.local_size, args.patch = 32, 16, 4
        args.warmup, args.reps = 1, 2
    args.global_tokens = (args.global_size // args.patch) ** 2 + 1
    args.local_tokens = (args.local_size // args.patch) ** 2 + 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from ibot_fast.models import ARCHS

    rows = []
    for model in args.models.split(","):
        a = ARCHS[model]
        print(f"-- {model}: attention on the packed crops", flush=True)
        for r in bench_attention_only(args, device, dtype, a["heads"], a["dim"] // a["heads"],
                                      args.batch):
            rows.append({"model": model, **r})
        print(f"-- {model}: student backbone, two passes vs packed", flush=True)
        rows += bench_backbone(args, device, dtype, model, args.batch)
    for r in rows:
        r["smoke"] = args.smoke
    path = record("attention", rows, device)
    print(f"\ndevice: {env_info(device)['device']}; rows appended to {path}")
    print_table([r for r in rows if r["bench"] == "attention_only"],
                ["model", "variant", "ms", "ms_q20", "ms_q80", "peak_alloc_mib",
                 "max_err_vs_first", "unavailable"])
    print()
    print_table([r for r in rows if r["bench"] == "backbone"],
                ["model", "backend", "packed", "img_per_s", "ms", "peak_alloc_mib",
                 "unavailable"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
