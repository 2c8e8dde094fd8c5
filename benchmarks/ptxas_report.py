"""Compile every Triton kernel for a GPU on any machine (no GPU, no driver) and report what
ptxas says: registers per thread, spilled bytes, shared memory, and the layout Triton gave
each kernel's main tile.

    python -m benchmarks.ptxas_report               # sm_90 (H100 / H200)
    python -m benchmarks.ptxas_report --arch 80     # sm_80 (A100)
    python -m benchmarks.ptxas_report --ce-tiles 16x256x4,8x256x4   # candidate CE tilings

Why: on a CPU the kernels run under Triton's interpreter, which executes their semantics
but never compiles them; a kernel that fails to compile for a GPU, or spills registers
with the launch configuration the host code picks, would only show on a GPU. Triton ships
ptxas, so both can be checked here (tests/test_kernel_compile.py does, in `make test`).
Each kernel is compiled with the constexprs and warp counts that the host functions choose
on a GPU (`_ce_blocks`, `_fused_blocks`, ... called with a CUDA device, which they only
read the type of), and with the 16-divisibility Triton infers at launch for pointers and
for sizes and strides that are multiples of 16 (as K = 8192, D = 256 are).
"""
import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

CUDA = torch.device("cuda")


@dataclass
class Spec:
    """One kernel compilation: argument types by name (pointers '*bf16', ints 'i32',
    floats 'fp32'), constexprs, warps, stages, and the names that are multiples of 16."""
    name: str
    fn: object
    types: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    div16: set = field(default_factory=set)


def _types(fn, pointers: dict, floats=(), default_ptr="*fp32"):
    """Types of every non-constexpr argument of fn: pointers (name ends in _ptr) from
    `pointers` or fp32, `floats` fp32, the rest i32."""
    out = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            continue
        if name.endswith("_ptr"):
            out[name] = pointers.get(name, default_ptr)
        else:
            out[name] = "fp32" if name in floats else "i32"
    return out


def specs(ce_tiles=None):
    """The kernels with the launch configurations the host code picks on a GPU."""
    from ibot_fast.kernels import (adamw_ema, ce_stats, centered_ce, ema, fused_head,
                                   masked_gather)

    out = []
    temps = ("inv_ts", "inv_tt")
    logits = {"s_ptr": "*bf16", "t_ptr": "*bf16", "ds_ptr": "*bf16"}
    ce_div16 = {"K", "stride_s", "stride_t", "stride_ds", "rows_per_group", "k_per_split", "D"}
    fwd_tiles = ce_tiles or [centered_ce._ce_blocks(8192, torch.bfloat16, CUDA)]
    for block_r, block_k, warps in fwd_tiles:
        for even in (True, False):  # K a multiple of the tile (8192), or not (1000)
            out.append(Spec(f"centered_ce fwd {block_r}x{block_k}x{warps} bf16"
                            f"{'' if even else ' masked'}", centered_ce._centered_ce_fwd_kernel,
                            _types(centered_ce._centered_ce_fwd_kernel, logits, temps),
                            dict(HAS_WEIGHT=True, COLSUM=True, EVEN_K=even, BLOCK_R=block_r,
                                 BLOCK_K=block_k), warps, div16=ce_div16))
    block_r, block_k, warps = centered_ce._ce_blocks(8192, torch.float32, CUDA)
    out.append(Spec(f"centered_ce fwd {block_r}x{block_k}x{warps} fp32",
                    centered_ce._centered_ce_fwd_kernel,
                    _types(centered_ce._centered_ce_fwd_kernel, {}, temps),
                    dict(HAS_WEIGHT=True, COLSUM=True, EVEN_K=True, BLOCK_R=block_r,
                         BLOCK_K=block_k), warps, div16=ce_div16))
    block_r, block_k, warps = centered_ce._ce_blocks(8192, torch.bfloat16, CUDA, backward=True)
    out.append(Spec(f"centered_ce bwd {block_r}x{block_k}x{warps} bf16",
                    centered_ce._centered_ce_bwd_kernel,
                    _types(centered_ce._centered_ce_bwd_kernel, logits, temps),
                    dict(HAS_WEIGHT=True, HAS_DLOSS=True, EVEN_K=True, BLOCK_R=block_r,
                         BLOCK_K=block_k), warps, div16=ce_div16))
    # the combine kernel merges one set of statistics per column block: K / BLOCK_K of them
    for K, dtype in ((8192, torch.bfloat16), (65536, torch.bfloat16), (65536, torch.float32),
                     (262144, torch.float32)):
        n_blocks = K // centered_ce._ce_blocks(K, dtype, CUDA)[1]
        block_r, block_n, warps = ce_stats.combine_blocks(n_blocks)
        out.append(Spec(f"centered_ce combine K={K} {str(dtype)[6:]} ({n_blocks} blocks)",
                        ce_stats._centered_ce_combine_kernel,
                        _types(ce_stats._centered_ce_combine_kernel, {}),
                        dict(HAS_WEIGHT=True, BLOCK_R=block_r, BLOCK_N=block_n), warps))
    for dtype, ptr in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        cfg = fused_head._fused_blocks(256, dtype, CUDA)
        upcast, precision = dtype == torch.float32, "tf32"
        head = {n: ptr for n in ("fs_ptr", "ws_ptr", "ft_ptr", "wt_ptr", "ds_ptr")}
        for kernel in (fused_head._fused_head_ce_fwd_kernel,
                       fused_head._fused_head_ce_dlogits_kernel):
            constexprs = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
            constexprs.update(UPCAST=upcast, DOT_PRECISION=precision)
            if "HAS_WEIGHT" in kernel.arg_names:
                constexprs["HAS_WEIGHT"] = True
            out.append(Spec(f"{kernel.__name__.strip('_')} {str(dtype)[6:]}", kernel,
                            _types(kernel, head, temps), constexprs, cfg["num_warps"],
                            cfg["num_stages"], div16=ce_div16))
    block, warps = ema._launch_config(4)
    out.append(Spec("ema fp32", ema._ema_kernel,
                    _types(ema._ema_kernel, {}, ("momentum", "one_minus_momentum")),
                    dict(MOMENTUM_ON_DEVICE=True, BLOCK=block), warps))
    floats = ("lr", "decay", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "momentum",
              "one_minus_momentum")
    block, warps = adamw_ema.LAUNCH
    out.append(Spec("adamw_ema bf16 grads", adamw_ema._adamw_ema_kernel,
                    _types(adamw_ema._adamw_ema_kernel,
                           {"grad_ptr": "*bf16", "step_ptr": "*i64", "found_inf_ptr": "*fp32"},
                           floats),
                    dict(HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, MOMENTUM_ON_DEVICE=True,
                         BLOCK=block), warps))
    block_r, block_d, warps = masked_gather._blocks(384)
    tokens = {"tokens_ptr": "*bf16", "out_ptr": "*bf16", "index_ptr": "*i64",
              "grad_out_ptr": "*bf16", "grad_tokens_ptr": "*bf16"}
    for kernel in (masked_gather._gather_masked_fwd_kernel,
                   masked_gather._gather_masked_bwd_kernel):
        out.append(Spec(f"{kernel.__name__.strip('_')} D=384", kernel, _types(kernel, tokens),
                        dict(BLOCK_R=block_r, BLOCK_D=block_d), warps,
                        div16={"D", "stride_b", "stride_n", "stride_gr"}))
    return out


def compile_spec(spec: Spec, arch: int = 90) -> dict:
    """Compile one spec for sm_<arch>; ptxas's registers and spills, Triton's layouts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = spec.fn.arg_names
    signature = dict(spec.types)
    signature.update({n: "constexpr" for n in spec.constexprs})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in spec.types.items()
             if t.startswith("*") or n in spec.div16}
    source = ASTSource(fn=spec.fn, signature=signature, attrs=attrs,
                       constexprs={(names.index(n),): v for n, v in spec.constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps,
                                       "num_stages": spec.num_stages})
    info = _ptxas(compiled.asm["ptx"], arch)
    info["shared_bytes"] = compiled.metadata.shared
    info["layouts"] = sorted(set(re.findall(r"#ttg\.blocked<\{[^}]*\}>", compiled.asm["ttgir"])))
    return info


def _ptxas(ptx: str, arch: int) -> dict:
    import triton

    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        proc = subprocess.run([exe, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
                               f.name, "-o", os.devnull], capture_output=True, text=True,
                              timeout=120)
    finally:
        os.unlink(f.name)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[-500:]}")
    registers = re.search(r"Used (\d+) registers", text)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": sum(spills)}


def main(argv=None):
    p = argparse.ArgumentParser("ptxas_report", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10")
    p.add_argument("--ce-tiles", default="",
                   help="centred-CE forward tilings RxKxW to compile instead of the default")
    p.add_argument("--only", default="",
                   help="compile only the kernels whose name starts with this")
    p.add_argument("--layouts", action="store_true", help="print each kernel's layouts")
    p.add_argument("--json", action="store_true", help="one JSON object per kernel instead")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.ce_tiles.split(",") if t]
    if not args.json:
        print(f"sm_{args.arch}: registers per thread, spilled bytes, shared memory")
    failed = 0
    for spec in specs(tiles or None):
        if not spec.name.startswith(args.only):
            continue
        try:
            info = compile_spec(spec, args.arch)
        except Exception as e:  # noqa: BLE001 - report every kernel, fail at the end
            failed += 1
            error = f"{type(e).__name__}: {str(e)[-600:]}"
            print(json.dumps({"kernel": spec.name, "error": error}) if args.json else
                  f"  {spec.name:52s} FAILED: {error}")
            continue
        if args.json:
            print(json.dumps({"kernel": spec.name, "num_warps": spec.num_warps, **info}))
            continue
        print(f"  {spec.name:52s} {info['registers']:4d} regs  {info['spill_bytes']:5d} B "
              f"spilled  {info['shared_bytes']:6d} B shared  ({spec.num_warps} warps)")
        if args.layouts:
            for layout in info["layouts"]:
                print(f"      {layout}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
