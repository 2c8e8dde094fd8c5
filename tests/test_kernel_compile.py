"""Every Triton kernel compiles for an H100 (sm_90) and an A100 (sm_80) with the launch configuration its host
function picks on a GPU, without register spills: checked here, without a GPU, through
Triton's own ptxas (benchmarks/ptxas_report.py). The interpreter that runs the other
kernel tests never compiles anything, so this is the CPU's only guard against a kernel
that would fail, or spill, on the GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _report(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ptxas_report", "--json", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, rows


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_without_spills(arch):
    proc, rows = _report("--arch", str(arch))
    assert len(rows) >= 14, proc.stdout + proc.stderr[-2000:]
    failed = [r for r in rows if "error" in r]
    assert not failed, failed
    assert proc.returncode == 0
    for r in rows:
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
    # the centred-CE forward's tile keeps each row inside one warp (warps stacked on rows)
    fwd = next(r for r in rows
               if r["kernel"].startswith("centered_ce fwd") and r["kernel"].endswith("bf16"))
    assert any("warpsPerCTA = [4, 1]" in layout and "sizePerThread = [1, 8]" in layout
               for layout in fwd["layouts"]), fwd["layouts"]


def test_a_spilling_tiling_is_reported():
    """The check can fail: 32 x 512 tiles with 4 warps hold 128 logits of each tensor per
    thread, more than 255 registers can."""
    _, rows = _report("--ce-tiles", "32x512x4", "--only", "centered_ce fwd 32x512x4 bf16")
    assert [r["kernel"] for r in rows] == ["centered_ce fwd 32x512x4 bf16",
                                           "centered_ce fwd 32x512x4 bf16 masked"]
    assert rows[0]["spill_bytes"] > 0
