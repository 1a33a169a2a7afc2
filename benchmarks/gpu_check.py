"""The GPU check: one command that runs what only a GPU can show, in a few minutes on one GPU, and
prints a table of what ran.

    .venv/bin/python -m benchmarks.gpu_check          # on a machine with CUDA (exits 2 without it)
    .venv/bin/python -m benchmarks.gpu_check --cpu    # the same runs on CPU: checks the script itself

Runs (the built-in model shape, random weights, the generated sort task):

1. federation  1 server + 3 workers on one GPU (every rank shares it, so the adapter all-reduce is
               placed on gloo), 8 clients drawn 4 a round, model.dtype=bfloat16, 3 rounds.
2. move        1 server + 2 clients, float32, a forced move after round 1 (split.schedule): the model
               is the same function before and after (runtime.debug's eval_loss_after_move).
3. restart     the federation of run 1 with a client rank killed in round 2 under
               torchrun --max-restarts=1: the restarted run ends with the uninterrupted run's losses.

For each: exit code, placement and backend (from the log), the probe's CUDA facts (profiles.json),
eval losses and round times. Results go to benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from models.tiny import generate_examples, write_jsonl
from tests.random_models import save_random_model

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "gpu_check.json"


def launch(n: int, args: list[str], restarts: int = 0, fault: str | None = None) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    cmd += [f"--max-restarts={restarts}", "-m", "launch.train", "torchrun_configs/tiny_cpu.yaml", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if fault:
        env["SPLITFT_FAULT"] = fault
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return res.returncode, res.stdout + res.stderr, time.perf_counter() - t0


def facts(out: Path, log: str, code: int, wall: float) -> dict:
    metrics = out / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    profiles = json.loads((out / "profiles.json").read_text()) if (out / "profiles.json").is_file() else {}
    found = lambda pattern: (re.search(pattern, log) or [None, None])[1]
    return {
        "exit_code": code,
        "wall_s": round(wall, 1),
        "placement": found(r"placement: (.*)"),
        "backend": found(r"adapter aggregation on (\w+)"),
        "cuda": {r: p.get("cuda") for r, p in profiles.items()},
        "eval_loss": [r["eval_loss"] for r in records],
        "round_time_s": [r["round_time_s"] for r in records],
        "participants": [r.get("participants") for r in records],
        "eval_loss_after_move": [r["plan"].get("eval_loss_after_move") for r in records if "plan" in r],
        "restarted": "restart" in log.lower() and code == 0,
        "log_tail": log[-1500:] if code != 0 else "",
    }


def main() -> None:
    cpu = "--cpu" in sys.argv[1:]
    if not cpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; use --cpu to check the script on CPU")
    device = "cpu" if cpu else "cuda"
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="splitft-gpu-") as tmp:
        root = Path(tmp)
        save_random_model("llama", root / "model", n_layers=4, hidden=64)
        write_jsonl(generate_examples("sort", 480, 0), root / "train.jsonl")
        write_jsonl(generate_examples("sort", 48, 1), root / "eval.jsonl")
        common = [
            f"model.path={root / 'model'}",
            f"data.train_path={root / 'train.jsonl'}",
            f"data.eval_path={root / 'eval.jsonl'}",
            f"runtime.device={device}",
            "data.min_samples=8",
            "data.max_eval_samples=48",
            "train.local_steps=5",
            "runtime.rpc_timeout_s=300",
        ]
        fed = ["split.clients=8", "train.clients_per_round=4", "split.cut_layers=2", "train.rounds=3"]
        fed += ["model.dtype=float32" if cpu else "model.dtype=bfloat16", "data.partition=iid"]
        runs = {
            "federation": (4, [*fed], 0, None),
            "move": (
                3,
                ["split.cut_layers=[1,2]", "split.schedule={1: [2, 1]}", "runtime.debug=true"],
                0,
                None,
            ),
            "restart": (4, [*fed], 1, "step@2:2:3"),
        }
        for name, (n, args, restarts, fault) in runs.items():
            out = root / name
            code, log, wall = launch(n, [*common, *args, f"output_dir={out}"], restarts, fault)
            result[name] = facts(out, log, code, wall)
    fed_loss, restart_loss = result["federation"]["eval_loss"], result["restart"]["eval_loss"]
    # within 1e-5: the workers' clients (by measured time) and so the all-reduce's grouping may differ
    result["restart"]["ends_equal"] = len(fed_loss) == len(restart_loss) > 0 and all(
        abs(a - b) < 1e-5 for a, b in zip(fed_loss, restart_loss)
    )
    result.update(
        command=" ".join(["python -m benchmarks.gpu_check", *sys.argv[1:]]), date=date.today().isoformat()
    )
    if not cpu:
        OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'run':<12}{'exit':>5}  {'backend':<8}{'wall s':>8}  eval loss by round")
    for name in runs:
        r = result[name]
        print(f"{name:<12}{r['exit_code']:>5}  {str(r['backend']):<8}{r['wall_s']:>8}  {r['eval_loss']}")
    print("placement:", result["federation"]["placement"])
    print("cuda (rank 0):", result["federation"]["cuda"].get("0"))
    print(
        "move: eval loss before / after the move:",
        result["move"]["eval_loss"][:1],
        result["move"]["eval_loss_after_move"][:1],
    )
    print("restart ends equal to the uninterrupted run:", result["restart"]["ends_equal"])
    if any(r["exit_code"] != 0 for r in result.values() if isinstance(r, dict) and "exit_code" in r):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
