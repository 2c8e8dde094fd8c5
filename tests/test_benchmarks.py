"""Every benchmark's smoke mode runs and records rows (so the suite never rots), and the
FLOP formula of the full step is the one written in its docstring."""
import json

import pytest

from benchmarks import bench_train


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("IBOT_FAST_RESULTS", str(tmp_path))
    return tmp_path


@pytest.fixture
def twins(monkeypatch):
    """The kernels' pure-PyTorch twins on CPU tensors, as a CPU run outside the tests
    gets them (the interpreter's kernels are tested in test_kernel_*.py)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.shipped_demo
def test_bench_train_rows_of_a_preset(results, twins):
    """--smoke --preset demo: the reference rows, the preset as a user gets it (eager on
    the CPU), the DINOv2-style row and a variant, each against the run's first row, with
    its config's difference from the preset."""
    assert bench_train.main(["--smoke", "--steps", "1", "--preset", "demo", "--phases", "none",
                             "--variant", "optim.fuse_ema=true", "--run-id", "r1"]) == 0
    rows = read(results / "train.jsonl")
    assert [r["row"] for r in rows] == ["reference (math)", "reference (sdpa)", "preset",
                                        "dinov2style", "optim.fuse_ema=true"]
    first = rows[0]
    for r in rows:
        assert r["img_per_s"] > 0 and r["gflop_per_img"] > 0 and r["device"].startswith("cpu")
        assert r["run"] == "r1" and r["preset"] == "demo" and r["git"]
        assert "mfu" not in r  # the CPU has no peak in the table: no MFU, not a guess
        assert r["compiled"] is False and r["startup_s"] >= 0  # compile auto: eager on CPU
    assert "speedup" not in first
    for r in rows[1:]:
        assert r["speedup"] == pytest.approx(r["img_per_s"] / first["img_per_s"])
        assert r["speedup_vs"] == "reference (math)"
    diff = {r["row"]: r["config_diff"] for r in rows}
    assert diff["reference (math)"]["train.impl"] == "reference"
    assert diff["reference (math)"]["model.attention"] == "math"
    assert diff["reference (sdpa)"]["model.attention"] == "sdpa"
    assert "train.impl" not in diff["preset"]
    assert diff["dinov2style"]["masks.sampler"] == "stratified"
    assert diff["dinov2style"]["model.pack_crops"] is True
    assert diff["optim.fuse_ema=true"]["optim.fuse_ema"] is True


def test_bench_train_smoke_of_a_paper_preset_uses_its_dinov2style_twin(results, twins):
    assert bench_train.main(["--smoke", "--steps", "1", "--preset", "vit_small_16_paper", "--rows",
                             "preset,dinov2style", "--phases", "preset"]) == 0
    preset, twin = read(results / "train.jsonl")
    assert preset["model"] == twin["model"] == "vit_demo"  # --smoke shrinks any preset
    assert preset["phases_ms"]["backward"] > 0 and "phases_ms" not in twin
    assert twin["preset"] == "vit_small_16_paper"
    assert "data.source" in twin["config_diff"]  # synthetic batches, not the preset's folder
    assert twin["config_diff"]["loss.center2_from"] == "masked"
    assert "loss.center2_from" not in preset["config_diff"]


def test_bench_train_with_data_from_jpegs_on_disk(results, twins, tmp_path):
    """--with-data feeds every warm-up and timed step from the pipeline, reading JPEGs
    from disk (an ImageFolder and webdataset shards of the same files, made under
    --data-dir), beside the synthetic step; with DALI installed its CPU graph too."""
    variants = []
    try:
        import nvidia.dali  # noqa: F401
        variants = ["--data-variant", "data.pipeline=dali"]
    except ImportError:
        pass
    data = tmp_path / "data"
    assert bench_train.main(["--smoke", "--steps", "1", "--rows", "preset,data", "--phases", "none",
                             "--with-data", "folder,webdataset", "--data-dir", str(data),
                             *variants]) == 0
    rows = read(results / "train.jsonl")
    fed = [r for r in rows if r["with_data"]]
    assert [r["row"] for r in fed[:2]] == ["preset + data (cpu, folder)",
                                          "preset + data (cpu, webdataset)"]
    assert len(fed) == 2 + len(variants)
    for r in fed:
        assert r["img_per_s"] > 0 and r["vs_synthetic"] > 0 and r["data_wait_ms"] >= 0, r
    if variants:
        assert {r["pipeline"] for r in fed[2:]} == {"dali"}
    jpegs = sorted(data.glob("ibot_fast_bench_jpeg_*/class*/*.jpg"))
    shards = sorted(data.glob("ibot_fast_bench_jpeg_*_wds/*.tar"))
    assert len(jpegs) >= 4 * (1 + 2) and shards
    from PIL import Image
    with Image.open(jpegs[0]) as img:
        assert img.format == "JPEG" and img.size == bench_train.SMOKE_IMAGE_SIZE


def test_bench_train_plans_the_rows_it_is_asked_for():
    args = bench_train.parse_args(["--preset", "vit_small_16_paper,vit_base_16_paper",
                                   "train.batch_size=64", "--with-data", "--variant",
                                   "model.activation_checkpointing=full", "--data-variant",
                                   "data.num_workers=16"])
    rows = list(bench_train.plan_rows(args))
    assert [(r.preset, r.label) for r in rows[:7]] == [
        ("vit_small_16_paper", "reference (math)"), ("vit_small_16_paper", "reference (sdpa)"),
        ("vit_small_16_paper", "preset"), ("vit_small_16_paper", "preset + data"),
        ("vit_small_16_paper", "dinov2style"),
        ("vit_small_16_paper", "model.activation_checkpointing=full"),
        ("vit_small_16_paper", "data + data.num_workers=16")]
    assert len(rows) == 14 and rows[3].source == "folder"
    assert rows[4].build_preset == "vit_small_16_dinov2style"
    for r in rows:  # the user's overrides reach every row, before the row's own keys
        assert "train.batch_size=64" in r.overrides
    assert rows[0].overrides[-3:] == ["train.impl=reference", "model.attention=math",
                                      "train.compile=false"]
    assert bench_train.parse_args(["--smoke"]).preset == ["demo"]
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--preset", "vit_tiny_paper"])


def test_bench_centered_ce_tilings_smoke(results):
    from benchmarks import bench_centered_ce

    bench_centered_ce.main(["--smoke", "--methods", "triton", "--tiles", "16x256x4,4x1024x8"])
    rows = read(results / "centered_ce.jsonl")
    methods = {r["method"] for r in rows if r["status"] == "ok"}
    assert methods == {"triton", "triton@16x256x4", "triton@4x1024x8"}, rows


def test_epochs_cycles_the_loader():
    class Loader:
        def __init__(self, n):
            self.n, self.epochs = n, []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(range(self.n))

    loader = Loader(2)
    batches = bench_train.epochs(loader)
    assert [next(batches) for _ in range(5)] == [0, 1, 0, 1, 0] and loader.epochs == [1, 2, 3]
    with pytest.raises(RuntimeError, match="no batch"):
        next(bench_train.epochs(Loader(0)))


def test_step_flops_formula():
    from ibot_fast.config import build_config

    def flops(*keys, rows=29.4):
        return bench_train.step_flops(build_config("vit_small_16_paper",
                                                   ["data.path=/x", *keys]), rows)

    ref = flops("train.impl=reference", rows=0)
    fast = flops()
    # ViT-S/16 forward on one 224 crop: 4.6 G multiply-adds (DeiT's "4.6 GFLOPs"), 9.2 GFLOP
    one = bench_train.vit_forward_flops(197, 384, 12, 256)
    assert one == pytest.approx(9.2e9, rel=0.02)
    assert fast < ref  # the fast path skips the heads on unmasked and local patch tokens
    # the teacher's MLP on every global token (center2 from all) vs on the masked rows
    h = bench_train.head_flops(2 * 197 - 2 - 29.4, 384, 2048, 256, 8192, last=False)
    assert fast - flops("loss.center2_from=masked") == pytest.approx(h)
    # efficient stochastic depth skips (mean rate) of the student's block FLOPs
    blocks = 3 * (2 * 12 * (24 * 197 * 384**2 + 4 * 197**2 * 384) +
                  10 * 12 * (24 * 37 * 384**2 + 4 * 37**2 * 384))
    assert fast - flops("model.efficient_drop_path=true") == pytest.approx(0.05 * blocks)
    assert flops("model.activation_checkpointing=full") == fast  # model FLOPs only


@pytest.mark.parametrize("module,name", [("bench_attention", "attention"),
                                         ("bench_masked_head", "masked_head"),
                                         ("bench_centered_ce", "centered_ce"),
                                         ("bench_ema", "ema")])
def test_other_benchmarks_smoke(results, module, name):
    import importlib

    mod = importlib.import_module(f"benchmarks.{module}")
    assert mod.main(["--smoke"]) in (0, None)
    rows = read(results / f"{name}.jsonl")
    assert rows and all(r["smoke"] for r in rows)


def test_plot_and_summary(results, twins, capsys):
    from benchmarks import plot, summary

    assert bench_train.main(["--smoke", "--steps", "1", "--phases", "none", "--rows",
                             "reference_math,preset", "--run-id", "r2"]) == 0
    rows = read(results / "train.jsonl")
    for r in rows:  # the plot skips smoke rows: pretend these came from a real run
        r["smoke"] = False
    (results / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert plot.main(["--results", str(results)]) == 0
    assert (results / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert summary.main(["--results", str(results), "--markdown",
                         str(results / "headline.md")]) == 0
    out = capsys.readouterr().out
    assert "run r2" in out and "reference (math)" in out and "not run" in out
    md = (results / "headline.md").read_text()
    assert "| demo | preset |" in md and rows[0]["git"] in md


def test_headline_table_says_why_a_row_is_missing_and_checks_the_goals():
    from benchmarks.summary import goals, headline_rows

    def row(kind, label, img_per_s, **extra):
        return dict(preset="vit_small_16_paper", model="vit_small", kind=kind, row=label,
                    img_per_s=img_per_s, dali=None, **extra)

    rows = [row("reference_math", "reference (math)", 100.0),
            row("preset", "preset", 320.0, speedup=3.2),
            row("data_variant", "data (cpu, folder) + data.num_workers=16", 250.0,
                with_data="folder", pipeline="cpu", vs_synthetic=0.78),
            row("dinov2style", "dinov2style", 350.0)]
    table = headline_rows(rows, ["vit_small_16_paper", "vit_base_16_paper"])
    small = [(r["row"], r["note"]) for r in table if r["preset"] == "vit_small_16_paper"]
    assert small == [("reference (math)", None), ("reference (sdpa)", "not run"),
                     ("preset", None), ("preset + data (dali, folder)", "DALI not installed"),
                     ("dinov2style", None),
                     ("data (cpu, folder) + data.num_workers=16", None)]
    assert [r["note"] for r in table if r["preset"] == "vit_base_16_paper"] == \
        ["not run"] * 3 + ["DALI not installed", "not run"]
    assert goals(table) == ["vit_small: the preset is 3.20x the math reference (goal >= "
                            "3.0x: met)"]
    dali = row("data", "preset + data (dali, folder)", 300.0, with_data="folder",
               pipeline="dali", vs_synthetic=0.93)
    assert "93% of the synthetic step's images/sec (goal >= 90%: met)" in \
        goals(headline_rows(rows + [dali]))[1]


def test_latest_train_rows_ratios_against_both_references():
    from benchmarks.common import latest_train_rows, train_label

    def row(impl, img_per_s, mem, attention=None, compile_=False, device="GPU X"):
        overrides = [f"model.attention={attention}"] if attention else []
        return dict(device=device, model="vit_small", impl=impl, compile=compile_,
                    img_per_s=img_per_s, peak_alloc_mib=mem, overrides=overrides)

    rows = [row("reference", 100.0, 400.0, "math"), row("reference", 150.0, 300.0, "sdpa"),
            row("fast", 200.0, 200.0, "auto"), row("fast", 999.0, 1.0, device="GPU Y"),
            row("fast", 300.0, 100.0, "auto", compile_=True),
            row("fast", 250.0, 250.0, "auto")]  # a later fast row replaces the earlier one
    assert [train_label(r) for r in rows[:3]] == ["reference (math)", "reference (sdpa)",
                                                 "fast"]
    latest = latest_train_rows(rows, device="GPU X")
    assert [r["path"] for r in latest] == ["reference (math)", "reference (sdpa)", "fast",
                                          "fast +compile"]
    fast = latest[2]
    assert fast["x_vs_math"] == 2.5 and fast["x_vs_sdpa"] == pytest.approx(250 / 150)
    assert fast["mem_vs_math"] == 250 / 400 and latest[3]["x_vs_math"] == 3.0


def test_smoke_rows_stay_out_of_the_committed_results(tmp_path, monkeypatch):
    import torch

    from benchmarks import common

    monkeypatch.delenv("IBOT_FAST_RESULTS", raising=False)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    cpu = torch.device("cpu")
    assert common.record("x", [{"smoke": True}], cpu) == tmp_path / "smoke" / "x.jsonl"
    assert common.record("x", [{"smoke": False}], cpu) == tmp_path / "x.jsonl"
    named = tmp_path / "named"
    assert common.record("x", [{"smoke": True}], cpu, named) == named / "x.jsonl"


def test_live_bytes_counts_storages_once_and_sees_the_backward():
    import torch

    from benchmarks.bench_memory import LiveBytes

    x = torch.randn(1000, requires_grad=True)
    with LiveBytes() as live:
        a = torch.randn(1000)          # 4000 bytes
        view = a[10:20].view(2, 5)     # same storage: nothing more
        a.mul_(2)                      # in place: nothing more
        assert live.now == live.peak == 4000 and view.numel() == 10
        b = a * 2                      # 4000 more
        del b                          # freed
        assert live.now == 4000 and live.peak == 8000
        (x.exp() * a).sum().backward()  # the backward's buffers, x.grad included
    assert x.grad is not None and live.peak >= 8000 + 4000
    del a, view
    assert live.now == 4000  # only x.grad, created inside, is still alive
    with LiveBytes(torch.device("cuda")) as elsewhere:  # counts one device type only
        torch.randn(1000)
    assert elsewhere.peak == 0


def test_traffic_counts_matmul_flops_and_the_bytes_other_ops_move():
    import torch
    import torch.nn.functional as F

    from benchmarks.bench_memory import Traffic

    torch.manual_seed(0)
    x, w = torch.randn(64, 32), torch.randn(48, 32)
    q = torch.randn(2, 3, 10, 8)
    with Traffic() as t:
        y = F.linear(x, w)                          # 2 * 64 * 32 * 48 FLOPs
        v = y.view(64, 6, 8).transpose(0, 1)        # views: nothing moves
        h = y.to(torch.bfloat16)                    # reads 64x48 fp32, writes bf16
        y.add_(1.0)                                 # reads and writes y
        torch.zeros(100)                            # writes only
        F.scaled_dot_product_attention(q, q, q)     # 4 * 2 * 3 * 10 * 10 * 8 FLOPs
    assert t.matmul_flops == 2 * 64 * 32 * 48
    assert t.attention_flops == 4 * 2 * 3 * 10 * 10 * 8
    cast, add, zeros = 64 * 48 * (4 + 2), 2 * 64 * 48 * 4, 400
    assert t.by_op == {"_to_copy": cast, "add_": add, "zeros": zeros}
    assert t.other_bytes == cast + add + zeros and v.shape == (6, 64, 8)


def test_cuda_autocast_policy_replays_cudas_fp32_ops_on_the_cpu():
    """Inside a CPU autocast region CudaAutocastPolicy gives CUDA autocast's dtypes:
    LayerNorm, softmax, log_softmax, sums, norms, exp in fp32 on bf16 inputs (values as
    fp32 ops on the bf16 input), matmuls still bf16, an explicit dtype respected; the
    LayerNorm keeps its fp32 input copy for the backward (counted); outside autocast,
    nothing changes."""
    import torch
    import torch.nn.functional as F

    from benchmarks.bench_memory import LiveBytes
    from benchmarks.cuda_autocast import CudaAutocastPolicy

    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    lin, ln = torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)
    peaks = {}
    for policy in (False, True):
        with LiveBytes() as live:
            with torch.autocast("cpu", dtype=torch.bfloat16), \
                    (CudaAutocastPolicy() if policy else torch.autocast("cpu")):
                h = lin(x)
                y, p, lp = ln(h), h.softmax(-1), F.log_softmax(h, dim=-1)
                s, n, e = h.sum(), F.normalize(h, dim=-1), h.exp()
                asked = h.softmax(-1, dtype=torch.bfloat16)
                out = lin(y)
            out.float().sum().backward()
        peaks[policy] = live.peak
        want = torch.float32 if policy else torch.bfloat16
        assert h.dtype == out.dtype == asked.dtype == torch.bfloat16
        assert {t.dtype for t in (y, p, lp, s, n, e)} == {want}
    hf = h.detach().float()
    torch.testing.assert_close(y, F.layer_norm(hf, (32,), ln.weight, ln.bias, ln.eps))
    torch.testing.assert_close(p, hf.softmax(-1))
    torch.testing.assert_close(n, F.normalize(hf, dim=-1), rtol=1e-2, atol=1e-2)
    assert peaks[True] > peaks[False]
    with CudaAutocastPolicy():  # no autocast: the op's own dtype
        assert ln(h.detach()).dtype == torch.bfloat16 and h.softmax(-1).dtype == torch.bfloat16


def test_bench_memory_smoke_counts_the_main_paths(results):
    """Three of the paths (make test; every path: the slow test below): checkpointing
    keeps less than the fast path, which keeps less than the official one."""
    from benchmarks import bench_memory

    paths = ["reference (math)", "fast", "fast selective_mlp"]
    assert bench_memory.main(["--smoke", "--paths", ",".join(paths)]) == 0
    rows = {r["path"]: r for r in read(results / "memory.jsonl")}
    assert set(rows) == set(paths)
    per_img = {k: r["step_mib_per_img"] for k, r in rows.items()}
    assert 0 < per_img["fast selective_mlp"] < per_img["fast"] < per_img["reference (math)"]
    assert {r["autocast_policy"] for r in rows.values()} == {"cuda"}
    assert rows["fast"]["persistent_mib"] > 0


@pytest.mark.slow
def test_bench_memory_smoke_orders_the_paths(results):
    from benchmarks import bench_memory

    assert bench_memory.main(["--smoke"]) == 0
    rows = {r["path"]: r for r in read(results / "memory.jsonl")}
    assert set(rows) == set(bench_memory.PATHS)
    per_img = {k: r["step_mib_per_img"] for k, r in rows.items()}
    assert all(v > 0 for v in per_img.values())
    # checkpointing keeps less per image, and full keeps least
    assert per_img["fast full"] < per_img["fast selective_mlp"] < per_img["fast selective"] \
        < per_img["fast"]
    assert per_img["fast"] < per_img["reference (math)"]
    # CUDA's autocast policy (replayed on the CPU, the default there): its fp32
    # LayerNorm keeps an fp32 copy of each LayerNorm input, more than the fast rows' bf16
    # LayerNorms; an fp32 residual stream keeps those same fp32 inputs, nothing more
    assert {r["autocast_policy"] for r in rows.values()} == {"cuda"}
    assert per_img["fast fp32 layernorm"] > 1.05 * per_img["fast"]
    assert per_img["fast fp32 residual"] == pytest.approx(per_img["fast fp32 layernorm"],
                                                          rel=1e-3)
    assert per_img["reference (math) fp32 residual"] == pytest.approx(
        per_img["reference (math)"], rel=1e-3)
    assert rows["fast"]["persistent_mib"] > 0


def test_run_gpu_smoke_prints_the_headline_table_last(tmp_path):
    """run_gpu.sh's default stages in smoke mode, on the CPU: packages, the correctness
    stage (collected only: the kernels need the GPU), the table (one preset, the preset
    and its data-fed row, one step each) and the summary, whose table is the last thing
    printed, with the rows that did not run marked."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, SMOKE="1", RESULTS=str(tmp_path / "results"), PYTHON=sys.executable,
               TABLE_PRESETS="vit_small_16_paper", TRITON_INTERPRET="0",
               TABLE_ARGS=f"--steps 1 --phases none --rows preset,data "
                          f"--data-dir {tmp_path / 'data'}")
    env.pop("STAGES", None)
    out = subprocess.run(["bash", "benchmarks/run_gpu.sh"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600).stdout
    assert "pytest kernels exit code 0" in out and "pytest gpu exit code 0" in out, out
    table = out[out.rindex("=== summary"):].splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("preset "))
    rows = table[head + 1:]
    assert rows[0].split()[:2] == ["vit_small_16_paper", "reference"] and "not run" in rows[0]
    assert any(line.split()[1:3] == ["preset", "4"] for line in rows), table
    assert any("preset + data (cpu, folder)" in line for line in rows), table
    assert (tmp_path / "results" / "headline.md").exists()
