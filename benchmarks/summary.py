"""A short table of the latest benchmark rows (the last step of run_gpu.sh).

    python -m benchmarks.summary [--results DIR] [--device SUBSTRING]

For each results file, the rows of the most recent run (same git SHA and device as the
file's last row) are summarised in one line each, and for the full step the latest row per
model and path (reference with math / sdpa attention, fast, fast +compile) with the speed-up
and memory ratio against each reference, and the MFU.
"""
import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR, latest_train_rows, print_table


def latest_run(path: Path, device: str = None):
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if device:
        rows = [r for r in rows if device in r.get("device", "")]
    if not rows:
        return []
    last = rows[-1]
    return [r for r in rows if r.get("git") == last.get("git") and
            r.get("device") == last.get("device")]


def main(argv=None):
    p = argparse.ArgumentParser("benchmarks.summary")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    results = Path(args.results)
    path = results / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []
    rows = [r for r in rows if "img_per_s" in r and (not args.device or args.device in r["device"])]
    train = latest_train_rows(rows, rows[-1]["device"]) if rows else []
    if train:
        print(f"full step on {train[-1]['device']} (latest row per model and path; x_vs_math "
              f"and mem_vs_math: against the reference with the official code's attention):")
        print_table(train, ["model", "path", "batch", "img_per_s", "peak_alloc_mib",
                            "x_vs_math", "mem_vs_math", "x_vs_sdpa", "mem_vs_sdpa", "mfu",
                            "git"])
    for name, columns in (
            ("centered_ce", ["method", "phase", "rows", "K", "dtype", "ms", "gbps", "of_copy",
                             "extra_mib"]),
            ("ema", ["model", "kind", "method", "ms", "gbps", "of_copy", "speedup"]),
            ("masked_head", ["model", "variant", "center2", "ms", "speedup", "mem_ratio"]),
            ("attention", ["model", "bench", "variant", "backend", "packed", "ms", "img_per_s"]),
            ("data", ["pipeline", "workers", "img_per_s"]),
            ("train_data", ["model", "impl", "batch", "img_per_s", "step_ms", "peak_alloc_mib"]),
            ("memory", ["model", "path", "persistent_mib", "step_mib_per_img",
                        "peak_mib_at_128", "step_peak_mib", "allocator_step_peak_mib"])):
        rows = latest_run(results / f"{name}.jsonl", args.device)
        if rows:
            print(f"\n{name} ({rows[-1]['device']}):")
            print_table(rows, [c for c in columns if any(c in r for r in rows)])
    if not train:
        print("no results for the full step yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
