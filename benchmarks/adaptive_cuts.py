"""Cut-layer policies on heterogeneous clients: fixed k (the SplitFT baseline), resource and adaptive.

    .venv/bin/python -m benchmarks.adaptive_cuts           # writes results/adaptive_cuts.json
    .venv/bin/python -m benchmarks.adaptive_cuts --base 1  # writes results/adaptive_cuts__base1.json
    .venv/bin/python -m benchmarks.adaptive_cuts --scenario changing  # results/adaptive_cuts__changing.json
    .venv/bin/python -m benchmarks.adaptive_cuts --scenario server    # results/adaptive_cuts__server.json

Four clients share this machine with the server; the simulation knobs make them unequal: their
layer compute really takes 1, 1, 2 and 4 times ``--base`` as long (``simulate.slowdown``), and
client 2 has ``simulate.memory_limit_gb`` set so that, by the planner's measured figures, it holds
at most two layers. With ``--base 1`` the five processes saturate this machine's two cores, so the
round time is the machine's CPU work over two cores whatever the plan; ``--base 2`` (the default)
makes the server twice as fast as the fastest client (a GPU server would be far more so) and
leaves the cores room, so the clients' critical paths set the round time as on a real cluster.
The model is the built-in 4-layer Llama at batch 32 (compute dominates a step). Every policy
trains the same rounds on the same data; reported per policy: mean round time, time to the target
eval loss, final eval loss, and the predicted against the measured training time of each round.
Goals: ``adaptive`` reaches the target >= 1.3x sooner than ``fixed`` k=2 with no worse final loss;
predicted round time within 20% of the measured one.

``--scenario changing``: the clients' speeds change during the run (``simulate.slowdown`` as a
schedule: 1, 1, 2, 4 times ``--base`` in rounds 1-3, then 4, 2, 1, 1 from round 4 on: the fast
clients turn slow and the other way round), no memory cap, so every fixed k runs. Policies:
``fixed`` at every k (the best chosen with hindsight), ``resource`` (planned once, from the probe),
``adaptive``, and ``adaptive`` with the plateau rule off (``split.plateau=0``) to measure that rule.
Goals: ``adaptive`` reaches the target >= 1.3x sooner than the best fixed cut and than ``resource``,
no worse final loss, predicted training time within 10% of the measured one from the second round
after a move.

``--scenario server``: the server's node is shared, then the clients' are. In rounds 1-5 another job
slows the server's layers 32x (``simulate.server_slowdown``) while the clients run at ``--base``;
from round 6 on the server is free and the clients run 16x ``--base``. The first phase wants deep
cuts (work off the server), the second the shallowest (work off the clients), so no fixed cut suits
both. Same policies, rounds and goals as ``changing``; target eval loss 0.56.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "adaptive_cuts.json"
ROUNDS, STEPS, BATCH = 8, 5, 32
RELATIVE_SLOWDOWN = [1, 1, 2, 4]
MEMORY_LIMIT_GB = 1.05  # client 2: ~0.3 GB above what it uses before loading its layers (fits 2)
TARGET = 0.75  # eval loss (the baseline model starts at 1.80)

POLICIES = {
    "fixed_k1": ["split.policy=fixed", "split.cut_layers=1"],
    "fixed_k2": ["split.policy=fixed", "split.cut_layers=2"],
    "fixed_k3": ["split.policy=fixed", "split.cut_layers=3"],  # client 2 cannot hold 3 layers
    "resource": ["split.policy=resource"],
    "adaptive": ["split.policy=adaptive", "split.replan_every=2", "split.cut_layers=2"],  # see below
}


CHANGING_SLOWDOWN = {1: [1, 1, 2, 4], 4: [4, 2, 1, 1]}  # x --base; from round 4 on, the speeds swap
# lora.r_cut = lora.r: every plan then trains the same function (the cut changes where layers run, not
# what they compute), so the time to a target loss compares speed alone; 10 rounds put the target
# (reached near round 8) well after the change.
CHANGING_ROUNDS, CHANGING_TARGET, CHANGING_ARGS = 10, 0.58, ["lora.r_cut=8"]
# x --base: the clients turn slow at round 6 (an even round: adaptive re-plans every 2 rounds, so it can
# act on the change after the round that shows it) as the server turns fast; the target (round 9 in the
# first runs) leaves both phases a similar share of the time to it
SERVER_SCENARIO_SLOWDOWN = {1: [1, 1, 1, 1], 6: [16, 16, 16, 16]}
SERVER_SCENARIO_ARGS = ["simulate.server_slowdown={1: 32, 6: 1}"]
SERVER_SCENARIO_TARGET = 0.56
CHANGING_POLICIES = {
    "fixed_k1": ["split.policy=fixed", "split.cut_layers=1"],
    "fixed_k2": ["split.policy=fixed", "split.cut_layers=2"],
    "fixed_k3": ["split.policy=fixed", "split.cut_layers=3"],
    "resource": ["split.policy=resource"],
    # split.cut_layers as one number: adaptive starts from the resource plan (a list, as the config file
    # gives for the fixed runs, would be taken as adaptive's start)
    "adaptive": ["split.policy=adaptive", "split.replan_every=2", "split.cut_layers=2"],
    "adaptive_no_plateau_rule": [
        "split.policy=adaptive",
        "split.replan_every=2",
        "split.cut_layers=2",
        "split.plateau=0",
    ],
}


def _slowdown_arg(slowdown: list[float] | dict[int, list[float]]) -> str:
    row = lambda v: f"[{','.join(f'{x:g}' for x in v)}]"
    if isinstance(slowdown, dict):
        return "{" + ", ".join(f"{r}: {row(v)}" for r, v in slowdown.items()) + "}"
    return row(slowdown)


def run(
    name: str,
    args: list[str],
    out: Path,
    slowdown: list[float] | dict[int, list[float]],
    memory: bool = True,
    rounds: int = ROUNDS,
    target: float = TARGET,
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=5",
        "-m",
        "launch.train",
        "torchrun_configs/tiny_cpu.yaml",
        f"output_dir={out}",
        f"train.rounds={rounds}",
        f"train.local_steps={STEPS}",
        f"train.batch_size={BATCH}",
        f"simulate.slowdown={_slowdown_arg(slowdown)}",
        *([f"simulate.memory_limit_gb=[null,{MEMORY_LIMIT_GB},null,null]"] if memory else []),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = out / "metrics.jsonl"
    wall = None
    if done.is_file() and len(done.read_text().splitlines()) == rounds:
        print(f"  reusing the finished run in {out}", flush=True)  # --keep: a run of an earlier invocation
    else:
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            lines = (res.stdout + res.stderr).splitlines()
            errors = [line for line in lines if "error" in line.lower() and "tensorpipe" not in line]
            return {"error": "\n".join(errors[:3]) or lines[-1], "command": " ".join(cmd[2:])}
    records = [json.loads(line) for line in done.read_text().splitlines()]
    reached = next((r for r in records if r["eval_loss"] <= target), None)
    # The cost model predicts the training part of a round (the clients' steps); aggregation,
    # evaluation and the checkpoint come on top and are reported apart.
    measured = [max(c["train_time_s"] for c in r["clients"].values()) for r in records]
    predicted = [r["plan"]["predicted_round_time_s"] for r in records]
    errors = [p / m - 1 for p, m in zip(predicted, measured)]
    # Rounds from the second one after a move (or after the start) on: the refit has seen the new plan.
    moved = [r["round"] for r in records if r["plan"]["next_cut_layers"]]
    settled = [
        e
        for r, e in zip(records, errors)
        if r["round"] >= 2 and all(r["round"] >= m + 2 or r["round"] <= m for m in moved)
    ]
    return {
        "command": " ".join(cmd[2:]),
        "cut_layers": [r["cut_layers"] for r in records],
        "mean_round_time_s": statistics.mean(r["round_time_s"] for r in records),
        "time_to_target_s": reached["elapsed_s"] if reached else None,
        "round_reaching_target": reached["round"] if reached else None,
        "final_eval_loss": records[-1]["eval_loss"],
        "eval_loss": [r["eval_loss"] for r in records],
        "elapsed_s": [r["elapsed_s"] for r in records],
        "round_time_s": [r["round_time_s"] for r in records],
        "measured_train_time_s": measured,
        "predicted_train_time_s": predicted,
        "prediction_error": errors,
        "median_abs_prediction_error_after_round_1": statistics.median(abs(e) for e in errors[1:]),
        "moves_after_rounds": moved,
        "replan": [r["plan"].get("replan") for r in records],
        "prediction_error_settled": settled,
        "median_abs_prediction_error_settled": statistics.median(abs(e) for e in settled)
        if settled
        else None,
        "max_abs_prediction_error_settled": max(abs(e) for e in settled) if settled else None,
        "bottleneck": [r["plan"]["bottleneck"] for r in records],
        "process_wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=float, default=2.0, help="slowdown of the fastest client")
    parser.add_argument("--scenario", choices=("static", "changing", "server"), default="static")
    parser.add_argument("--only", nargs="*", help="run only these policies")
    parser.add_argument(
        "--keep", type=Path, help="keep each run's output under this folder; a finished run there is reused"
    )
    opts = parser.parse_args()
    base, changing = opts.base, opts.scenario in ("changing", "server")
    extra = [*CHANGING_ARGS, *(SERVER_SCENARIO_ARGS if opts.scenario == "server" else [])]
    if changing:
        schedule = SERVER_SCENARIO_SLOWDOWN if opts.scenario == "server" else CHANGING_SLOWDOWN
        slowdown = {r: [base * f for f in v] for r, v in schedule.items()}
        policies = CHANGING_POLICIES
        target = SERVER_SCENARIO_TARGET if opts.scenario == "server" else CHANGING_TARGET
    else:
        slowdown = [base * f for f in RELATIVE_SLOWDOWN]
        policies = POLICIES
    if opts.only:  # in the order given
        policies = {k: policies[k] for k in opts.only if k in policies}
    out_file = OUT if base == 2.0 else OUT.with_name(f"adaptive_cuts__base{base:g}.json")
    if changing:
        out_file = out_file.with_name(f"{out_file.stem}__{opts.scenario}.json")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = opts.keep or scratch
        for name, args in policies.items():
            print(f"running {name} ...", flush=True)
            if changing:
                results[name] = run(
                    name,
                    [*args, *extra],
                    Path(tmp) / name,
                    slowdown,
                    memory=False,
                    rounds=CHANGING_ROUNDS,
                    target=target,
                )
            else:
                results[name] = run(name, args, Path(tmp) / name, slowdown)
            r = results[name]
            if "error" in r:
                print(f"  failed: {r['error'][-400:]}")
                continue
            print(
                f"  cuts {r['cut_layers'][0]} -> {r['cut_layers'][-1]}"
                f" (moves after rounds {r['moves_after_rounds']});"
                f" mean round {r['mean_round_time_s']:.2f}s;"
                f" target at {r['time_to_target_s']}s (round {r['round_reaching_target']});"
                f" final loss {r['final_eval_loss']:.4f};"
                f" prediction error (median, rounds 2+) {r['median_abs_prediction_error_after_round_1']:.0%}",
                flush=True,
            )
    ok = {k: v for k, v in results.items() if "error" not in v and v["time_to_target_s"]}
    fixed = {k: v for k, v in ok.items() if k.startswith("fixed")}
    summary = {}
    if fixed and "adaptive" in ok:
        best = min(fixed, key=lambda k: fixed[k]["time_to_target_s"])
        speedup = lambda a, b: ok[a]["time_to_target_s"] / ok[b]["time_to_target_s"] if a in ok else None
        summary = {
            "best_fixed": best,
            "speedup_to_target_adaptive_vs_best_fixed": speedup(best, "adaptive"),
            "speedup_to_target_adaptive_vs_fixed_k2": speedup("fixed_k2", "adaptive"),
            "speedup_to_target_adaptive_vs_resource": speedup("resource", "adaptive"),
            "speedup_to_target_resource_vs_fixed_k2": speedup("fixed_k2", "resource"),
            "final_loss_adaptive_minus_best_fixed": ok["adaptive"]["final_eval_loss"]
            - ok[best]["final_eval_loss"],
            "final_loss_adaptive_minus_fixed_k2": ok["adaptive"]["final_eval_loss"]
            - ok["fixed_k2"]["final_eval_loss"]
            if "fixed_k2" in ok
            else None,
        }
        print(json.dumps(summary, indent=1))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(
        json.dumps(
            {
                "command": " ".join([".venv/bin/python -m benchmarks.adaptive_cuts", *sys.argv[1:]]),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "setup": {
                    "rounds": CHANGING_ROUNDS if changing else ROUNDS,
                    "local_steps": STEPS,
                    "batch_size": BATCH,
                    "slowdown": slowdown,
                    "memory_limit_gb_client2": None if changing else MEMORY_LIMIT_GB,
                    "target_eval_loss": target if changing else TARGET,
                    "extra": extra if changing else [],
                },
                "summary": summary,
                "runs": results,
            },
            indent=1,
        )
    )
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
