"""Many clients on few workers: what sharing workers costs and saves.

    .venv/bin/python -m benchmarks.many_clients                # every part; writes results/many_clients.json
    .venv/bin/python -m benchmarks.many_clients workers hetero # only the named parts (workers scale hetero)

workers  the same federation (8 clients, all 8 each round, cuts 1-3, 3 rounds) on 8 workers (one
         client each) and on 2 (four clients each, one after another): the median round time of rounds
         2-3 (goal: 2 workers within 1.1x of 8 on a host whose cores both share) and the summed peak RSS
         of every process (goal: 2 workers at most 40% of 8 workers').
scale    N = 10, 100 and 1,000 clients, 8 drawn a round, on 2 workers: the server's peak RSS (goal: flat
         in N within 5%), the start-up time (launch to the first round's start; goal: grows less than
         linearly in N: the data are tokenised once, not once per client) and the per-client switch cost
         (re-cut, replica, data position) as a share of that client's training time (goal: <= 5%), at
         3 local steps and, for N = 100, at 10.
hetero   100 clients with the seeded simulated slowdown {lognormal: 1} (the fastest at 1x), 8 drawn a round,
         on 2 workers, 24 rounds: split.assignment=predicted (longest measured-or-predicted client first
         onto the least loaded worker, then moves and swaps) and dynamic (the same lists, and a worker
         that runs out takes queued clients off one that runs late) against round_robin; the mean round
         time of rounds 13-24 (goal: at least 1.2x faster), with the predicted and measured training
         spans (the busiest worker's) and the share of those rounds' clients that had trained before
         (whose times are known; the others are estimated from their worker's probe).

The model is a random 4-layer Llama (hidden 64) and the data the generated sort task, so the figures
are about the runtime, not the model.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from models.tiny import generate_examples, write_jsonl
from tests.random_models import save_random_model

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "many_clients.json"


def launch(n_procs: int, args: list[str]) -> tuple[float, list[dict]]:
    """One run of ``launch.train`` on ``n_procs`` ranks: (wall seconds, metrics records)."""
    out = Path([a for a in args if a.startswith("output_dir=")][0].split("=", 1)[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}"]
    cmd += ["-m", "launch.train", "torchrun_configs/tiny_cpu.yaml", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return wall, records


def base_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={root / 'model'}",
        f"data.train_path={root / 'train.jsonl'}",
        f"data.eval_path={root / 'eval.jsonl'}",
        f"output_dir={out}",
        "data.partition=iid",
        "data.min_samples=2",
        "data.max_eval_samples=32",
        "train.eval_batch_size=32",
        "train.batch_size=4",
        "runtime.rpc_timeout_s=600",
        *extra,
    ]


def total_rss_mb(rec: dict) -> float:
    """The server's peak RSS plus each worker process's (the largest its clients reported)."""
    per_worker: dict[str, float] = {}
    for c, w in rec["workers"].items():
        per_worker[str(w)] = max(per_worker.get(str(w), 0.0), rec["clients"][c]["peak_rss_mb"])
    return rec["server"]["peak_rss_mb"] + sum(per_worker.values())


def workers_part(root: Path) -> dict:
    fed = ["split.clients=8", "split.cut_layers=[1,2,3,1,2,3,1,2]", "train.rounds=3", "train.local_steps=5"]
    out = {}
    for m in (8, 2):
        _, recs = launch(m + 1, base_args(root, root / f"workers-m{m}", *fed))
        out[m] = {
            "round_time_s": [r["round_time_s"] for r in recs],
            "median_round_time_s_rounds_2_3": statistics.median(r["round_time_s"] for r in recs[1:]),
            "total_peak_rss_mb": total_rss_mb(recs[-1]),
            "server_peak_rss_mb": recs[-1]["server"]["peak_rss_mb"],
            "eval_loss": [r["eval_loss"] for r in recs],
        }
    return {
        "by_workers": out,
        "round_time_ratio_2_over_8": out[2]["median_round_time_s_rounds_2_3"]
        / out[8]["median_round_time_s_rounds_2_3"],
        "rss_ratio_2_over_8": out[2]["total_peak_rss_mb"] / out[8]["total_peak_rss_mb"],
        "max_eval_loss_difference": max(abs(a - b) for a, b in zip(out[8]["eval_loss"], out[2]["eval_loss"])),
    }


def scale_part(root: Path) -> dict:
    out = {}
    for n in (10, 100, 1000):
        fed = [f"split.clients={n}", "split.cut_layers=2", "train.clients_per_round=8"]
        wall, recs = launch(
            3, base_args(root, root / f"scale-n{n}", *fed, "train.rounds=2", "train.local_steps=3")
        )
        switch = sum(c["switch_s"] for r in recs for c in r["clients"].values())
        trained = sum(c["train_time_s"] for r in recs for c in r["clients"].values())
        out[n] = {
            "server_peak_rss_mb": recs[-1]["server"]["peak_rss_mb"],
            "startup_s": wall - recs[-1]["elapsed_s"],  # launch to the first round, and the shutdown
            "switch_share_of_training": switch / trained,
            "median_switch_s": statistics.median(c["switch_s"] for r in recs for c in r["clients"].values()),
            "largest_switch_s": max(c["switch_s"] for r in recs for c in r["clients"].values()),
        }
    # the switch's share at a longer local round: the same switch against more steps of training
    fed = ["split.clients=100", "split.cut_layers=2", "train.clients_per_round=8"]
    _, recs = launch(
        3, base_args(root, root / "scale-steps10", *fed, "train.rounds=2", "train.local_steps=10")
    )
    switch = sum(c["switch_s"] for r in recs for c in r["clients"].values())
    trained = sum(c["train_time_s"] for r in recs for c in r["clients"].values())
    rss = [out[n]["server_peak_rss_mb"] for n in out]
    return {
        "switch_share_of_training_n100_10_steps": switch / trained,
        "by_clients": out,
        "server_rss_spread": max(rss) / min(rss) - 1,
        "startup_ratio_1000_over_10": out[1000]["startup_s"] / out[10]["startup_s"],
        "max_switch_share": max(v["switch_share_of_training"] for v in out.values()),
    }


def hetero_part(root: Path) -> dict:
    fed = [
        "split.clients=100",
        "split.cut_layers=2",
        "train.clients_per_round=8",
        "train.rounds=24",
        "train.local_steps=3",
        'simulate.slowdown={"lognormal": 1}',  # the runtime's seeded draw: the fastest client at 1x
    ]
    out = {}
    for how in ("predicted", "dynamic", "round_robin"):
        _, recs = launch(3, base_args(root, root / f"hetero-{how}", *fed, f"split.assignment={how}"))
        late = recs[12:]
        seen: set[str] = set()
        known = []  # per round: the drawn clients that had trained before, as a share
        for r in recs:
            drawn = {str(c) for c in r["participants"]}
            if r["round"] > 12:
                known.append(len(drawn & seen) / len(drawn))
            seen |= drawn
        spans = []
        for r in late:
            busy: dict[int, float] = {}
            for c, w in r["workers"].items():
                busy[w] = busy.get(w, 0.0) + r["clients"][c]["train_time_s"]
            spans.append(max(busy.values()))
        out[how] = {
            "mean_round_time_s_rounds_13_24": statistics.mean(r["round_time_s"] for r in late),
            "mean_measured_training_span_s": statistics.mean(spans),
            "mean_predicted_training_span_s": statistics.mean(
                r["plan"]["assigned_round_time_s"] for r in late
            ),
            "share_of_clients_measured_before": statistics.mean(known),
        }
    rr = out["round_robin"]
    return {
        "slowdown": {
            "distribution": "simulate.slowdown={lognormal: 1}: exp(z), z ~ N(0, 1) seeded, over the smallest",
            "values": json.loads((root / "hetero-predicted" / "run_config.json").read_text())["simulate"][
                "slowdown"
            ],
        },
        "by_assignment": out,
        **{
            f"{how}_{what}_speedup": rr[key] / out[how][key]
            for how in ("predicted", "dynamic")
            for what, key in (
                ("round_time", "mean_round_time_s_rounds_13_24"),
                ("training_span", "mean_measured_training_span_s"),
            )
        },
    }


PARTS = {"workers": workers_part, "scale": scale_part, "hetero": hetero_part}


def main() -> None:
    names = sys.argv[1:] or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}: use {' '.join(PARTS)}")
    result = json.loads(OUT.read_text()) if OUT.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="splitft-many-") as tmp:
        root = Path(tmp)
        save_random_model("llama", root / "model", n_layers=4, hidden=64)
        write_jsonl(generate_examples("sort", 4000, 0), root / "train.jsonl")
        write_jsonl(generate_examples("sort", 32, 1), root / "eval.jsonl")
        for name in names:
            t0 = time.perf_counter()
            result[name] = {**PARTS[name](root), "part_wall_s": time.perf_counter() - t0}
            print(name, json.dumps({k: v for k, v in result[name].items() if not isinstance(v, dict)}))
    result["command"] = " ".join([".venv/bin/python -m benchmarks.many_clients", *sys.argv[1:]])
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    result["date"] = date.today().isoformat()
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
