"""The ranks of a split run as processes of the test, on a ``TCPStore(port=0)`` the test holds: the
round protocol with real RPC, distributed autograd and gloo, without torchrun's agent.

Each rank is a process forked from a fork server that has imported the job's code once (``_context``).
It takes the test's environment and the one torchrun would give it (rank, world size, the store's
address, ``TORCHELASTIC_USE_AGENT_STORE``) and runs ``launch.train.main``, the entry point torchrun
runs. The store plays torchrun's agent store: the ranks rendezvous on it under a prefix of their
attempt (``runtime.dist``). Every rank has a timeout; none outlives the call.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Ranks:
    """The exit code and log of every rank."""

    codes: list[int | None]  # None: still running at the timeout (then killed)
    logs: list[str]

    @property
    def log(self) -> str:
        return "\n".join(f"--- rank {r}\n{text}" for r, text in enumerate(self.logs))


def _rank_main(
    rank: int, world_size: int, port: int, run_id: str, argv: list[str], log_path: str, env: dict[str, str]
) -> None:
    os.environ.clear()  # the test's environment now, as a spawned process would have it (not the fork
    os.environ.update(env)  # server's, taken when it started)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RUN_ID=run_id,
        OMP_NUM_THREADS="1",
    )
    for name in (
        "SPLITFT_FRONT_DOOR",
        "SPLITFT_FAULT",
        "TORCHELASTIC_ERROR_FILE",
        "TORCHELASTIC_RESTART_COUNT",
    ):
        os.environ.pop(name, None)  # what another test's launch left in this process's environment
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(REPO)  # where torchrun's launches in the tests run: config paths are relative to it
    sys.path.insert(0, str(REPO))
    from launch.train import main

    main(argv)


@functools.cache
def _context() -> mp.context.ForkServerContext:
    """A fork server that has imported ``launch.train`` (torch, transformers, peft: seconds of CPU a
    process) once, with one OpenMP thread as torchrun's ranks have; every rank forks from it. It
    imports and nothing more (no thread pool, no process group), so each rank starts as a spawned
    one would, without the import. It ends with the test session."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["launch.train"])
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by OpenMP when the fork server loads torch
    try:
        forkserver.ensure_running()
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = before
    return ctx


def run_ranks(world_size: int, argv: list[str], log_dir: Path, timeout_s: float = 240) -> Ranks:
    """Runs ``launch.train`` with ``argv`` on ``world_size`` ranks; returns when all have exited."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = _context()
    run_id = uuid.uuid4().hex
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"rank{r}.log" for r in range(world_size)]
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world_size, store.port, run_id, argv, str(logs[r]), dict(os.environ)),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    killed = set()
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        for r, p in enumerate(procs):
            if p.is_alive():
                killed.add(r)
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
    del store
    return Ranks(
        codes=[None if r in killed else p.exitcode for r, p in enumerate(procs)],
        logs=[path.read_text(errors="replace") if path.is_file() else "" for path in logs],
    )


def launch(n_procs: int, argv: list[str], timeout_s: float = 240) -> subprocess.CompletedProcess:
    """What ``torchrun --standalone --nproc_per_node=N -m launch.train ARGV`` returns for a run that needs
    no restart, from ``run_ranks``: exit code 0 when every rank ended with 0, else 1 (torchrun's), and
    the ranks' logs as its output."""
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        res = run_ranks(n_procs, argv, Path(logs), timeout_s)
    code = 0 if all(c == 0 for c in res.codes) else 1
    return subprocess.CompletedProcess(["launch.train", *argv], code, res.log, "")
