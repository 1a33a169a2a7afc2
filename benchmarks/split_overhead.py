"""Split vs unsplit throughput, bytes per step against the floor, and client memory against its share.

    .venv/bin/python -m benchmarks.split_overhead            # writes benchmarks/results/split_overhead.json
    .venv/bin/python -m benchmarks.split_overhead runtime.rpc_transports=[shm,uv] runtime.malloc_arenas=0
                                                             # any overrides: applied to every run,
                                                             # written to split_overhead__<overrides>.json

1. tokens/s of a one-client split run (torchrun, 2 processes) over launch.train_local on the
   same random 8-layer Llama (hidden 512, seq 256, batch 8), rounds 2-4 of 4 (6 steps each; a
   round's time includes its evaluation and, split, its collectives). The two runs are paired and
   the pairs alternate in order (local first, then split first, ...), so that a drift of the
   machine's speed falls on both alike. Reported: the ratio of the medians over all measured rounds,
   each pair's ratio, and their geometric mean with a 95% interval (Student's t over the pairs' log
   ratios: this machine's noise, not the split, is most of a pair's spread); goal >= 0.85 (issue 10:
   >= 0.97). Also each split step's parts (client compute, server compute, the rest) and each
   round's time outside its steps (evaluation, collectives), for both runs.
2. bytes moved per training step (hidden states + mask + labels up, gradients down, as
   counted from the tensors sent) over the floor 2 x batch x seq x hidden x itemsize; goal <= 1.1.
3. peak RSS of clients cut at 1, 4 and 7 of 8 layers, against the parameter bytes of their
   stage and against the peak RSS of the unsplit process training the full model at the
   same batch; goal: grows with k and stays well under the full model.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.stats import geometric_interval
from tests.random_models import save_random_model

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results"
HIDDEN, LAYERS, SEQ, BATCH = 512, 8, 256, 8
PAIRS, ROUNDS = 8, 4  # throughput: PAIRS local/split pairs, rounds 2..ROUNDS of each run


def write_text_data(path: Path, n_lines: int) -> None:
    import random

    rng = random.Random(0)
    lines = [" ".join(str(rng.randint(0, 999)) for _ in range(90)) for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")


def overrides(model: Path, data: Path, out: Path, argv: list[str] | None = None, **extra: str) -> list[str]:
    """The run's config and overrides; ``argv`` (default: this command's arguments) go last."""
    args = {
        "model.path": str(model),
        "data.train_path": str(data),
        "data.eval_path": str(data),
        "data.max_seq_len": str(SEQ),
        "data.partition": "iid",
        "data.min_samples": "1",
        "data.max_eval_samples": "8",
        "train.batch_size": str(BATCH),
        "train.eval_batch_size": "8",
        "train.rounds": "2",
        "train.local_steps": "6",
        "lora.r_cut": "8",
        "runtime.intra_op_threads": "2",
        "output_dir": str(out),
        **extra,
    }
    extra_args = sys.argv[1:] if argv is None else argv
    return ["torchrun_configs/tiny_cpu.yaml", *(f"{k}={v}" for k, v in args.items()), *extra_args]


def run(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def torchrun(n: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "launch.train",
        *args,
    ]


def last_round(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def measured_rounds(out: Path) -> list[dict]:
    """Every round's record but the first (it warms up)."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[1:]]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="splitft-bench-"))
    model = save_random_model("llama", tmp / "model", n_layers=LAYERS, hidden=HIDDEN, heads=8, max_len=SEQ)
    data = tmp / "train.txt"
    write_text_data(data, 400)

    # 1 + 2: throughput and bytes, local and split paired, rounds 2.. only (round 1 warms up).
    split_tps, local_tps, per_step, local_rss, split_cores, local_cores, parts = [], [], [], [], [], [], []
    by_pair, outside_steps = [], {"local": [], "split": []}
    rounds = {"train.rounds": str(ROUNDS)}
    for i in range(PAIRS):
        pair = {}
        for kind in ("local", "split") if i % 2 == 0 else ("split", "local"):
            out = tmp / f"{kind}{i}"
            if kind == "local":
                run([sys.executable, "-m", "launch.train_local", *overrides(model, data, out, **rounds)])
            else:
                run(torchrun(2, overrides(model, data, out, **{"split.cut_layers": "4"}, **rounds)))
            pair[kind] = measured_rounds(out)
        local, split = pair["local"], pair["split"]
        local_tps += [r["tokens_per_s"] for r in local]
        local_rss.append(local[-1]["clients"]["local"]["peak_rss_mb"])
        local_cores += [r["clients"]["local"]["train_cores_used"] for r in local]
        outside_steps["local"] += [r["round_time_s"] - r["clients"]["local"]["train_time_s"] for r in local]
        split_tps += [r["tokens_per_s"] for r in split]
        by_pair.append(
            statistics.mean(r["tokens_per_s"] for r in split)
            / statistics.mean(r["tokens_per_s"] for r in local)
        )
        for rec in split:
            split_cores.append(rec["server"]["train_cores_used"] + rec["clients"]["1"]["train_cores_used"])
            c1 = rec["clients"]["1"]  # a step's parts (medians): client compute, server compute, the rest
            parts.append({k: c1[k] for k in ("step_time_s", "compute_s", "server_s")})
            parts[-1]["other_s"] = c1["step_time_s"] - c1["compute_s"] - c1["server_s"]
            outside_steps["split"].append(rec["round_time_s"] - c1["train_time_s"])
            c = rec["comm_bytes"]["1"]
            per_step.append((c["activations_up"] + c["gradients_down"]) / c1["steps"])
    geo_mean, geo_low, geo_high = geometric_interval(by_pair)
    floor = 2 * BATCH * SEQ * HIDDEN * 4

    # 3: memory of clients cut at 1, 4, 7.
    out_m = tmp / "memory"
    run(
        torchrun(
            4,
            overrides(
                model,
                data,
                out_m,
                **{"split.cut_layers": "[1,4,7]", "train.rounds": "1", "train.local_steps": "2"},
            ),
        )
    )
    rec = last_round(out_m)
    full_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    baseline_rss = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, resource, runtime.run, runtime.local; "
                "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))",
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
        ).stdout
    )
    memory = {
        rank: {
            "cut": rec["cut_layers"][rank],
            "peak_rss_mb": c["peak_rss_mb"],
            "stage_param_mb": c["stage_param_mb"],
        }
        for rank, c in rec["clients"].items()
    }

    result = {
        "command": " ".join([".venv/bin/python -m benchmarks.split_overhead", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {platform.python_version()}",
        "model": f"random Llama, {LAYERS} layers, hidden {HIDDEN}, seq {SEQ}, batch {BATCH}, float32, CPU",
        "throughput": {
            "local_tokens_per_s": local_tps,
            "split_tokens_per_s": split_tps,
            "ratio_split_over_local": statistics.median(split_tps) / statistics.median(local_tps),
            "ratio_by_pair": by_pair,  # pair i ran local first for even i, split first for odd i
            "ratio_geometric_mean": geo_mean,
            "ratio_95_interval": [geo_low, geo_high],
            # cores kept busy while training: the unsplit process, and the split's two processes together
            # (one of them computes at every moment, so both would be the intra-op thread count if the
            # split's phases ran as parallel as the unsplit step)
            "local_train_cores_used": local_cores,
            "split_train_cores_used": split_cores,
            # the split step's parts: compute on each side, and the rest (transport, hand-offs, optimizer
            # steps, batch preparation)
            "split_step_parts_s": parts,
            # a round's time outside its training steps: the evaluation, and in the split the barriers,
            # gathers and the adapter all-reduce
            "round_outside_steps_s": outside_steps,
        },
        "bytes_per_step": {
            "floor": floor,
            "measured": per_step,
            "ratio_over_floor": statistics.median(per_step) / floor,
        },
        "memory": {
            "full_model_param_mb": full_mb,
            "import_only_rss_mb": baseline_rss,
            "unsplit_full_model_peak_rss_mb": max(local_rss),
            "clients": memory,
        },
        "benchmark_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in "__".join(sys.argv[1:]))
    name = f"split_overhead__{slug}.json" if slug else "split_overhead.json"
    (OUT / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
