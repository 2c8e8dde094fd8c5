"""Render PNGs from the benchmark rows under benchmarks/results/.

    python -m benchmarks.plot                 # every device found in results/train.jsonl
    python -m benchmarks.plot --device H100   # rows whose device name contains "H100"

train.png: images/sec and peak memory per model and row (latest row per device, model and
label: reference with the official code's math attention, reference with SDPA, the preset,
its data-fed and DINOv2-style rows, variants; older rows: fast, fast +compile), with the
speed-up and memory ratio against the math-attention reference written on the bars.
Nothing runs at import time.
"""
import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import latest_train_rows

RESULTS = Path(__file__).resolve().parent / "results"
ARCH_ORDER = {"vit_demo": 0, "vit_small": 1, "vit_base": 2, "vit_large": 3}


def load_rows(path: Path, device_filter: str = None):
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if device_filter and device_filter not in row.get("device", ""):
                continue
            rows.append(row)
    return rows


def plot_train(rows, out_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest_train_rows(rows)
    if not rows:
        raise SystemExit("no non-smoke rows with img_per_s in results/train.jsonl: run "
                         "benchmarks/bench_train.py on a GPU first")
    devices = sorted({r["device"] for r in rows})
    fig, axes = plt.subplots(len(devices), 2, figsize=(12, 3.8 * len(devices)), squeeze=False)
    for ax_row, device in zip(axes, devices):
        dev_rows = [r for r in rows if r["device"] == device]
        models = sorted({r["model"] for r in dev_rows}, key=lambda m: ARCH_ORDER.get(m, 9))
        paths = list(dict.fromkeys(r["path"] for r in dev_rows))  # sorted by latest_train_rows
        width = 0.8 / max(len(paths), 1)
        for j, path in enumerate(paths):
            xs, speed, mem, notes = [], [], [], []
            for i, model in enumerate(models):
                r = next((r for r in dev_rows if r["model"] == model and r["path"] == path), None)
                if r is None:
                    continue
                xs.append(i + j * width)
                speed.append(r["img_per_s"])
                mem.append((r.get("peak_alloc_mib") or 0) / 1024)
                notes.append(r)
            for ax, values, key in ((ax_row[0], speed, "x_vs_math"), (ax_row[1], mem, "mem_vs_math")):
                bars = ax.bar(xs, values, width, label=path)
                for b, r in zip(bars, notes):
                    if r.get(key) and not path.startswith("reference (math"):
                        ax.annotate(f"{r[key]:.2f}x", (b.get_x() + b.get_width() / 2,
                                    b.get_height()), ha="center", va="bottom", fontsize=8)
        for ax, ylabel in zip(ax_row, ("images / s", "peak allocated (GiB)")):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))])
            ax.set_xticklabels(models)
            ax.set_ylabel(ylabel)
            ax.set_title(device, fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser("benchmarks.plot")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--device", default=None, help="substring of the device name")
    p.add_argument("--out", default=None, help="PNG path (default results/train.png)")
    args = p.parse_args(argv)
    results = Path(args.results)
    rows = load_rows(results / "train.jsonl", args.device)
    out = plot_train(rows, Path(args.out) if args.out else results / "train.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
