"""Runs that survive (multi-process, real torchrun, gloo on CPU): a rank killed with SIGKILL at a chosen
point under ``--max-restarts``, a kill inside the checkpoint write, and a SIGTERM followed by a relaunch
all end with the same per-round eval losses and the same final adapter as an uninterrupted run.

The reference run moves both clients' cuts after round 1 (``split.schedule``), so every recovery
after round 1 also checks that resuming right after a move is exact.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import REPO, common_args, metrics, setup  # noqa: F401  (setup is a fixture)

TIMEOUT_S = 240  # below pytest-timeout's 300 s, so our own kill of the job runs first


def launch(args: list[str], *, restarts: int = 0, fault: str | None = None, sigterm_after_round: int = 0):
    """torchrun with 1 server + 2 clients; optionally SIGTERM the whole job (as Slurm does) once
    metrics.jsonl holds ``sigterm_after_round`` rounds."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
        f"--max-restarts={restarts}", "--monitor-interval=0.5", "-m", "launch.train", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SPLITFT_FAULT", None)
    if fault:
        env["SPLITFT_FAULT"] = fault
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    out_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    try:
        if sigterm_after_round:
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None:
                path = out_dir / "metrics.jsonl"
                if path.is_file() and len(path.read_text().splitlines()) >= sigterm_after_round:
                    time.sleep(0.3)  # into the next round's steps
                    os.killpg(proc.pid, signal.SIGTERM)
                    break
                time.sleep(0.2)
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{out[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing may outlive the test
        except ProcessLookupError:
            pass
    return proc.returncode, out


SETTINGS = [
    "split.cut_layers=[1,3]",
    "split.schedule={1: [3, 1]}",
    "train.rounds=3",
    "train.local_steps=4",
    "runtime.peer_timeout_s=20",
]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    code, log = launch([*common_args(setup, out), *SETTINGS])
    assert code == 0, log[-4000:]
    return out


def assert_same_run(out: Path, ref: Path) -> None:
    ours, theirs = metrics(out), metrics(ref)
    assert [r["round"] for r in ours] == [1, 2, 3]
    assert [r["cut_layers"] for r in ours] == [r["cut_layers"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5, (a["round"], a["eval_loss"], b["eval_loss"])
        for rank in a["clients"]:
            steps = zip(a["clients"][rank]["step_losses"], b["clients"][rank]["step_losses"])
            assert max(abs(x - y) for x, y in steps) < 1e-5
    mine = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ref_adapter = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert mine.keys() == ref_adapter.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], ref_adapter[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "fault, resumed_after",
    [
        ("step@2:2:2", 1),  # client 2, round 2 (right after the move), after its 2nd step
        ("step@0:3:3", 2),  # the server, round 3, while serving a 3rd forward
        # rank 0 between the adapter and the state of round 2's checkpoint, on the writing thread (round 3
        # may have started): round 1's checkpoint is the newest complete one
        ("checkpoint@0:2", 1),
    ],
)
def test_a_killed_rank_is_recovered_by_torchrun_restarts(setup, reference, tmp_path, fault, resumed_after):
    out = tmp_path / "run"
    code, log = launch([*common_args(setup, out), *SETTINGS], restarts=2, fault=fault)
    assert code == 0, log[-6000:]
    assert "SPLITFT_FAULT: killing rank" in log
    assert f"resuming after round {resumed_after} " in log
    assert_same_run(out, reference)


def test_sigterm_stops_the_job_and_a_relaunch_continues_exactly(setup, reference, tmp_path):
    out = tmp_path / "run"
    # Slowed clients (simulate.* is not part of the run's fingerprint) so that the signal lands mid-round.
    code, log = launch([*common_args(setup, out), *SETTINGS, "simulate.slowdown=8"], sigterm_after_round=1)
    assert code != 0, log[-4000:]
    assert "SIGTERM received" in log and "launch the same command again" in log, log[-4000:]
    done = len(metrics(out))
    assert 1 <= done < 3, log[-4000:]
    code, log = launch([*common_args(setup, out), *SETTINGS])
    assert code == 0, log[-4000:]
    assert f"resuming after round {done}" in log
    assert_same_run(out, reference)


def test_without_restarts_a_lost_client_is_named_with_the_way_to_continue(setup, tmp_path):
    out = tmp_path / "run"
    code, log = launch([*common_args(setup, out), *SETTINGS], fault="step@1:2:1")
    assert code != 0
    assert "lost rank 1 (client1)" in log and "launch the same command again" in log, log[-4000:]
    assert json.loads((out / "checkpoint" / "round-000001" / "state.json").read_text())["round"] == 1


def test_a_silent_client_is_noticed_within_the_peer_timeout(setup, tmp_path):
    """SIGSTOP: the client's connections stay open, so no collective fails; the server's heartbeat
    watch names it after runtime.peer_timeout_s, although a round may take a day (round_timeout_s)."""
    out = tmp_path / "run"
    args = [*common_args(setup, out), *SETTINGS, "runtime.peer_timeout_s=10"]
    os.environ["SPLITFT_FAULT_SIGNAL"] = "STOP"
    try:
        code, log = launch(args, fault="step@1:2:1")
    finally:
        del os.environ["SPLITFT_FAULT_SIGNAL"]
    assert code != 0
    assert "sending SIGSTOP to rank 1" in log
    assert "lost rank 1 (client1): no heartbeat for" in log, log[-4000:]
    named_after = _stamp(log, "lost rank 1 (client1)") - _stamp(log, "sending SIGSTOP to rank 1")
    assert 0 < named_after < 60, named_after  # the peer timeout, not the 24 h round timeout


def _stamp(log: str, text: str) -> float:
    """Seconds of the day of the first log line holding ``text`` (lines open with ``HH:MM:SS.mmm``)."""
    line = next(line for line in log.splitlines() if text in line)
    hh, mm, ss = re.search(r"(\d\d):(\d\d):(\d\d\.\d\d\d) \[rank", line).groups()
    return int(hh) * 3600 + int(mm) * 60 + float(ss)


def test_a_stuck_rank_is_named_and_the_restarted_run_ends_exactly(setup, reference, tmp_path):
    """hang@1:2: client 1's main thread blocks as round 2's training starts while its heartbeat beats on
    (so the peer timeout never fires). No rank makes progress; every rank names client 1 and where it
    was, and exits 77; torchrun restarts the job, which resumes after round 1 and ends as the reference."""
    out = tmp_path / "run"
    args = [*common_args(setup, out), *SETTINGS, "runtime.stall_timeout_s=10"]
    code, log = launch(args, restarts=1, fault="hang@1:2")
    assert code == 0, log[-6000:]
    assert "SPLITFT_FAULT: blocking rank 1's main thread at hang, round 2" in log, log[-6000:]
    assert "furthest behind: rank 1 (client1) at round 2, training, outside any collective" in log, log[
        -6000:
    ]
    assert "no heartbeat" not in log  # it was alive: a stall, not a lost peer
    named_after = _stamp(log, "stalled: no rank made progress") - _stamp(log, "SPLITFT_FAULT: blocking")
    assert 0 < named_after < 120, named_after
    assert "resuming after round 1 " in log
    assert_same_run(out, reference)


def test_a_rank_that_never_joins_is_named_and_the_restart_is_one_attempt(setup, reference, tmp_path):
    """startup@2: client 2 blocks before it joins the first attempt's rendezvous. Rank 0 names it after
    runtime.join_timeout_s; the restarted attempt, whose first arrivals would have completed the first
    attempt's count, joins as one and runs the whole job exactly."""
    out = tmp_path / "run"
    args = [*common_args(setup, out), *SETTINGS, "runtime.join_timeout_s=20"]
    code, log = launch(args, restarts=1, fault="startup@2")
    assert code == 0, log[-6000:]
    assert "SPLITFT_FAULT: blocking rank 2's main thread at startup" in log, log[-6000:]
    assert "rank 2 (client2) did not arrive within runtime.join_timeout_s=20s" in log, log[-6000:]
    assert_same_run(out, reference)


def test_an_out_of_memory_is_named_once_and_not_retried(setup, tmp_path):
    """oom@1:1:2 raises MemoryError in client 1's second step on every attempt, as a real one would. The
    first attempt names the rank, its cut and the fix and records the failure; torchrun's two restarts
    stop at start-up with the same line instead of training into it again. A relaunch by hand (a new
    torchrun job, here with the fault gone: the fixed config) is not refused."""
    out = tmp_path / "run"
    args = [*common_args(setup, out), *SETTINGS]
    code, log = launch(args, restarts=2, fault="oom@1:1:2")
    assert code != 0, log[-6000:]
    line = (
        "memory error: out of memory on rank 1 (client1, cut 1): injected by SPLITFT_FAULT at round 1, step 2"
    )
    assert line in log and "lower its cut (split.cut_layers" in log, log[-6000:]
    assert log.count("SPLITFT_FAULT: raising MemoryError") == 1, log[-6000:]  # trained into it once
    repeated = [x for x in log.splitlines() if x.startswith(line) and x.endswith("not run again)")]
    assert len(repeated) == 2, log[-6000:]  # each restart said it and stopped
    assert "in train_round" not in log, log[-6000:]  # no worker traceback (torchrun prints its own)
    code, log = launch(args)
    assert code == 0, log[-6000:]
    assert not (out / ".splitft-failed.json").exists()
    assert [r["round"] for r in metrics(out)] == [1, 2, 3]
