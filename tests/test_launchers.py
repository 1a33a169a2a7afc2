"""The launchers for real: torchrun across two "nodes", and the sbatch scripts under a real Slurm.

- Two torchrun agents on this host (``--nnodes=2``, c10d rendezvous) compute exactly what one
  ``--standalone`` agent with the same world size computes.
- ``tests/slurm_cluster.py`` installs (apt, if needed) and starts a Slurm cluster for the session:
  two slurmd "nodes" on this host. The batch scripts run the tiny config as real jobs (the
  multinode one across both nodes); a job that gets the time-limit warning (SIGUSR1) requeues
  itself and finishes the run from its last complete round, and a cancelled one stays cancelled.

Every launch gets free ports, a timeout, and its own process group that is killed on timeout;
the Slurm daemons are stopped (after cancelling every job) when the session ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, free_port, wait_for
from tests.test_distributed import common_args, setup  # noqa: F401  (setup is a fixture)

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 240
JOB_TIMEOUT_S = 300


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Starts ``cmd`` in its own session (so a timeout can kill all of it), output to ``log``."""
    with log.open("w") as f:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout_s: float = LAUNCH_TIMEOUT_S) -> list[int]:
    """Waits for every process; on timeout kills all their process groups and fails with the logs."""
    deadline = time.monotonic() + timeout_s
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        pytest.fail(f"timed out after {timeout_s}s:\n" + "\n".join(tail(log) for log in logs))


def tail(path: Path, n: int = 4000) -> str:
    try:
        return f"--- {path.name}:\n{path.read_text(errors='replace')[-n:]}"
    except OSError:
        return f"--- {path.name}: (none)"


def torchrun(args: list[str], *launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "launch.train", *args]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Same rounds, per-round eval loss, per-client step losses and exported adapter."""
    ma, mb = metrics(a), metrics(b)
    assert [r["round"] for r in ma] == [r["round"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert abs(ra["eval_loss"] - rb["eval_loss"]) < atol, (ra["round"], ra["eval_loss"], rb["eval_loss"])
        assert ra["clients"].keys() == rb["clients"].keys()
        for rank, ca in ra["clients"].items():
            la, lb = ca["step_losses"], rb["clients"][rank]["step_losses"]
            assert len(la) == len(lb) > 0
            assert max(abs(x - y) for x, y in zip(la, lb)) < atol, (ra["round"], rank, la, lb)
    ours = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], ref[key], atol=atol, rtol=0)


def test_two_agents_match_one_standalone_agent(setup, tmp_path):
    """2 agents x 2 workers (c10d rendezvous on 127.0.0.1) == 1 agent x 4 workers: server + 3 clients."""
    settings = ["split.cut_layers=[1,2,3]", "train.rounds=2", "train.local_steps=4"]
    port = free_port()
    multi = tmp_path / "multi"
    procs, logs = [], []
    for node_rank in (0, 1):
        launcher = (
            "--nnodes=2",
            f"--node_rank={node_rank}",
            "--nproc_per_node=2",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=two-agents",
            "--local_addr=127.0.0.1",
            "--max-restarts=0",
        )
        logs.append(tmp_path / f"agent{node_rank}.log")
        procs.append(start(torchrun([*common_args(setup, multi), *settings], *launcher), logs[-1]))
    codes = finish(procs, logs)
    assert codes == [0, 0], "\n".join(tail(log) for log in logs)

    single = tmp_path / "single"
    logs = [tmp_path / "standalone.log"]
    launcher = ("--standalone", "--nproc_per_node=4")
    codes = finish([start(torchrun([*common_args(setup, single), *settings], *launcher), logs[0])], logs)
    assert codes == [0], tail(logs[0])

    assert [r["round"] for r in metrics(multi)] == [1, 2]
    assert metrics(multi)[0]["cut_layers"] == {"1": 1, "2": 2, "3": 3}
    assert_same_run(multi, single)


# ---- under Slurm ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A two-node Slurm cluster on this host for the session (installed with apt if missing)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("the Slurm tests install and start slurmctld/slurmd/munged, which needs root on Linux")
    try:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2).start()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


def sbatch(cluster: SlurmCluster, script: str, args: list[str], log: Path, nproc: int, *opts: str) -> str:
    """Submits ``launch/<script> args`` from the repository root; returns the job id."""
    res = cluster.run(
        "sbatch",
        "--parsable",
        f"--output={log}",
        f"--chdir={REPO}",
        *opts,
        f"launch/{script}",
        *args,
        env={**cluster.env, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": str(nproc), "PYTHON": sys.executable},
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_job(cluster: SlurmCluster, job: str, log: Path, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Polls ``scontrol show job`` until the job is in a final state (a requeued one is PENDING again)."""

    def done():
        info = cluster.job(job)
        return info if info.get("JobState") in FINAL else None

    try:
        return wait_for(f"job {job} to finish", done, timeout_s, interval_s=0.5)
    except TimeoutError as e:
        cluster.run("scancel", job)
        pytest.fail(f"{e}\n{cluster.job(job)}\n{tail(log)}\n{cluster.logs()}")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # includes installing Slurm on a fresh machine
def test_sbatch_single_node(slurm, setup, tmp_path):
    """A real batch job on one node: a server and 2 clients, 3 rounds."""
    out, log = tmp_path / "out", tmp_path / "job.out"
    args = [*common_args(setup, out), "split.cut_layers=[1,2]", "train.rounds=3", "train.local_steps=4"]
    info = wait_job(slurm, sbatch(slurm, "slurm_single_node.sbatch", args, log, 3), log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{tail(log)}"
    assert info["Restarts"] == "0"
    assert [r["round"] for r in metrics(out)] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sbatch_two_nodes(slurm, setup, tmp_path):
    """srun starts one torchrun per node, they meet at the first node (c10d): 2 x 2 processes, the
    server and 3 clients, 2 rounds."""
    out, log = tmp_path / "out", tmp_path / "job.out"
    args = [*common_args(setup, out), "split.cut_layers=[1,2,3]", "train.rounds=2", "train.local_steps=4"]
    job = sbatch(slurm, "slurm_multinode.sbatch", args, log, 2, "--nodes=2")
    info = wait_job(slurm, job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{tail(log)}"
    assert info["NodeList"] == slurm.run("scontrol", "show", "hostlist", ",".join(slurm.nodes)).stdout.strip()
    for node in slurm.nodes:  # each node's slurmd started the srun task (a torchrun agent)
        assert f"launch task StepId={job}.0 " in (slurm.root / "log" / f"slurmd-{node}.log").read_text()
    records = metrics(out)
    assert [r["round"] for r in records] == [1, 2]
    assert records[0]["cut_layers"] == {"1": 1, "2": 2, "3": 3}


FAKE_TORCHRUN = """#!/bin/bash
# Stands in for python -m launch.run: the batch script's signal and requeue logic alone.
echo "fake torchrun: restart ${SLURM_RESTART_COUNT:-0}: $*"
trap 'echo "fake torchrun: SIGTERM"; exit 75' TERM
trap 'echo "fake torchrun: SIGUSR1"; exit 75' USR1
[[ ${SLURM_RESTART_COUNT:-0} -ge 1 ]] && exit 0
sleep 600 &
wait
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("how", ["usr1", "scancel"])
def test_batch_script_requeues_on_usr1_not_on_cancel(slurm, tmp_path, how):
    """USR1 (the time-limit warning) is passed on and the job requeues itself; `scancel` (TERM to
    everything) is passed on too, but a cancelled job stays cancelled."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_TORCHRUN)
    fake.chmod(0o755)
    log = tmp_path / "job.out"
    res = slurm.run(
        "sbatch",
        "--parsable",
        f"--output={log}",
        f"--chdir={REPO}",
        "launch/slurm_single_node.sbatch",
        "some.yaml",
        "train.rounds=2",
        env={**slurm.env, "PYTHON": str(fake)},
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    wait_for("the fake torchrun to start", lambda: log.is_file() and "restart 0" in log.read_text(), 60)
    signal_cmd = ["--signal=USR1", "--batch"] if how == "usr1" else []
    assert slurm.run("scancel", *signal_cmd, job).returncode == 0
    info = wait_job(slurm, job, log)
    text = log.read_text()
    assert "-m launch.run some.yaml train.rounds=2 --standalone" in text
    if how == "usr1":
        assert "fake torchrun: SIGUSR1" in text and f"requeueing job {job}" in text, text
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    else:
        assert "fake torchrun: SIGTERM" in text and "requeueing" not in text, text
        assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_preempted_job_requeues_and_resumes(slurm, setup, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit): the workers
    stop at a step boundary, the job requeues itself, and the relaunch (runtime.resume=auto) finishes
    the run from the last complete round: every round once, the same losses as a run never stopped."""
    rounds = 10
    settings = ["split.cut_layers=[1,2]", f"train.rounds={rounds}", "train.local_steps=8"]
    out, log = tmp_path / "out", tmp_path / "job.out"
    job = sbatch(slurm, "slurm_single_node.sbatch", [*common_args(setup, out), *settings], log, nproc=3)

    def first_round():
        info = slurm.job(job)
        if info.get("JobState") in FINAL:
            pytest.fail(f"job ended before it could be preempted: {info}\n{tail(log)}")
        return (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()

    wait_for("the first round's metrics", first_round, JOB_TIMEOUT_S, interval_s=0.2)
    res = slurm.run("scancel", "--signal=USR1", "--batch", job)
    assert res.returncode == 0, res.stderr
    signalled_after = (out / "metrics.jsonl").read_text().count("\n")  # rounds complete by then

    info = wait_job(slurm, job, log)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{tail(log)}"
    assert info["Restarts"] == "1", f"the job was not requeued: {info}\n{tail(log)}"
    assert f"requeueing job {job}" in text
    assert signalled_after < rounds

    ref, ref_log = tmp_path / "ref", tmp_path / "ref.log"
    launcher = ("--standalone", "--nproc_per_node=3")
    codes = finish([start(torchrun([*common_args(setup, ref), *settings], *launcher), ref_log)], [ref_log])
    assert codes == [0], tail(ref_log)

    resumed, uninterrupted = metrics(out), metrics(ref)
    assert [r["round"] for r in resumed] == list(range(1, rounds + 1)), tail(log)
    for a, b in zip(resumed, uninterrupted):
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5, (a["round"], a["eval_loss"], b["eval_loss"])
