"""SLURM without torchrun: one `srun` task per GPU, and a job that requeues itself.

    #SBATCH --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --signal=USR2@300 --requeue
    srun python -m ibot_fast.train --preset vit_base_16_paper --data /data/x \\
        --output-dir runs/vitb16 --resume

`srun` starts every process itself, so there is no torchrun to set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT: `torchrun_env` derives them from the step's
SLURM variables. The rendezvous host is the first host of the step's node list, where
srun's block and cyclic distributions put task 0 (with `--distribution=arbitrary` or a
host file, set MASTER_ADDR); the port is the step's reserved one, or derived from the job
and step ids, so every task computes the same one. A process that torchrun started
(RANK set) is left to torchrun, and a plain `python` inside a batch script (no step
variables) is a single process.

Time limits: `--signal=USR2@300` makes SLURM send SIGUSR2 to every task 300 s before the
limit; the trainer saves a checkpoint at the next step boundary where all processes
agree, then rank 0 calls `scontrol requeue` on the job and every process exits 0 (1 on
rank 0 when the job could not be requeued). The job then waits in the queue and its
next start (`--resume`) continues the run. SIGTERM (`scancel`, pre-emption) saves and
exits without requeueing; SLURM waits only KillWait (30 s by default) before SIGKILL,
which may be too short to reach the next logging step, so time limits should use the
early SIGUSR2.
"""
import logging
import os
import re
import signal
import subprocess

log = logging.getLogger("ibot_fast")

PORT_BASE, PORT_SPAN = 15000, 15000  # below Linux's ephemeral ports (32768 and up)


def expand_hostlist(hostlist: str) -> list:
    """SLURM's compact host list, in order: "gpu[01-03,7],login-a" -> gpu01, gpu02, gpu03,
    gpu7, login-a. Ranges keep their zero padding; several bracket groups in one name
    expand to their product ("r[1-2]n[1-2]" -> r1n1, r1n2, r2n1, r2n2)."""
    hosts = []
    for name in _split_top_level(hostlist.strip()):
        expanded = [""]
        for m in re.finditer(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", name):
            literal, ranges = m.group(1), m.group(2)
            if not literal and ranges is None:
                continue
            choices = [""] if ranges is None else _expand_ranges(ranges, hostlist)
            expanded = [head + literal + c for head in expanded for c in choices]
        hosts.extend(expanded)
    if not hosts or any(not h for h in hosts):
        raise ValueError(f"cannot read the SLURM host list {hostlist!r}")
    return hosts


def _split_top_level(hostlist: str) -> list:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"cannot read the SLURM host list {hostlist!r}")
        if ch == "," and depth == 0:
            parts.append(hostlist[start:i])
            start = i + 1
    parts.append(hostlist[start:])
    if depth != 0 or any(not p for p in parts):
        raise ValueError(f"cannot read the SLURM host list {hostlist!r}")
    return parts


def _expand_ranges(ranges: str, hostlist: str) -> list:
    out = []
    for item in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"cannot read the SLURM host list {hostlist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def is_srun_step(environ=None) -> bool:
    """Started by `srun` (a job step's task), not by torchrun (which sets RANK; a
    WORLD_SIZE exported by the batch script alone does not count)."""
    env = os.environ if environ is None else environ
    return "RANK" not in env and "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env


def torchrun_env(environ=None) -> dict:
    """The variables torchrun would have set, for a process of an `srun` step ({} when
    the process was not started by srun). MASTER_ADDR / MASTER_PORT already in the
    environment win."""
    env = os.environ if environ is None else environ
    if not is_srun_step(env):
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" not in env and not nodelist:
        raise ValueError("an srun step without SLURM_STEP_NODELIST: set MASTER_ADDR")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(rendezvous_port(env)),
    }


def rendezvous_port(env) -> int:
    """A port every task of the step computes alike: the first port SLURM reserved for
    the step (`srun --resv-ports`) when there is one, else one derived from the job and
    step ids (two steps of one job running side by side get different ports)."""
    reserved = env.get("SLURM_STEP_RESV_PORTS", "")
    if re.match(r"\d+", reserved):
        return int(re.match(r"\d+", reserved).group())
    job = int(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or 0)
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "0"
    step = int(step) if step.isdigit() else 0
    return PORT_BASE + (job * 101 + step) % PORT_SPAN


def job_id():
    """The job to requeue (None outside SLURM). An array task is requeued by its own id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")


def requeue_job() -> bool:
    """The training command's last act after SIGUSR2, once the checkpoint is written and
    the trainer closed, on every process: rank 0 requeues the job. `scontrol requeue`
    sends SIGTERM to every task of the job; they are leaving anyway, so they ignore it
    (after the barrier: all are past their last collective) and exit 0. False on rank 0
    when the job could not be requeued; outside a SLURM job there is nothing to do."""
    from . import dist

    if job_id() is None:  # SIGUSR2 sent by hand: a saved, clean stop
        if dist.is_main():
            log.warning("SIGUSR2 outside a SLURM job: the checkpoint is saved, no job to "
                        "requeue")
        return True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the process ends right after
    dist.barrier()
    return requeue() if dist.is_main() else True


def requeue() -> bool:
    """Put this job back in the queue (`scontrol requeue`); True when scontrol accepted."""
    job = job_id()
    if job is None:
        log.warning("SIGUSR2 outside a SLURM job: the checkpoint is saved, nothing requeued")
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("could not requeue SLURM job %s (%s): resubmit it with --resume", job, e)
        return False
    if done.returncode != 0:
        log.error("scontrol requeue %s failed (%s): resubmit it with --resume (is the job "
                  "submitted with --requeue?)", job, (done.stderr or done.stdout).strip())
        return False
    log.info("SLURM job %s requeued: its next start continues from the checkpoint", job)
    return True
