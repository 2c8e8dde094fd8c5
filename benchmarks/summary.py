"""The headline table of a bench_train run, and a short table of the latest rows of every
other benchmark (the last step of run_gpu.sh).

    python -m benchmarks.summary [--results DIR] [--device SUBSTRING]
    python -m benchmarks.summary --run RUN_ID --expect vit_small_16_paper,vit_base_16_paper \\
        --markdown headline.md

The headline table: for each preset of the run (`--run`, default the last run in
train.jsonl), its rows in bench_train's order: reference (math), reference (sdpa), the
preset, the preset fed by DALI from JPEGs on disk, the DINOv2-style preset, then the
other data rows and the variants; images/sec, step time, peak memory, MFU, the speed-up
against the run's first row of that preset, the data rows' wall-clock images/sec against
the synthetic step's, and start-up time (compilation included). An expected row that is
missing says why: "DALI not installed" (the run's rows say DALI did not import), or "not
run" (a time limit or a crash). Then the goals, each a ratio within the run: the preset
>= 3x the math reference for ViT-S/16 and >= 2.5x for ViT-B/16; fed by DALI >= 90% of
the synthetic step. `--markdown PATH` also writes the table as Markdown, headed by the
date, device and git SHA, for the README.
"""
import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR, print_table

# (kind, label) of the rows every headline table shows, in order
EXPECTED = (("reference_math", "reference (math)"), ("reference_sdpa", "reference (sdpa)"),
            ("preset", "preset"), ("dali", "preset + data (dali, folder)"),
            ("dinov2style", "dinov2style"))
ORDER = {"reference_math": 0, "reference_sdpa": 1, "preset": 2, "dali": 3, "data": 4,
         "dinov2style": 5, "variant": 6, "data_variant": 7}
# the goals: the preset's speed-up over the math reference, by architecture
SPEEDUP_GOALS = {"vit_small": 3.0, "vit_base": 2.5}
DALI_GOAL = 0.9
COLUMNS = ["preset", "row", "batch", "img_per_s", "step_ms", "peak_gib", "mfu", "speedup",
           "vs_synthetic", "startup_s", "note"]


def read_rows(path: Path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_run(path: Path, device: str = None):
    """The rows of the most recent run in a results file: same git SHA and device as the
    file's last row."""
    rows = read_rows(path)
    if device:
        rows = [r for r in rows if device in r.get("device", "")]
    if not rows:
        return []
    last = rows[-1]
    return [r for r in rows if r.get("git") == last.get("git") and
            r.get("device") == last.get("device")]


def _slot(row) -> str:
    """The row's place in the headline order: a DALI-fed preset row from an ImageFolder
    has its own."""
    if row.get("kind") == "data" and row.get("pipeline") == "dali" and \
            row.get("with_data") == "folder":
        return "dali"
    return row.get("kind", "variant")


def headline_rows(rows, expect=()):
    """The run's rows in table order, with a placeholder for each expected row missing."""
    presets = list(dict.fromkeys(list(expect) + [r["preset"] for r in rows]))
    dali_missing = any(r.get("dali") is None for r in rows) if rows else False
    out = []
    for preset in presets:
        mine = [dict(r) for r in rows if r["preset"] == preset]
        model = next((r["model"] for r in mine if r.get("model")), preset)
        have = {_slot(r) for r in mine if "img_per_s" in r}
        for kind, label in EXPECTED:
            if kind not in have and not any(_slot(r) == kind for r in mine):
                note = "DALI not installed" if kind == "dali" and dali_missing else "not run"
                mine.append({"preset": preset, "model": model, "row": label, "kind": kind,
                             "note": note})
        for r in mine:
            r["peak_gib"] = r["peak_alloc_mib"] / 1024 if r.get("peak_alloc_mib") else None
            if "note" not in r:
                r["note"] = "out of memory" if r.get("oom") else r.get("error")
        out += sorted(mine, key=lambda r: ORDER.get(_slot(r), 9))
    return out


def goals(table):
    """One line per goal that the run's rows can answer."""
    lines = []
    for preset in dict.fromkeys(r["preset"] for r in table):
        mine = {_slot(r): r for r in table if r["preset"] == preset and "img_per_s" in r}
        model = next((r["model"] for r in table if r["preset"] == preset), preset)
        ref, fast, dali = mine.get("reference_math"), mine.get("preset"), mine.get("dali")
        want = SPEEDUP_GOALS.get(model)
        if want and ref and fast:
            x = fast["img_per_s"] / ref["img_per_s"]
            lines.append(f"{model}: the preset is {x:.2f}x the math reference (goal >= "
                         f"{want}x: {'met' if x >= want else 'not met'})")
        if dali and dali.get("vs_synthetic"):
            v = dali["vs_synthetic"]
            lines.append(f"{model}: fed by DALI from JPEGs, {v:.0%} of the synthetic step's "
                         f"images/sec (goal >= {DALI_GOAL:.0%}: "
                         f"{'met' if v >= DALI_GOAL else 'not met'})")
    return lines


def markdown(table, env) -> str:
    """The table as Markdown, headed by where and when it was measured."""
    head = (f"{env.get('device', '?')}, {env.get('time', '?')[:10]}, git {env.get('git', '?')}"
            f", torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
            f"DALI {env.get('dali') or 'not installed'}")
    cols = ["preset", "row", "img/s", "peak GiB", "MFU", "x first row", "vs synthetic",
            "start-up s", "note"]
    keys = ["preset", "row", "img_per_s", "peak_gib", "mfu", "speedup", "vs_synthetic",
            "startup_s", "note"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        cells = []
        for k in keys:
            v = r.get(k)
            if v is None:
                cells.append("-")
            elif k == "mfu" or k == "vs_synthetic":
                cells.append(f"{v:.0%}" if k == "vs_synthetic" else f"{v:.1%}")
            elif k == "speedup":
                cells.append(f"{v:.2f}x")
            elif isinstance(v, float):
                cells.append(f"{v:.0f}" if k == "img_per_s" else f"{v:.1f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_headline(rows, expect=(), markdown_path=None) -> bool:
    """Print the headline table of these rows (one run); False when there is nothing."""
    table = headline_rows(rows, expect)
    if not table:
        return False
    env = next((r for r in reversed(rows) if r.get("device")), {})
    print(f"full step, run {rows[-1]['run'] if rows else '-'} on {env.get('device', '?')} "
          f"(git {env.get('git', '?')}); speed-up: against the first row of the same model; "
          "vs_synthetic: wall-clock images/sec fed from disk over the synthetic step's; "
          "startup_s: build + warm-up beyond the steady steps (compilation included)")
    print_table(table, COLUMNS)
    for line in goals(table):
        print(line)
    if markdown_path:
        Path(markdown_path).write_text(markdown(table, env))
    return True


def main(argv=None):
    p = argparse.ArgumentParser("benchmarks.summary")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--device", default=None)
    p.add_argument("--run", default=None, help="the bench_train run id (default: the last)")
    p.add_argument("--expect", default="",
                   help="presets the table must show (a row each, 'not run' if absent)")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    p.add_argument("--headline-only", action="store_true",
                   help="only the headline table (run_gpu.sh prints it last)")
    args = p.parse_args(argv)
    results = Path(args.results)
    if not args.headline_only:
        for name, columns in (
                ("centered_ce", ["method", "phase", "rows", "K", "dtype", "ms", "gbps",
                                 "of_copy", "extra_mib"]),
                ("ema", ["model", "kind", "method", "ms", "gbps", "of_copy", "speedup"]),
                ("masked_head", ["model", "variant", "center2", "ms", "speedup", "mem_ratio"]),
                ("attention", ["model", "bench", "variant", "backend", "packed", "ms",
                               "img_per_s"]),
                ("data", ["pipeline", "workers", "img_per_s"]),
                ("memory", ["model", "path", "persistent_mib", "step_mib_per_img",
                            "peak_mib_at_128", "step_peak_mib", "allocator_step_peak_mib"])):
            rows = latest_run(results / f"{name}.jsonl", args.device)
            if rows:
                print(f"\n{name} ({rows[-1]['device']}):")
                print_table(rows, [c for c in columns if any(c in r for r in rows)])
        print()
    train = [r for r in read_rows(results / "train.jsonl") if r.get("run") and
             (not args.device or args.device in r.get("device", ""))]
    run = args.run or (train[-1]["run"] if train else None)
    rows = [r for r in train if r["run"] == run]
    if not rows:
        print(f"no full-step rows of run {run or '-'} in {results / 'train.jsonl'}")
    print_headline(rows, [e for e in args.expect.split(",") if e], args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
