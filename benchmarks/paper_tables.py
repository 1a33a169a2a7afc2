"""SplitFT's Table I and Table II in shape: a GPT-2-small-shaped model, cut layers and the rank at the cut.

    .venv/bin/python -m benchmarks.paper_tables   # a few minutes; writes results/paper_tables.json

The model is GPT-2 small's shape (12 layers, hidden 768, 12 heads, MLP 3072, built here with random
weights and saved as an ordinary HF folder) with this repo's character tokenizer (vocabulary ~100
instead of 50,257, so the embeddings are small) on generated text (lines of random numbers), short
sequences (``SEQ``) and a few steps per setting, one client and the server (``torchrun``, 2
processes); the "no cut" row is ``launch.train_local`` (one process, no communication).

Table I: for cut layers 2, 4, 6, 8, 10 and no cut, the training time (the run's elapsed time),
the round time, and per round and client the bytes that crossed, as the runtime counted them:
activations (hidden states, mask, labels) up, their gradients down, the adapter all-reduce up and
down, plus the bytes of the adapter the client holds (its LoRA weights: what a client would send
if only client-side adapters were exchanged). Table II: the same at cut 2 for ``lora.r_cut`` 1, 2, 4
and 8 (``lora.r`` = 8).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "paper_tables.json"
LAYERS, HIDDEN, HEADS, SEQ, BATCH = 12, 768, 12, 32, 2
ROUNDS, STEPS = 2, 2
CUTS = [2, 4, 6, 8, 10]
R, R_CUTS, TABLE2_CUT = 8, [1, 2, 4, 8], 2


def write_text(path: Path, n_lines: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = [" ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(6, 12))) for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")


def common(model: Path, train: Path, valid: Path, out: Path, **extra: object) -> list[str]:
    args = {
        "model.path": model,
        "data.train_path": train,
        "data.eval_path": valid,
        "data.max_seq_len": SEQ,
        "data.partition": "iid",
        "data.min_samples": 1,
        "data.max_eval_samples": 2,
        "train.batch_size": BATCH,
        "train.eval_batch_size": 2,
        "train.rounds": ROUNDS,
        "train.local_steps": STEPS,
        "lora.r": R,
        "lora.alpha": 2 * R,
        "output_dir": out,
        # One intra-op thread in every process: on a busy host an OpenMP barrier waiting for a descheduled
        # thread stalls a step for seconds (a first run of this script measured the 2-thread unsplit
        # process 20x slower than the split runs for that reason).
        "runtime.intra_op_threads": 1,
        **extra,
    }
    return ["torchrun_configs/tiny_cpu.yaml", *(f"{k}={v}" for k, v in args.items())]


def launch(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def split_row(args: list[str]) -> dict:
    out = Path(args[[a.split("=")[0] for a in args].index("output_dir")].split("=", 1)[1])
    wall = launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + [
            "-m",
            "launch.train",
            *args,
        ]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_round = lambda key: statistics.mean(r["comm_bytes"]["1"][key] for r in records)
    row = {
        "time_s": records[-1]["elapsed_s"],
        "round_time_s": statistics.mean(r["round_time_s"] for r in records),
        "train_time_s": statistics.mean(r["clients"]["1"]["train_time_s"] for r in records),
        "activations_up": per_round("activations_up"),
        "gradients_down": per_round("gradients_down"),
        "adapters_up": per_round("adapters_up"),
        "adapters_down": per_round("adapters_down"),
        "client_adapter_bytes": records[-1]["clients"]["1"]["lora_bytes"],
        "eval_loss": records[-1]["eval_loss"],
        "process_wall_s": wall,
    }
    row["total"] = sum(row[k] for k in ("activations_up", "gradients_down", "adapters_up", "adapters_down"))
    return row


def local_row(args: list[str]) -> dict:
    out = Path(args[[a.split("=")[0] for a in args].index("output_dir")].split("=", 1)[1])
    wall = launch([sys.executable, "-m", "launch.train_local", *args])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "time_s": records[-1]["elapsed_s"],
        "round_time_s": statistics.mean(r["round_time_s"] for r in records),
        "activations_up": 0,
        "gradients_down": 0,
        "adapters_up": 0,
        "adapters_down": 0,
        "total": 0,
        "eval_loss": records[-1]["eval_loss"],
        "process_wall_s": wall,
    }


def mb(x: float) -> str:
    return f"{x / 1e6:.3f}"


def main() -> None:
    from tests.random_models import save_random_model

    tmp = Path(tempfile.mkdtemp(prefix="splitft-paper-"))
    t0 = time.perf_counter()
    model = save_random_model("gpt2", tmp / "gpt2-small-shape", n_layers=LAYERS, hidden=HIDDEN, heads=HEADS)
    train, valid = tmp / "train.txt", tmp / "valid.txt"
    write_text(train, 64, 0)
    write_text(valid, 8, 1)
    table1: dict[str, dict] = {}
    for k in CUTS:
        print(f"cut {k} ...", flush=True)
        table1[str(k)] = split_row(
            common(model, train, valid, tmp / f"cut{k}", **{"split.cut_layers": k, "lora.r_cut": 4})
        )
    print("no cut ...", flush=True)
    table1["none"] = local_row(common(model, train, valid, tmp / "local", **{"lora.r_cut": 4}))
    table2: dict[str, dict] = {}
    for r_cut in R_CUTS:
        if r_cut == 4:  # the same setting as Table I's cut 2
            table2[str(r_cut)] = table1[str(TABLE2_CUT)]
            continue
        print(f"r_cut {r_cut} ...", flush=True)
        table2[str(r_cut)] = split_row(
            common(
                model,
                train,
                valid,
                tmp / f"rcut{r_cut}",
                **{"split.cut_layers": TABLE2_CUT, "lora.r_cut": r_cut},
            )
        )
    print("\nTable I (per round and client; MB = 1e6 bytes)")
    print(
        "| cut | time (s) | round (s) | activations up | gradients down | adapter all-reduce up+down "
        "| client adapter | total crossed |"
    )
    for k, row in table1.items():
        print(
            f"| {k} | {row['time_s']:.1f} | {row['round_time_s']:.2f} | {mb(row['activations_up'])} "
            f"| {mb(row['gradients_down'])} | {mb(row['adapters_up'] + row['adapters_down'])} "
            f"| {mb(row.get('client_adapter_bytes', 0))} | {mb(row['total'])} |"
        )
    print(f"\nTable II (cut {TABLE2_CUT}, lora.r = {R})")
    print("| r_cut | adapter all-reduce up+down | client adapter | activations up + gradients down | total |")
    for r_cut, row in table2.items():
        print(
            f"| {r_cut} | {mb(row['adapters_up'] + row['adapters_down'])} "
            f"| {mb(row['client_adapter_bytes'])} "
            f"| {mb(row['activations_up'] + row['gradients_down'])} | {mb(row['total'])} |"
        )
    result = {
        "command": ".venv/bin/python -m benchmarks.paper_tables",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": f"random GPT-2 ({LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, MLP {4 * HIDDEN}), "
        f"character tokenizer; seq {SEQ}, batch {BATCH}, {ROUNDS} rounds x {STEPS} steps, 1 client, "
        "float32, CPU",
        "lora": {"r": R, "r_cut_table1": 4, "targets": "GPT-2 defaults (c_attn, c_proj, c_fc)"},
        "table1": table1,
        "table2": {"cut": TABLE2_CUT, "rows": table2},
        "benchmark_wall_s": time.perf_counter() - t0,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT} ({result['benchmark_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
