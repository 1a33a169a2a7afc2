"""What a second computing thread costs a process on CPU, and what the compute thread gets back.

    .venv/bin/python -m benchmarks.investigations.compute_thread
    OMP_WAIT_POLICY=ACTIVE .venv/bin/python -m benchmarks.investigations.compute_thread

each writing benchmarks/investigations/results/compute_thread.json (the second
compute_thread__omp_wait_policy_active.json).

One training step (forward + backward) of the random 8-layer Llama of ``split_overhead`` (hidden 512,
seq 256, batch 8), with all cores as intra-op threads, in a fresh process per setting (a team of
OpenMP workers, once started, lives as long as its thread):

- ``main``: the steps on the main thread, nothing else computing (the unsplit trainer).
- ``second_team``: another thread, alive throughout, has run one parallel op first (an add on 1M
  floats), then the main thread steps. This is a split process before ``runtime.compute``: its
  forward on one thread, its backward on distributed autograd's, each with its own team.
- ``compute_thread``: the main thread made serial and the steps on a ``runtime.compute``
  ComputeThreads (the server's layout), after the main thread has run the same add.

Each setting runs twice, alternated, so that machine noise hits all; it reports the median step
time, the cores the process kept busy (its user + system CPU time over wall time) and the cores the
hypervisor gave to other guests meanwhile (steal time: a run with much of it is noise).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "benchmarks" / "investigations" / "results"
SETTINGS = ("main", "second_team", "compute_thread")
STEPS = 6


def measure(setting: str, model_dir: str) -> dict:
    """Runs in a fresh process: the median step time and the cores used over ``STEPS`` steps."""
    import resource
    import threading
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from runtime.compute import ComputeThreads, for_process

    cores = len(os.sched_getaffinity(0))
    if setting == "compute_thread":
        compute = for_process(torch.device("cpu"), cores, server=True)
    else:
        torch.set_num_threads(cores)
        compute = ComputeThreads(False, cores)
    model = compute.run(lambda: AutoModelForCausalLM.from_pretrained(model_dir))
    ids = torch.randint(0, model.config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))

    def big_op() -> None:
        torch.ones(2**20).add_(1)

    done, release = threading.Event(), threading.Event()

    def second_thread() -> None:
        big_op()
        done.set()
        release.wait()  # alive until the end, and so is its team (a thread's team ends with it)

    if setting == "second_team":
        threading.Thread(target=second_thread, daemon=True).start()
        done.wait()
    elif setting == "compute_thread":
        big_op()  # on the serial main thread: no team

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    compute.run(step)  # warm-up
    times = []
    steal0 = _steal_s()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, wall0 = usage.ru_utime + usage.ru_stime, time.perf_counter()
    for _ in range(STEPS):
        t0 = time.perf_counter()
        compute.run(step)
        times.append(time.perf_counter() - t0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - wall0
    busy = (usage.ru_utime + usage.ru_stime - cpu0) / wall
    stolen = (_steal_s() - steal0) / wall
    release.set()
    compute.close()
    return {"step_s": statistics.median(times), "cores_busy": busy, "cores_stolen": stolen, "cores": cores}


def _steal_s() -> float:
    """CPU time the hypervisor gave to other guests (all cores; /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2], sys.argv[3])))
        return
    from tests.random_models import save_random_model

    tmp = Path(tempfile.mkdtemp(prefix="splitft-omp-"))
    model = save_random_model("llama", tmp / "model", n_layers=8, hidden=512, heads=8, max_len=256)
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    for _ in range(2):
        for setting in SETTINGS:
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.investigations.compute_thread",
                    "--one",
                    setting,
                    str(model),
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            runs[setting].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(setting, runs[setting][-1], flush=True)
    base = statistics.median(r["step_s"] for r in runs["main"])
    summary = {
        s: {
            "step_s": [round(r["step_s"], 3) for r in runs[s]],
            "cores_busy": [round(r["cores_busy"], 2) for r in runs[s]],
            "cores_stolen": [round(r["cores_stolen"], 2) for r in runs[s]],
            "step_over_main": round(statistics.median(r["step_s"] for r in runs[s]) / base, 3),
        }
        for s in SETTINGS
    }
    result = {
        "command": ".venv/bin/python -m benchmarks.investigations.compute_thread",
        "machine": {"cores": runs["main"][0]["cores"], "platform": platform.platform()},
        "settings": summary,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    policy = os.environ.get("OMP_WAIT_POLICY")  # libgomp's spin policy, passed on to every setting's process
    name = f"compute_thread__omp_wait_policy_{policy.lower()}.json" if policy else "compute_thread.json"
    result["omp_wait_policy"] = policy
    (OUT / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
