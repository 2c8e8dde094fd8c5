"""SLURM: srun's variables -> torch.distributed's, host lists, the self-requeueing job
(ibot_fast/slurm.py), and the example batch script."""
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ibot_fast import checkpoint, slurm
from ibot_fast.train import Trainer, config_from_args, parse_args

from test_train import tiny_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("hostlist, hosts", [
    ("node01", ["node01"]),
    ("gpu[01-03,7],login-a", ["gpu01", "gpu02", "gpu03", "gpu7", "login-a"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("r[1-2]n[1-2]-ib", ["r1n1-ib", "r1n2-ib", "r2n1-ib", "r2n2-ib"]),
    ("x1,y[3],z", ["x1", "y3", "z"]),
])
def test_host_lists_expand_in_order(hostlist, hosts):
    assert slurm.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["", "n[3-1]", "n[1-2", "n1-2]", "n[a]", "a,,b", "n[1,]", "n[]"])
def test_unreadable_host_lists_are_refused(bad):
    with pytest.raises(ValueError, match="cannot read the SLURM host list"):
        slurm.expand_hostlist(bad)


SRUN = {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[03-08]", "SLURM_NTASKS": "48"}


def test_an_srun_task_gets_torchruns_variables():
    env = slurm.torchrun_env(SRUN)
    port = 15000 + 123456 * 101 % 15000
    assert env == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(port)}  # the step's hosts
    assert 15000 <= port < 30000  # below the ephemeral ports
    given = slurm.torchrun_env({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert given["MASTER_ADDR"] == "head" and given["MASTER_PORT"] == "29400"
    # a WORLD_SIZE the batch script exported is not torchrun's: srun's values win
    assert slurm.torchrun_env({**SRUN, "WORLD_SIZE": "48"})["WORLD_SIZE"] == "16"


def test_the_rendezvous_port_is_per_step_or_reserved():
    second_step = slurm.torchrun_env({**SRUN, "SLURM_STEP_ID": "1"})["MASTER_PORT"]
    assert second_step != slurm.torchrun_env(SRUN)["MASTER_PORT"]
    reserved = {**SRUN, "SLURM_STEP_RESV_PORTS": "12000-12015"}
    assert slurm.torchrun_env(reserved)["MASTER_PORT"] == "12000"


def test_torchrun_and_batch_shells_are_left_alone():
    assert slurm.torchrun_env({**SRUN, "RANK": "3", "WORLD_SIZE": "8"}) == {}  # srun torchrun
    batch_shell = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    assert slurm.torchrun_env(batch_shell) == {}  # plain python in the batch script
    assert slurm.torchrun_env({}) == {}


def test_processes_sharing_a_gpu_are_found():
    from ibot_fast.dist import shared_devices

    held = [("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a"), ("n1", "GPU-a")]
    assert shared_devices(held) == [(("n1", "GPU-a"), [0, 3])]
    assert shared_devices(held[:3]) == []


def test_dataloader_workers_survive_the_signals_slurm_sends():
    """SLURM signals every process of the step, the DataLoader workers too; by default
    USR1/USR2 would kill them."""
    code = ("import os, signal\n"
            "from ibot_fast.data import _ignore_signals\n"
            "_ignore_signals(0)\n"
            "for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):\n"
            "    os.kill(os.getpid(), sig)\n"
            "print('alive')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout == "alive\n", proc.stderr


def test_the_requeue_calls_scontrol_for_the_job(tmp_path, monkeypatch, caplog):
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit ${{FAKE_RC:-0}}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    for key in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert not slurm.requeue()  # outside a job: nothing to requeue
    assert not calls.exists()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert slurm.requeue()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm.requeue()
    assert calls.read_text().splitlines() == ["requeue 77", "requeue 70_3"]
    monkeypatch.setenv("FAKE_RC", "1")
    assert not slurm.requeue()
    assert "scontrol requeue 70_3 failed" in caplog.text
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert not slurm.requeue()
    assert "could not requeue SLURM job 70_3" in caplog.text


@pytest.mark.parametrize("signals, status, at", [
    ((signal.SIGUSR2,), "requeued", 1),
    ((signal.SIGUSR2, signal.SIGTERM), "preempted", 1),  # scancel after the warning
    ((signal.SIGUSR2,), "requeued", 2),  # the epoch's last batch
])
def test_the_time_limit_signal_saves_and_stops(tmp_path, signals, status, at):
    """SIGUSR2 stops the run with a checkpoint and the status the command requeues on;
    SIGTERM wins over it. On an epoch's last batch the epoch's end (its kept checkpoint
    copy) comes first, the checkpoint is written once, and the epoch's k-NN is skipped
    (pre-emption leaves little time)."""
    trainer = Trainer(tiny_config(tmp_path, "train.keep_every=1", "eval.knn_every=1"))
    real_step, real_save, saved = trainer.train_step, trainer.save, []  # 3 batches/epoch
    trainer.evaluate_knn = lambda: saved.append("knn")

    def step_then_signal(batch, it, epoch):
        out = real_step(batch, it, epoch)
        if it == at:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return out

    trainer.train_step = step_then_signal
    trainer.save = lambda also=None: (saved.append(trainer.iteration), real_save(also))
    result = trainer.run()
    assert result["status"] == status and result["iteration"] == at + 1
    assert saved == [at + 1]  # no "knn"
    ckpt = checkpoint.load(tmp_path / "checkpoint.pth")
    assert (ckpt["iteration"], ckpt["epoch"]) == (at + 1, 1 if at == 2 else 0)
    assert (tmp_path / "checkpoint0001.pth").exists() == (at == 2)
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # handler given back


def test_the_command_requeues_after_the_trainer_and_says_when_it_could_not(
        tmp_path, monkeypatch):
    """slurm.requeue_job: SIGTERM ignored from then on (scontrol requeue sends it to
    every task), then `scontrol requeue`; False when scontrol refused. Outside a SLURM
    job there is nothing to requeue: True, and SIGTERM is left alone."""
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Requeue of job is not allowed' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    for key in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    assert slurm.requeue_job() is True  # SIGUSR2 by hand, no job: a clean, saved stop
    assert signal.getsignal(signal.SIGTERM) == previous
    monkeypatch.setenv("SLURM_JOB_ID", "88")
    try:
        assert slurm.requeue_job() is False
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_port_for_a_job() -> tuple:
    """A free port in the range slurm.py derives ports from, and a job id (step 0) that
    maps to it."""
    for _ in range(200):
        job = random.randrange(10**6)
        port = slurm.rendezvous_port({"SLURM_JOB_ID": str(job)})
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
        return port, job
    pytest.skip("no free port in the SLURM port range")


def test_two_srun_tasks_train_and_requeue_at_the_time_limit(tmp_path):
    """Two processes started the way srun starts them (no torchrun: only SLURM's
    variables) find each other at the port derived from the job id and train. SIGUSR2,
    sent to one process and its DataLoader worker (its process group, as SLURM signals
    the whole step), makes both save, rank 0 call `scontrol requeue <job>` once (which,
    like SLURM's, sends SIGTERM to both), and both exit 0."""
    port, job = free_port_for_a_job()
    calls = tmp_path / "calls"
    out = tmp_path / "run"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    # as SLURM does when it requeues a running job: SIGTERM to every task
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\npkill -TERM -f -- "--output-dir {out} "\n')
    fake.chmod(0o755)
    args = [sys.executable, "-m", "ibot_fast.train", "--preset", "demo", "--output-dir",
            str(out), "--resume", "data.source=synthetic", "data.synthetic_size=400",
            "data.num_workers=1", "data.n_local=2", "train.batch_size=4", "train.device=cpu",
            "train.log_every=1", "train.stop_at_iter=60", "model.out_dim=128",
            "model.patch_out_dim=128", "model.head_hidden_dim=64",
            "model.head_bottleneck_dim=32"]
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "MASTER_")) and
            k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                 "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
                 "SLURM_JOB_ID": str(job), "SLURM_STEP_NUM_TASKS": "2",
                 "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost"})
    procs = [subprocess.Popen(args, env={**base, "SLURM_PROCID": str(r),
                                         "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for r in (0, 1)]
    try:
        log = out / "log.jsonl"
        deadline = time.time() + 240
        while not (log.exists() and log.read_text().count("\n") >= 2):
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                "the run did not start: " + procs[0].communicate(timeout=30)[0][-3000:]
            time.sleep(0.2)
        os.killpg(procs[1].pid, signal.SIGUSR2)
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert f"started by srun: 2 processes, rendezvous at localhost:{port}" in outputs[0]
    assert "training requeued at epoch" in outputs[0]
    assert calls.read_text().splitlines() == [f"requeue {job}"]
    saved = checkpoint.load(out / "checkpoint.pth")["iteration"]
    assert 2 <= saved < 60


def test_the_example_batch_script_runs_the_trainer(tmp_path):
    """examples/slurm_train.sbatch, run by bash with a stand-in `srun` that records its
    command: the trainer command it builds parses, and its config (preset, data, output
    folder, overrides passed through) is valid."""
    record = tmp_path / "srun_args"
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "DATA": "/data/mine",
           "PRESET": "vit_small_16_paper", "SLURM_JOB_NAME": "ibot", "SLURM_JOB_ID": "5",
           "SLURM_CPUS_PER_TASK": "12", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "slurm_train.sbatch"),
                           "train.parallel=fsdp", "train.fsdp_shard_size=8"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().splitlines()
    srun_opts, command = argv[:argv.index("python")], argv[argv.index("python"):]
    assert srun_opts == ["--kill-on-bad-exit=1", "--cpus-per-task=12"]
    assert command[:3] == ["python", "-m", "ibot_fast.train"]
    args = parse_args(command[3:])
    assert args.resume == "auto"
    cfg = config_from_args(args)
    assert (cfg.data.path, cfg.train.output_dir) == ("/data/mine",
                                                     "runs/ibot-vit_small_16_paper-5")
    assert (cfg.data.num_workers, cfg.train.parallel, cfg.train.fsdp_shard_size) == (10, "fsdp", 8)
    assert cfg.train.epochs == 800  # the preset
    header = (ROOT / "examples" / "slurm_train.sbatch").read_text()
    assert "#SBATCH --signal=USR2@" in header and "#SBATCH --requeue" in header
