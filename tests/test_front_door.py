"""The front door (``python -m launch.run``): a bad input is one line before any process starts; a job
runs through torchrun's launcher in-process; a failed job is one line with the root cause and its code.

The real launches are small (a 4-layer random Llama, one client, a few steps), each with a timeout and
its own session that is killed on timeout, so no process outlives the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from launch import run as front
from launch.train import user_error
from runtime.config import ConfigError
from runtime.faults import EXIT_PEER_LOST, EXIT_USER_ERROR
from tests.test_distributed import REPO, common_args, metrics, setup  # noqa: F401  (setup is a fixture)

LAUNCH_TIMEOUT_S = 240
BANNER = ("Traceback", "FAILED", "Root Cause", "=====", "torchelastic", "exitcode")


def front_door(
    args: list[str], timeout_s: float = LAUNCH_TIMEOUT_S, **env: str
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.run", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"launch.run timed out after {timeout_s}s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        try:  # the workers are in the front door's session: none may be left
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_bad_config_is_one_line_naming_the_field(tmp_path):
    start = time.monotonic()
    res = front_door(
        [
            "torchrun_configs/tiny_cpu.yaml",
            "train.lr=-1",
            f"output_dir={tmp_path / 'out'}",
            "--nproc-per-node",
            "5",
        ],
        timeout_s=120,
        SPLITFT_CACHE=str(tmp_path / "cache"),  # nothing builds the built-in model
    )
    assert res.returncode == EXIT_USER_ERROR
    assert lines(res.stderr) == ["config error: train.lr=-1.0: must be > 0"], res.stderr
    assert res.stdout == ""
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out").exists()


def test_bad_input_starts_no_worker(monkeypatch, tmp_path, capsys):
    """In-process: torchrun's launcher is never reached (so no process group, no worker)."""
    import torch.distributed.run

    def no_launch(args):
        raise AssertionError("the launcher was started")

    monkeypatch.setattr(torch.distributed.run, "run", no_launch)
    monkeypatch.setenv("SPLITFT_CACHE", str(tmp_path / "cache"))  # nothing builds the built-in model
    cfg = ["torchrun_configs/tiny_cpu.yaml", f"output_dir={tmp_path / 'out'}"]
    for argv, expected in [
        ([*cfg, "train.lr=-1", "--nproc-per-node=5"], "train.lr=-1.0"),
        ([*cfg, f"model.path={tmp_path}", "--nproc-per-node=2"], "config.json"),
        ([*cfg, "--nproc-per-node", "1"], "WORLD_SIZE=1"),
        ([*cfg, "--nproc=2"], "full name"),
        ([*cfg, "-m", "other", "--nproc-per-node=2"], "always runs -m launch.train"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            front.main(argv)
        assert exit_info.value.code == EXIT_USER_ERROR, argv
        err = lines(capsys.readouterr().err)
        assert len(err) == 1 and expected in err[0], (argv, err)


def test_torchrun_options_are_passed_through():
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    argv = [
        "cfg.yaml",
        "train.lr=-1",
        "--nnodes=2",
        "--nproc-per-node",
        "4",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint=head:29500",
        "--standalone",
        "--max-restarts",
        "3",
        "split.cut_layers=[1,2]",
    ]
    options, rest = front.split_argv(argv, parser)
    assert rest == ["cfg.yaml", "train.lr=-1", "split.cut_layers=[1,2]"]
    args = parser.parse_args([*options, "-m", "launch.train", *rest])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint) == (
        "2",
        "4",
        "c10d",
        "head:29500",
    )
    assert (args.standalone, args.max_restarts, args.module, args.training_script) == (
        True,
        3,
        True,
        "launch.train",
    )
    assert args.training_script_args == rest


def test_root_cause_is_the_first_real_failure(tmp_path, monkeypatch):
    """A rank's user error (its error file) beats a peer that stopped because it went away."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv(front.FRONT_DOOR_ENV, "1")
    user_error("plan", ConfigError("no cut fits client 2"), say=True)
    failures = {
        0: ProcessFailure(local_rank=0, pid=10, exitcode=EXIT_PEER_LOST, error_file=str(tmp_path / "none")),
        2: ProcessFailure(local_rank=2, pid=12, exitcode=EXIT_USER_ERROR, error_file=str(error_file)),
        3: ProcessFailure(local_rank=3, pid=13, exitcode=-9, error_file=str(tmp_path / "none")),
    }
    failures[0].timestamp = failures[2].timestamp - 5  # the peer-lost rank exits first
    failures[3].timestamp = failures[2].timestamp + 1
    assert front.root_cause(failures) == (2, EXIT_USER_ERROR, "plan error: no cut fits client 2")
    assert front.root_cause({3: failures[3]}) == (3, -9, "killed by SIGKILL")
    assert front.exit_code(-9) == 1 and front.exit_code(EXIT_PEER_LOST) == EXIT_PEER_LOST
    assert json.loads(error_file.read_text())["message"]["message"] == "plan error: no cut fits client 2"


def test_a_small_job_runs_through_the_front_door(setup, tmp_path):
    out = tmp_path / "run"
    args = [*common_args(setup, out), "split.cut_layers=2", "train.rounds=1", "train.local_steps=2"]
    res = front_door([*args, "--nproc-per-node", "2"])
    assert res.returncode == 0, res.stderr[-4000:]
    assert [r["round"] for r in metrics(out)] == [1]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not any(word in res.stderr for word in BANNER), res.stderr[-4000:]


def test_a_failed_job_is_one_line_with_its_root_cause(setup, tmp_path):
    """The client is killed at its first step: the last line names it and its signal, exit code 1, and
    none of torchrun's banner is printed."""
    out = tmp_path / "run"
    args = [*common_args(setup, out), "split.cut_layers=2", "train.rounds=1", "train.local_steps=4"]
    res = front_door([*args, "--nproc-per-node=2"], SPLITFT_FAULT="step@1:1:1")
    assert res.returncode == 1, res.stderr[-4000:]
    err = lines(res.stderr)
    assert err[-1].startswith("launch.run: rank 1 failed with exit code -9: killed by SIGKILL"), err[-5:]
    assert sum("launch.run:" in line for line in err) == 1, err
    assert not any(word in res.stderr for word in BANNER), res.stderr[-4000:]
