"""Evaluation on the demo task: a warm-up + cosine schedule against a constant learning rate (final eval
loss and exact match of greedy decoding, before and after training), and what the generation eval costs
per round against the loss eval.

    .venv/bin/python -m benchmarks.evaluation     # writes benchmarks/results/evaluation.json

The demo's training (torchrun_configs/demo.yaml: the built-in tiny Llama, 4 clients on the sort task,
6 rounds of 5 steps at batch 32, peak lr 0.002) with its simulated slowdowns and memory limit off and
the cuts fixed at 2 (the adaptive scheduler's moves depend on the host's timing, and neither changes
what is trained), so the two runs differ in their learning rate only. Both evaluate every round and
decode the responses of 32 eval prompts (eval.generate=32); the sort task has one right answer per
prompt, so exact match is its accuracy. Round 0 is the base model (baseline.json).

constant   train.lr_schedule=constant
cosine     train.lr_schedule=cosine, train.warmup_steps=3 (a tenth of the run's 30 steps),
           train.min_lr_ratio=0 (as FlowerTune's and OpenFedLLM's cosine over the rounds)

Cost: each evaluated round's generation wall time (generation.time_s: 32 prompts, all workers at once)
against its loss eval's (eval_time_s: the 128 eval samples), the median over both runs' rounds.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "evaluation.json"
COMMON = [
    "simulate.slowdown=1",
    "simulate.server_slowdown=1",
    "simulate.memory_limit_gb=null",
    "split.policy=fixed",
    "split.cut_layers=2",
    "eval.generate=32",
    "eval.max_new_tokens=64",
]
SCHEDULES = {
    "constant": ["train.lr_schedule=constant"],
    "cosine": ["train.lr_schedule=cosine", "train.warmup_steps=3", "train.min_lr_ratio=0"],
}


def launch(out: Path, extra: list[str]) -> float:
    """The demo on 5 processes with ``extra``; returns its wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=5"]
    cmd += ["-m", "launch.train", "torchrun_configs/demo.yaml", f"output_dir={out}", *COMMON, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def summarise(out: Path, wall: float) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    base = json.loads((out / "baseline.json").read_text())
    last = records[-1]
    return {
        "wall_s": wall,
        "lr": [r["lr"] for r in records],
        "eval_loss": [base["eval_loss"]] + [r["eval_loss"] for r in records],
        "exact_match": [base["generation"]["exact_match"]]
        + [r["generation"]["exact_match"] for r in records],
        "rouge_l": [base["generation"]["rouge_l"]] + [r["generation"]["rouge_l"] for r in records],
        "final_eval_loss": last["eval_loss"],
        "final_exact_match": last["generation"]["exact_match"],
        "final_rouge_l": last["generation"]["rouge_l"],
        "eval_time_s": [r["eval_time_s"] for r in records],
        "generation_time_s": [r["generation"]["time_s"] for r in records],
        "round_time_s": [r["round_time_s"] for r in records],
    }


def main() -> None:
    os.environ.setdefault("SPLITFT_CACHE", str(REPO / ".cache" / "splitft"))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in SCHEDULES.items():
            out = Path(tmp) / name
            runs[name] = summarise(out, launch(out, extra))
            r = runs[name]
            print(
                f"{name:>8}: eval loss {r['eval_loss'][0]:.4f} -> {r['final_eval_loss']:.4f}; "
                f"exact match {r['exact_match'][0]:.3f} -> {r['final_exact_match']:.3f}; "
                f"ROUGE-L {r['rouge_l'][0]:.3f} -> {r['final_rouge_l']:.3f} ({r['wall_s']:.0f} s)",
                flush=True,
            )
    ratios = [g / e for r in runs.values() for g, e in zip(r["generation_time_s"], r["eval_time_s"])]
    cost = {
        "loss_eval_s_median": statistics.median(t for r in runs.values() for t in r["eval_time_s"]),
        "generation_s_median": statistics.median(t for r in runs.values() for t in r["generation_time_s"]),
        "generation_over_loss_eval_median": statistics.median(ratios),
        "generation_share_of_round_median": statistics.median(
            g / t for r in runs.values() for g, t in zip(r["generation_time_s"], r["round_time_s"])
        ),
    }
    print(
        f"cost per round: loss eval {cost['loss_eval_s_median']:.2f} s, generation "
        f"{cost['generation_s_median']:.2f} s ({cost['generation_over_loss_eval_median']:.1f}x the loss "
        f"eval, {cost['generation_share_of_round_median']:.0%} of the round)"
    )
    result = {
        "command": "python -m benchmarks.evaluation",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"common": COMMON, **SCHEDULES},
        "runs": runs,
        "cost": cost,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
