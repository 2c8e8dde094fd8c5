"""Two CPU processes (gloo), DDP or FSDP2, against one process with the same global batch
(on the CPU also where a GPU is present: train.device=cpu)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ibot_fast import checkpoint
from ibot_fast.config import build_config
from ibot_fast.eval.knn import knn_eval_backbone
from ibot_fast.models import build_backbone
from ibot_fast.train import Trainer

COMMON = ["data.source=synthetic", "data.synthetic_size=32", "data.num_workers=0",
          "data.n_local=2", "train.epochs=2", "train.stop_at_iter=3", "train.log_every=1",
          "model.drop_path_rate=0", "model.out_dim=128", "model.patch_out_dim=128",
          "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "optim.warmup_epochs=0",
          "optim.freeze_last_layer=0", "optim.lr=0.05", "train.device=cpu"]
FSDP = ["train.parallel=fsdp"]


def launch(nproc: int, *args, timeout=300) -> subprocess.CompletedProcess:
    """torchrun with `nproc` CPU processes; kills them all after `timeout` (a hang)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        stdout, stderr = proc.communicate()
        pytest.fail(f"the processes hung for {timeout} s: {stderr[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def torchrun(out_dir: Path, *args, timeout=300, nproc=2) -> dict:
    """`nproc` worker processes, a global batch of 8; returns rank 0's saved networks and
    centers (None if it saved nothing). A hang (processes out of step) kills them all
    after `timeout`."""
    worker = Path(__file__).parent / "ddp_worker.py"
    proc = launch(nproc, str(worker), str(out_dir), f"train.batch_size={8 // nproc}", *args,
                  timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = out_dir / "rank0.pt"
    return torch.load(path) if path.exists() else None


def run_single(out_dir: Path, overrides, resume=None) -> Trainer:
    """One process, batch 8, one thread (as the workers: the same summation order where
    possible)."""
    trainer = Trainer(build_config("demo", [f"train.output_dir={out_dir}",
                                            "train.batch_size=8", *overrides]), resume)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    trainer.loss.finish_center_update()
    return trainer


def assert_matches(saved: dict, single: Trainer) -> None:
    """Rank 0's networks and centers equal the single process's."""
    assert_same_run(saved, {"teacher": single.teacher.state_dict(),
                            "student": single.student_module.state_dict(),
                            "center": single.loss.center, "center2": single.loss.center2},
                    2 * single.sched.lr.max() * single.iteration + 1e-5)


def assert_same_run(saved: dict, other: dict, lr_bound: float) -> None:
    for key, value in other["teacher"].items():
        torch.testing.assert_close(saved["teacher"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=f"teacher {key}")
    # The student, element by element: AdamW's first steps move every weight by about
    # +-lr whatever its gradient's size, so a gradient within rounding of zero can take
    # either sign in the two runs (half-batch gradients all-reduced vs one batch: seen on
    # a 16-core host, not on the 2-core CI machine). Such elements may differ by up to
    # 2 lr per step; all others must agree to 1e-5, and they must be nearly all.
    # The key bias (the middle third of qkv.bias) is such an element throughout: softmax
    # does not change when a constant is added to every logit of a row, so its gradient
    # is zero up to rounding, and with FSDP's reduce-scatter its rounding differs.
    for key, value in other["student"].items():
        diff = (saved["student"][key] - value).abs()
        assert diff.max() <= lr_bound, f"student {key}: {diff.max():.3g} > {lr_bound:.3g}"
        if key.endswith("qkv.bias"):
            q, _, v = diff.chunk(3)
            diff, value = torch.cat([q, v]), torch.cat([value.chunk(3)[0], value.chunk(3)[2]])
        off = int((diff > 1e-5 + 1e-4 * value.abs()).sum())
        allowed = max(1, math.ceil(1e-3 * value.numel()))  # a small tensor may have one
        assert off <= allowed, f"student {key}: {off} of {value.numel()} elements differ"
    torch.testing.assert_close(saved["center"], other["center"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(saved["center2"], other["center2"], rtol=1e-4, atol=1e-5)


def assert_same_grad_norms(run: Path, other: Path) -> None:
    """The logged gradient norms (before clipping, every step) agree."""
    norms = [[json.loads(line)["grad_norm"] for line in (d / "log.jsonl").open()]
             for d in (run, other)]
    assert len(norms[0]) == len(norms[1]) > 0
    torch.testing.assert_close(torch.tensor(norms[0]), torch.tensor(norms[1]), rtol=1e-4,
                               atol=0)


def assert_moved(before: dict, after: dict, at_least=1e-3) -> None:
    """The comparison has teeth: training moved the student far more than the tolerance."""
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) > at_least


@pytest.mark.parametrize("impl,extra", [
    ("reference", []),
    ("fast", []),
    ("fast", ["model.activation_checkpointing=selective"]),  # DDP with checkpointed blocks
    # the paper presets' fused AdamW + EMA; center2 from the masked rows, whose count
    # differs between processes under the i.i.d. sampler (summed with the statistics)
    ("fast", ["optim.fuse_ema=true", "loss.center2_from=masked"]),
    # FSDP2: the reference path runs each block twice per forward (global, local crops)
    ("reference", FSDP),
    ("fast", FSDP + ["optim.fuse_ema=true"]),  # (the S/B presets': two passes under FSDP)
    ("fast", FSDP + ["model.activation_checkpointing=selective",  # ZeRO-2, official clip
                     "train.fsdp_reshard_after_forward=false", "optim.clip_mode=per_param"]),
])
def test_two_processes_match_one(tmp_path, impl, extra):
    overrides = COMMON + [f"train.impl={impl}", *extra]
    saved = torchrun(tmp_path / "ddp", *overrides)
    sharded = "train.parallel=fsdp" in extra
    assert saved["sharded"] == sharded
    if sharded:  # each process held about half of the student (dim-0 shards, padded)
        total = sum(v.numel() for v in saved["student"].values())
        assert 0.45 * total <= saved["local_numel"] <= 0.55 * total
    else:  # the teacher (and everything else) is identical on both ranks
        other = torch.load(tmp_path / "ddp" / "rank1.pt")
        for key in saved["teacher"]:
            assert torch.equal(saved["teacher"][key], other["teacher"][key]), key
        assert torch.equal(saved["center"], other["center"])

    single = Trainer(build_config("demo", [f"train.output_dir={tmp_path / 'one'}",
                                           "train.batch_size=8", *overrides]))
    init = {k: v.clone() for k, v in single.student_module.state_dict().items()}
    single.close()
    single = run_single(tmp_path / "one", overrides)
    assert_matches(saved, single)
    assert_same_grad_norms(tmp_path / "ddp", tmp_path / "one")
    assert_moved(init, single.student_module.state_dict())


def test_hsdp_four_processes_match_one(tmp_path):
    """HSDP: 4 processes as 2 replicas of 2 shards (train.fsdp_shard_size=2) equal one
    process, with the official per-parameter clipping at a max norm the gradients
    exceed (so the clip's squared norms must be summed over one shard group, not over
    the replicas too). Each process holds half the student, and the two replicas of a
    shard stay equal."""
    overrides = COMMON + ["train.impl=fast", "optim.clip_mode=per_param", "optim.clip_grad=0.05"]
    saved = torchrun(tmp_path / "hsdp", *overrides, *FSDP, "train.fsdp_shard_size=2", nproc=4)
    assert saved["sharded"]
    total = sum(v.numel() for v in saved["student"].values())
    assert 0.45 * total <= saved["local_numel"] <= 0.55 * total
    shards = [torch.load(tmp_path / "hsdp" / f"local{r}.pt") for r in range(4)]
    for replica, other in ((0, 2), (1, 3)):  # the groups are ranks {0, 1} and {2, 3}
        for key, value in shards[replica].items():
            assert torch.equal(value, shards[other][key]), key
    key = "backbone.blocks.0.attn.qkv.weight"  # ranks 0 and 1 split it
    assert shards[0][key].shape == shards[1][key].shape and not torch.equal(shards[0][key],
                                                                            shards[1][key])
    single = run_single(tmp_path / "one", overrides)
    assert_same_grad_norms(tmp_path / "hsdp", tmp_path / "one")
    assert_matches(saved, single)

    # its checkpoint resumes under HSDP (whole tensors sharded again on the 2-D mesh) to
    # the same step as one process resuming it
    later = ["train.stop_at_iter=4"]
    shutil.copytree(tmp_path / "hsdp", tmp_path / "one_resumed",
                    ignore=shutil.ignore_patterns("rank*.pt", "local*.pt"))
    saved = torchrun(tmp_path / "hsdp", *overrides, *FSDP, "train.fsdp_shard_size=2", *later,
                     "--resume", nproc=4)
    single = run_single(tmp_path / "one_resumed", overrides + later, resume="auto")
    assert single.iteration == 4
    assert_matches(saved, single)


@pytest.mark.parametrize("shard_size,held", [(1, 1.0), (4, 0.25)])
def test_hsdp_edge_shard_sizes_match_one(tmp_path, shard_size, held):
    """The two ends of train.fsdp_shard_size on 4 processes, global-norm clipping: 1
    (every process a whole replica, DDP through FSDP) and 4 (one group: plain FSDP, a
    1-D mesh) equal one process and hold the expected part of the student."""
    overrides = COMMON + ["train.impl=fast", "optim.clip_grad=0.05", "optim.clip_mode=global"]
    saved = torchrun(tmp_path / "run", *overrides, *FSDP, f"train.fsdp_shard_size={shard_size}",
                     nproc=4)
    total = sum(v.numel() for v in saved["student"].values())
    assert held - 0.05 <= saved["local_numel"] / total <= held + 0.05
    single = run_single(tmp_path / "one", overrides)
    assert_same_grad_norms(tmp_path / "run", tmp_path / "one")
    assert_matches(saved, single)


def test_fsdp_equals_ddp_with_drop_path_over_an_epoch_end(tmp_path):
    """With stochastic depth (the same draws in both: same seeds, same processes) FSDP
    equals DDP: efficient drop path, packed crops, selective_mlp checkpointing, the
    KoLeo term (per process in both), no clipping (the skip verdict is then
    all-reduced); the epoch end writes the kept
    checkpoint on rank 0 with every process taking part."""
    overrides = [o for o in COMMON if not o.startswith(("model.drop_path", "train.stop_at"))]
    overrides += ["train.impl=fast", "model.drop_path_rate=0.2",
                  "model.efficient_drop_path=true", "model.pack_crops=true",
                  "model.activation_checkpointing=selective_mlp", "optim.clip_grad=0",
                  "train.stop_at_iter=5", "train.keep_every=1", "loss.koleo_weight=0.1"]
    ddp = torchrun(tmp_path / "ddp", *overrides)
    sharded = torchrun(tmp_path / "fsdp", *overrides, *FSDP)
    assert sharded["sharded"] and not ddp["sharded"]
    lr = build_config("demo", overrides).optim.lr * 8 / 256
    assert_same_run(sharded, ddp, 2 * lr * 5 + 1e-5)
    for run in ("ddp", "fsdp"):  # 4 iterations per epoch
        kept = checkpoint.load(tmp_path / run / "checkpoint0001.pth")
        assert kept["epoch"] == 1 and kept["iteration"] == 4


def test_a_signal_to_one_process_on_an_epochs_last_step_stops_all_after_the_epoch(tmp_path):
    """SIGUSR2 reaches rank 1 only, during the last step of epoch 0 (4 steps): both
    processes finish the epoch, agree at its end (one all-reduce there on every rank),
    save once and stop as "requeued"; the epoch's k-NN is skipped (pre-emption)."""
    out = tmp_path / "run"
    saved = torchrun(out, *COMMON, "train.stop_at_iter=8", "eval.knn_every=1",
                     "--usr2-on-rank1-at-epoch-end")
    other = torch.load(out / "rank1.pt")
    assert (saved["status"], saved["iteration"]) == (other["status"], other["iteration"]) \
        == ("requeued", 4)
    ckpt = checkpoint.load(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["batch_in_epoch"]) == (1, 4, 0)
    assert "knn_top1_k20" not in (out / "log.jsonl").read_text()


@pytest.mark.parametrize("extra", [[], FSDP])
def test_a_nan_loss_on_one_process_is_skipped_by_all(tmp_path, extra):
    """Rank 1's loss is NaN at iteration 1: both processes skip that step and stay finite
    and alike. Without clipping no all-reduced gradient norm carries the verdict, so only
    the all-reduced skip flag does (under FSDP it keeps the shards' updates together)."""
    saved = torchrun(tmp_path / "run", *COMMON, "train.impl=fast", "optim.clip_grad=0",
                     *extra, "--nan-on-rank1")
    assert saved["nonfinite"] == 1
    assert all(torch.isfinite(v).all() for v in saved["student"].values())
    if not saved["sharded"]:
        other = torch.load(tmp_path / "run" / "rank1.pt")
        assert other["nonfinite"] == 1
        for key in saved["student"]:
            assert torch.equal(saved["student"][key], other["student"][key]), key


def test_unreadable_images_on_one_process_stop_all(tmp_path):
    """Rank 1 alone reports unreadable images: the abort is decided on the count over
    all processes, so both stop with the one-line error (and save together first)."""
    torchrun(tmp_path / "run", *COMMON, "train.impl=fast", "--bad-on-rank1", timeout=120)
    errors = [(tmp_path / "run" / f"error{r}.txt").read_text() for r in range(2)]
    assert all("image reads failed" in e for e in errors), errors
    assert errors[0] == errors[1]
    assert (tmp_path / "run" / "checkpoint.pth").exists()


def test_fsdp_checkpoint_resumes_anywhere_and_knn(tmp_path):
    """An FSDP run's checkpoint is whole and in a DDP run's format: it resumes under FSDP
    and in one process to the same place, and it resumes what an unsharded run wrote.
    The trainer's k-NN evaluation under FSDP scores the gathered teacher."""
    overrides = [o for o in COMMON if not o.startswith(("data.source", "train.stop_at"))]
    overrides += ["data.source=digits", "train.impl=fast", "optim.freeze_last_layer=1"]
    first = tmp_path / "fsdp"
    torchrun(first, *overrides, *FSDP, "train.stop_at_iter=2", "--knn")

    # the checkpoint: unsharded tensors, optimizer state keyed by index, as one process's
    ckpt = checkpoint.load(first / "checkpoint.pth")
    one = Trainer(build_config("demo", [f"train.output_dir={tmp_path / 'ref'}",
                                        "train.batch_size=8", *overrides]))
    one.close()
    reference = one.state_dict()
    for part in ("student", "teacher"):
        assert {k: v.shape for k, v in ckpt[part].items()} == \
            {k: v.shape for k, v in reference[part].items()}
        assert all(type(v) is torch.Tensor for v in ckpt[part].values())
    assert ckpt["optimizer"]["param_groups"][0]["params"] == \
        reference["optimizer"]["param_groups"][0]["params"]
    n_params = sum(len(g["params"]) for g in reference["optimizer"]["param_groups"])
    n_last = len(one.params.last_layer)  # frozen in epoch 0: AdamW has no state for them yet
    assert sorted(ckpt["optimizer"]["state"]) == \
        sorted(set(range(n_params)) - {i for i in range(n_params)
                                       if i in _last_layer_indices(one)})
    assert n_last > 0 and ckpt["iteration"] == 2

    # k-NN at the stop, from the trainer under FSDP, equals k-NN of the saved teacher
    logged = [json.loads(line) for line in (first / "log.jsonl").read_text().splitlines()]
    knn = [r for r in logged if "knn_top1_k20" in r]
    assert len(knn) == 1
    backbone = build_backbone(one.cfg)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in ckpt["teacher"].items()
                              if k.startswith("backbone.")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = knn_eval_backbone(one.cfg, backbone, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    # the same features up to summation order: at most one of the 360 held-out digits
    # may vote otherwise (ties of neighbours' similarities are within an fp32 ulp)
    assert abs(knn[0]["knn_top1_k20"] - expected[20]) <= 100 / 360 + 1e-6

    # resume under FSDP and in one process: the same four steps
    later = ["train.stop_at_iter=4"]
    shutil.copytree(first, tmp_path / "one", ignore=shutil.ignore_patterns("rank*.pt"))
    saved = torchrun(first, *overrides, *FSDP, *later, "--resume")
    single = run_single(tmp_path / "one", overrides + later, resume="auto")
    assert single.iteration == 4
    assert_matches(saved, single)
    assert_moved(ckpt["student"], single.student_module.state_dict())

    # and an FSDP run resumes from the single process's (unsharded) checkpoint
    shutil.copytree(tmp_path / "one", tmp_path / "back")
    saved = torchrun(tmp_path / "back", *overrides, *FSDP, "train.stop_at_iter=5", "--resume")
    single = run_single(tmp_path / "one", overrides + ["train.stop_at_iter=5"], resume="auto")
    assert single.iteration == 5
    assert_matches(saved, single)


def _last_layer_indices(trainer) -> set:
    """Indices (torch's optimizer numbering) of the head's last-layer parameters."""
    last = {id(p) for p in trainer.params.last_layer}
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    return {i for i, p in enumerate(params) if id(p) in last}


def test_fsdp_bf16_close_to_one_process(tmp_path):
    """Under bf16, FSDP gathers the weights in bf16 (fsdp.py): the run stays within bf16
    rounding of one process under autocast, far closer than the training moved it."""
    overrides = COMMON + ["train.impl=fast", "train.precision=bf16"]
    saved = torchrun(tmp_path / "fsdp", *overrides, *FSDP)
    single = Trainer(build_config("demo", [f"train.output_dir={tmp_path / 'one'}",
                                           "train.batch_size=8", *overrides]))
    init = {k: v.clone() for k, v in single.student_module.state_dict().items()}
    single.close()
    single = run_single(tmp_path / "one", overrides)
    for part, net in (("teacher", single.teacher), ("student", single.student_module)):
        ours, theirs = saved[part], net.state_dict()
        diff = sum((ours[k] - v).abs().sum().item() for k, v in theirs.items())
        moved = sum((init[k] - v).abs().sum().item() for k, v in theirs.items())
        assert diff < 0.05 * moved, f"{part}: {diff:.3g} vs moved {moved:.3g}"
    torch.testing.assert_close(saved["center"], single.loss.center, rtol=0, atol=2e-3)


def test_the_training_command_under_torchrun(tmp_path):
    """`torchrun -m ibot_fast.train` itself, 4 processes as HSDP (2 x 2): it trains,
    logs, saves, flushes its last log line and exits 0 (dist.end); a new run from its
    checkpoint (model.init_from) under HSDP equals one process's; a shard size that does
    not divide the processes (found after the group exists) is a one-line error and exit
    code 2 on every process."""
    args = ["-m", "ibot_fast.train", "--preset", "demo", "--output-dir", str(tmp_path / "run"),
            *[o for o in COMMON if not o.startswith("train.stop_at")], "train.stop_at_iter=2",
            "train.batch_size=2", "train.impl=fast", *FSDP, "train.fsdp_shard_size=2"]
    proc = launch(4, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "4 process(es) (HSDP: 2 replicas of 2 shards)" in out
    assert "training stopped at epoch 0, iteration 2" in out
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    first = checkpoint.load(tmp_path / "run" / "checkpoint.pth")
    assert first["iteration"] == 2

    # a new HSDP run from that checkpoint's teacher (model.init_from), loaded before
    # sharding on every process (a replica that missed it would change the averaged
    # gradients): two steps equal one process's from the same file
    weights = f"model.init_from={tmp_path / 'run' / 'checkpoint.pth'}"
    init = [a.replace(str(tmp_path / "run"), str(tmp_path / "init")) for a in args]
    proc = launch(4, *init, weights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = checkpoint.load(tmp_path / "init" / "checkpoint.pth")
    assert second["iteration"] == 2
    overrides = [o for o in COMMON if not o.startswith("train.stop_at")]
    single = run_single(tmp_path / "one", overrides + ["train.impl=fast", "train.stop_at_iter=2",
                                                       weights])
    assert not torch.equal(single.teacher.state_dict()["backbone.pos_embed"],
                           first["teacher"]["backbone.pos_embed"])  # it trained
    assert_same_run({**second["loss"], "teacher": second["teacher"],
                     "student": second["student"]},
                    {"teacher": single.teacher.state_dict(),
                     "student": single.student_module.state_dict(),
                     "center": single.loss.center, "center2": single.loss.center2},
                    2 * single.sched.lr.max() * 2 + 1e-5)

    bad = [a.replace(str(tmp_path / "run"), str(tmp_path / "bad")) for a in args[:-1]]
    proc = launch(2, *bad, "train.fsdp_shard_size=3")
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ibot-fast: error")]
    assert errors == ["ibot-fast: error: train.fsdp_shard_size=3 must divide the 2 processes "
                      "(e.g. the processes per node), or be 0 for all of them"] * 2, proc.stderr
