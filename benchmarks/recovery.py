"""Recovery under torchrun restarts: how long from a kill to the restarted job training again, and how
much work is recomputed.

    .venv/bin/python -m benchmarks.recovery      # about 5 minutes; writes results/recovery.json

One server and two clients (the built-in 4-layer model and sort data, 4 rounds of 10 steps) run
under ``torchrun --max-restarts=1``. ``SPLITFT_FAULT`` sends SIGKILL to one rank in the middle of
round 3 (after a client's 5th step, or while the server serves a 5th forward), or blocks client 1's
main thread as round 3's training starts (``hang@1:3``: a stuck rank whose heartbeat beats on, named
after ``runtime.stall_timeout_s=10``); the same run uninterrupted is the reference. Read from the
logs' millisecond stamps: the fault, the stall named (a hang), the moment the restarted job has
loaded its checkpoint ("resuming after round N"), and its first completed round.
Reported: fault -> resumed (for a hang the stall timeout; the agent's stop and restart, process
start-up, re-probe, model load), fault -> the recomputed round done, rounds recomputed, and the
wall-time overhead over the reference.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "recovery.json"
ARGS = ["train.rounds=4", "train.local_steps=10", "split.cut_layers=[1,3]", "runtime.peer_timeout_s=30"]
STALL_TIMEOUT_S = 10
FAULTS = {
    "client 2 killed": ("step@2:3:5", []),
    "server killed": ("step@0:3:5", []),
    "client 1 stuck": ("hang@1:3", [f"runtime.stall_timeout_s={STALL_TIMEOUT_S}"]),
}
STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \[rank \d+ \w+\] (.*)$")


def launch(out: Path, fault: str | None, extra: list[str] = ()) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SPLITFT_FAULT", None)
    if fault:
        env["SPLITFT_FAULT"] = fault
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
        "--max-restarts=1", "--monitor-interval=0.5", "-m", "launch.train",
        "torchrun_configs/tiny_cpu.yaml", f"output_dir={out}", *ARGS, *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"run failed ({res.returncode}):\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return wall, res.stdout + res.stderr


def events(log: str) -> list[tuple[float, str]]:
    found = []
    for line in log.splitlines():
        m = STAMP.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%H:%M:%S.%f")
            found.append((t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6, m.group(2)))
    return found


def first(evs: list[tuple[float, str]], pattern: str, after: float = -1.0) -> float:
    return next(t for t, msg in evs if t > after and re.search(pattern, msg))


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref_wall, _ = launch(Path(tmp) / "ref", None)
        results["uninterrupted"] = {"wall_s": round(ref_wall, 2)}
        for name, (fault, extra) in FAULTS.items():
            wall, log = launch(Path(tmp) / name.replace(" ", "_"), fault, extra)
            evs = events(log)
            kill = first(evs, "SPLITFT_FAULT: (killing|blocking)")
            resumed = first(evs, r"resuming after round (\d+)", kill)
            done_round = int(re.search(r"resuming after round (\d+)", log).group(1))
            trained = first(evs, rf"^\s+{done_round + 1}\s+\d", resumed)
            stall = (
                {"fault_to_stall_named_s": round(first(evs, "stalled: ", kill) - kill, 2)} if extra else {}
            )
            results[name] = {
                "fault": fault,
                **stall,
                "kill_to_resumed_s": round(resumed - kill, 2),
                "kill_to_recomputed_round_done_s": round(trained - kill, 2),
                "resumed_after_round": done_round,
                "rounds_recomputed": 3 - done_round,  # the kill was in round 3
                "wall_s": round(wall, 2),
                "overhead_over_uninterrupted_s": round(wall - ref_wall, 2),
            }
            print(name, results[name], flush=True)
    results["machine"] = {"python": platform.python_version(), "cores": os.cpu_count()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
