"""What every benchmark shares: timing, the device's peak table, measured ceilings, and
the machine-readable result rows (one JSON object per line under benchmarks/results/).

Nothing here runs at import time.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core peak (TFLOP/s, datasheet, no sparsity) by device-name substring,
# most specific first. MFU is reported against this; an unknown device gets no MFU.
# Measured ceilings on this project's reference machines (a large bf16 matmul, a large
# device-to-device copy), for comparison: H100 80GB SXM ~800 TFLOP/s and ~3.0 TB/s;
# H200 ~790 TFLOP/s and ~4.3 TB/s. Each GPU run also measures its own (`measure_ceilings`).
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 / HBM3
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
]


def peak_bf16_tflops(device_name: str):
    """Datasheet dense bf16 peak for a device name, or None when the device is unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def _version(module_name: str):
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "unknown")
    except Exception:
        return None


def git_sha() -> str:
    """The checkout's short SHA (+ "-dirty"); IBOT_FAST_GIT overrides it where the copy
    being run has no .git (a working tree sent to a GPU machine)."""
    if os.environ.get("IBOT_FAST_GIT"):
        return os.environ["IBOT_FAST_GIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def env_info(device: torch.device) -> dict:
    """Where a number was measured: device, software versions, code version."""
    info = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "git": git_sha(),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    try:
        import nvidia.dali as dali
        info["dali"] = dali.__version__
    except Exception:
        info["dali"] = None
    return info


def record(name: str, rows, device: torch.device, results_dir=None) -> Path:
    """Append rows (dicts) to <results_dir>/<name>.jsonl, each with the environment.

    Smoke rows (CPU smoke modes) go to results/smoke/ (ignored by git) unless a directory
    is named, so that a local smoke run leaves the committed GPU rows alone."""
    results_dir = results_dir or os.environ.get("IBOT_FAST_RESULTS")
    if results_dir is None:
        smoke = rows and all(r.get("smoke") for r in rows)
        results_dir = RESULTS_DIR / "smoke" if smoke else RESULTS_DIR
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.jsonl"
    env = env_info(device)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
    return path


def quantiles(times_ms):
    """Median and the 20/80 quantiles of a list of times."""
    ordered = sorted(times_ms)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    q = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), q[1], q[7]


def time_ms(fn, device: torch.device, warmup: int = 3, reps: int = 10):
    """Run fn() warmup + reps times; return the list of per-call times in ms.

    CUDA: CUDA events around each call (no host sync between calls beyond the final
    event wait). CPU: wall clock.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_ceilings(device: torch.device) -> dict:
    """Measured device-copy bandwidth (GB/s, read + write) and bf16 matmul TFLOP/s."""
    if device.type != "cuda":
        return {"copy_gbps": None, "matmul_tflops": None}
    n = 1 << 28  # 256 Mi fp32 = 1 GiB, far past L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    med, _, _ = quantiles(time_ms(lambda: dst.copy_(src), device, warmup=3, reps=20))
    copy_gbps = 2 * src.numel() * src.element_size() / (med * 1e-3) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    med, _, _ = quantiles(time_ms(lambda: a @ b, device, warmup=5, reps=20))
    matmul_tflops = 2 * m**3 / (med * 1e-3) / 1e12
    return {"copy_gbps": round(copy_gbps, 1), "matmul_tflops": round(matmul_tflops, 1)}


def peak_memory_reset(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device):
    """(peak allocated, peak reserved) in MiB since the last reset; None on the CPU."""
    if device.type != "cuda":
        return None, None
    return (torch.cuda.max_memory_allocated(device) / 2**20,
            torch.cuda.max_memory_reserved(device) / 2**20)


def train_label(row) -> str:
    """A full-step row's label: bench_train's `row` ("reference (math)", "preset",
    "dinov2style", ...); rows recorded before it had one: "reference (math)" (the official
    code's attention), "reference (sdpa)", "fast" or "fast +compile"."""
    if row.get("row"):
        return row["row"]
    if row.get("impl") == "reference":
        attention = next((o.split("=", 1)[1] for o in row.get("overrides", [])
                          if o.startswith("model.attention=")), "sdpa")
        return f"reference ({attention})"
    return f"{row.get('impl')}{' +compile' if row.get('compile') else ''}"


def latest_train_rows(rows, device: str = None):
    """The last row per (device, model, label) of non-smoke full-step rows, each with
    speed-up and memory ratio against both references of its device and model."""
    last = {}
    for r in rows:
        if "img_per_s" in r and not r.get("smoke") and (device is None or device in r["device"]):
            last[r["device"], r["model"], train_label(r)] = dict(r, path=train_label(r))
    for (dev, model, _), r in last.items():
        for attention in ("math", "sdpa"):
            base = last.get((dev, model, f"reference ({attention})"))
            if base:
                r[f"x_vs_{attention}"] = r["img_per_s"] / base["img_per_s"]
                r[f"mem_vs_{attention}"] = r["peak_alloc_mib"] / base["peak_alloc_mib"] \
                    if r.get("peak_alloc_mib") and base.get("peak_alloc_mib") else None
    order = {"reference (math)": 0, "reference (sdpa)": 1, "fast": 2, "fast +compile": 3,
             "preset": 2, "dinov2style": 4}
    return sorted(last.values(), key=lambda r: (r["device"], r["model"],
                                                 order.get(r["path"], 9), r["path"]))


def print_table(rows, columns):
    """A plain fixed-width table of the chosen columns."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)
