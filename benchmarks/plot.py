"""Render PNGs from the benchmark rows under benchmarks/results/.

    python -m benchmarks.plot                 # every device found in results/train.jsonl
    python -m benchmarks.plot --device H100   # rows whose device name contains "H100"

train.png: images/sec and peak memory per model, reference vs fast path (latest row per
(device, model, impl, compile)), with the speed-up and memory ratio written on the bars.
Nothing runs at import time.
"""
import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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


def latest(rows, keys):
    """The last row (file order) for each combination of keys."""
    out = {}
    for r in rows:
        out[tuple(r.get(k) for k in keys)] = r
    return list(out.values())


def plot_train(rows, out_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in latest([r for r in rows if "img_per_s" in r and not r.get("smoke")],
                              ["device", "model", "impl", "compile"])]
    if not rows:
        raise SystemExit("no non-smoke rows with img_per_s in results/train.jsonl: run "
                         "benchmarks/bench_train.py on a GPU first")
    devices = sorted({r["device"] for r in rows})
    fig, axes = plt.subplots(len(devices), 2, figsize=(11, 3.6 * len(devices)), squeeze=False)
    for ax_row, device in zip(axes, devices):
        dev_rows = [r for r in rows if r["device"] == device]
        models = sorted({r["model"] for r in dev_rows})
        labels = sorted({(r["impl"], r.get("compile", False)) for r in dev_rows})
        width = 0.8 / max(len(labels), 1)
        for j, (impl, comp) in enumerate(labels):
            name = impl + (" +compile" if comp else "")
            xs, speed, mem, notes = [], [], [], []
            for i, model in enumerate(models):
                r = next((r for r in dev_rows if r["model"] == model and r["impl"] == impl
                          and r.get("compile", False) == comp), None)
                if r is None:
                    continue
                xs.append(i + j * width)
                speed.append(r["img_per_s"])
                mem.append((r.get("peak_alloc_mib") or 0) / 1024)
                notes.append(r)
            bars = ax_row[0].bar(xs, speed, width, label=name)
            for b, r in zip(bars, notes):
                if r.get("speedup"):
                    ax_row[0].annotate(f"{r['speedup']:.2f}x", (b.get_x() + b.get_width() / 2,
                                       b.get_height()), ha="center", va="bottom", fontsize=8)
            bars = ax_row[1].bar(xs, mem, width, label=name)
            for b, r in zip(bars, notes):
                if r.get("mem_ratio"):
                    ax_row[1].annotate(f"{r['mem_ratio']:.2f}x", (b.get_x() + b.get_width() / 2,
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
