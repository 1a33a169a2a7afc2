"""Training recipes: bfloat16 autocast against float32, and activation checkpointing's memory and time.

    .venv/bin/python -m benchmarks.training      # writes benchmarks/results/training.json

1. GPT-2-small shape (12 layers, hidden 768, 12 heads, vocabulary 50257, dropout 0.1; random weights and
   a small byte-level BPE tokenizer), batch 16, sequence 256, one client cut at 6 (two processes, one
   intra-op thread each), 2 steps: float32, float32 with train.activation_checkpointing, and
   train.autocast=bfloat16. Reported: seconds per training step (the round's training time over its
   steps), tokens/s of training, peak RSS of the client and of the server, and the ratios: checkpointing's
   peak memory over float32's on each side (goal <= 0.6) and its time, bf16's tokens/s over float32's.
2. The demo task (the built-in tiny Llama on the sort task, torchrun_configs/tiny_cpu.yaml, 2 clients
   cut at 1 and 2, 5 rounds of 10 steps): float32 against train.autocast=bfloat16, final eval loss
   (goal: within 1%), tokens/s and peak RSS.

Each configuration is one run: a few steps suffice for memory and per-step time on a quiet host; the
tokens/s figures carry the host's noise (no pairs, unlike benchmarks.split_overhead).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM

from tests.random_models import build_byte_bpe_tokenizer, checkpoint_config

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results"
BATCH, SEQ, CUT, STEPS = 16, 256, 6, 2


def gpt2_small(out: Path, data: Path) -> Path:
    """A random GPT-2-small-shaped model (full size) with a byte-level BPE tokenizer trained on ``data``."""
    tokenizer = build_byte_bpe_tokenizer(data.read_text().splitlines()[:200])
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = checkpoint_config("gpt2-small", small=False, bos_token_id=end, eos_token_id=end)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_text(path: Path, n_lines: int) -> None:
    """Lines long enough that every example is cut at data.max_seq_len (every batch is BATCH x SEQ)."""
    import random

    rng = random.Random(0)
    path.write_text("\n".join(" ".join(str(rng.randint(0, 999)) for _ in range(300)) for _ in range(n_lines)))


def torchrun(n: int, args: list[str], threads: int = 1) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    cmd += ["-m", "launch.train", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def shape_run(model: Path, data: Path, out: Path, *settings: str) -> dict:
    """One configuration on the GPT-2-small shape: per-step time, training tokens/s, peak RSS."""
    args = [
        "torchrun_configs/tiny_cpu.yaml",
        f"model.path={model}",
        f"data.train_path={data}",
        f"data.eval_path={data}",
        f"data.max_seq_len={SEQ}",
        "data.partition=iid",
        "data.min_samples=1",
        "data.max_eval_samples=2",
        f"train.batch_size={BATCH}",
        "train.eval_batch_size=2",
        "train.rounds=1",
        f"train.local_steps={STEPS}",
        "lora.r_cut=8",
        f"split.cut_layers={CUT}",
        "runtime.intra_op_threads=1",
        f"output_dir={out}",
        *settings,
    ]
    wall = torchrun(2, args)
    rec = records(out)[-1]
    client = rec["clients"]["1"]
    return {
        "settings": list(settings),
        "step_s": client["train_time_s"] / client["steps"],
        "train_tokens_per_s": BATCH * SEQ * client["steps"] / client["train_time_s"],
        "client_peak_rss_mb": client["peak_rss_mb"],
        "server_peak_rss_mb": rec["server"]["peak_rss_mb"],
        "eval_loss": rec["eval_loss"],
        "wall_s": wall,
    }


def demo_run(out: Path, *settings: str) -> dict:
    """The demo task: 2 clients cut at 1 and 2 on the built-in tiny Llama and sort data."""
    args = ["torchrun_configs/tiny_cpu.yaml", "split.cut_layers=[1,2]", f"output_dir={out}", *settings]
    wall = torchrun(3, args)
    recs = records(out)
    return {
        "settings": list(settings),
        "final_eval_loss": recs[-1]["eval_loss"],
        "eval_losses": [r["eval_loss"] for r in recs],
        "tokens_per_s": sum(r["tokens_per_s"] for r in recs[1:]) / max(1, len(recs) - 1),
        "client_peak_rss_mb": max(c["peak_rss_mb"] for c in recs[-1]["clients"].values()),
        "server_peak_rss_mb": recs[-1]["server"]["peak_rss_mb"],
        "wall_s": wall,
    }


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="splitft-training-"))
    data = tmp / "train.txt"
    write_text(data, 4 * BATCH)
    model = gpt2_small(tmp / "gpt2-small", data)
    runs = {
        "float32": shape_run(model, data, tmp / "fp32"),
        "checkpointing": shape_run(model, data, tmp / "ckpt", "train.activation_checkpointing=true"),
        "bfloat16": shape_run(model, data, tmp / "bf16", "train.autocast=bfloat16"),
    }
    fp32, ckpt, bf16 = runs["float32"], runs["checkpointing"], runs["bfloat16"]
    demo = {
        "float32": demo_run(tmp / "demo_fp32"),
        "bfloat16": demo_run(tmp / "demo_bf16", "train.autocast=bfloat16"),
    }
    demo_fp32, demo_bf16 = demo["float32"], demo["bfloat16"]
    result = {
        "command": ".venv/bin/python -m benchmarks.training",
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "shape": f"GPT-2 small (random), batch {BATCH}, seq {SEQ}, cut {CUT} of 12, {STEPS} steps, CPU",
        "gpt2_small": runs,
        "checkpointing_memory_ratio": {
            "client": ckpt["client_peak_rss_mb"] / fp32["client_peak_rss_mb"],
            "server": ckpt["server_peak_rss_mb"] / fp32["server_peak_rss_mb"],
        },
        "checkpointing_time_ratio": ckpt["step_s"] / fp32["step_s"],
        "bfloat16_tokens_per_s_ratio": bf16["train_tokens_per_s"] / fp32["train_tokens_per_s"],
        "bfloat16_memory_ratio": {
            "client": bf16["client_peak_rss_mb"] / fp32["client_peak_rss_mb"],
            "server": bf16["server_peak_rss_mb"] / fp32["server_peak_rss_mb"],
        },
        "demo": demo,
        "demo_bfloat16_eval_loss_change": demo_bf16["final_eval_loss"] / demo_fp32["final_eval_loss"] - 1,
        "demo_bfloat16_tokens_per_s_ratio": demo_bf16["tokens_per_s"] / demo_fp32["tokens_per_s"],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
