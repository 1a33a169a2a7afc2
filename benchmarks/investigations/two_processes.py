"""What splitting a model across two processes on shared cores costs, with no torch.distributed.

    .venv/bin/python -m benchmarks.investigations.two_processes     # about 5 minutes

The model, batch and LoRA settings are ``split_overhead``'s: the random 8-layer Llama, hidden 512,
seq 256, batch 8, r 8 on all seven projections, 2 intra-op threads, the runtime's malloc tuning.
One process holds stage 0-3 and a copy of stage 4-7. A second process, started with ``spawn``,
holds another copy of stage 4-7. They share two buffers for the hidden states and their gradient,
and a pipe carries the turns. The training steps alternate:

- in-process: stage 0-3 forward, stage 4-7 forward, loss and backward, stage 0-3 backward, both
  optimizer steps, all in the first process;
- cross-process: the same, with stage 4-7 computed in the second process. The hidden states and
  the gradient go through the shared buffers, with one hand-off each way per forward and per backward,
  as in the split runtime's step.

Both kinds of step run in the same seconds, so each pair's ratio is free of the machine's drift.
The second process computes either on its main thread or, as the runtime's server does, on
``runtime.compute``'s thread. A ratio above 1 is what the second process costs: the hand-offs, the
idle side's OpenMP workers spinning on the cores, and two processes' caches on two cores. There is
no RPC, gloo or distributed autograd in it, so comparing with ``split_interleaved`` isolates them.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import psutil
import torch
import torch.multiprocessing as mp

from benchmarks.split_overhead import BATCH, HIDDEN, LAYERS, SEQ
from benchmarks.stats import interval
from models.lora import LoraSpec, add_lora, lora_parameters
from models.loss import target_loss
from models.stages import build_stage
from runtime.config import RuntimeConfig
from runtime.job import tune_malloc
from tests.random_models import save_random_model

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "benchmarks" / "investigations" / "results"
PAIRS, WARMUP, THREADS, CUT = 30, 2, 2, LAYERS // 2
SPEC = LoraSpec(
    r=8,
    alpha=16,
    r_cut=8,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
MALLOC = (RuntimeConfig.malloc_arenas, RuntimeConfig.malloc_keep_mb)  # the runtime's defaults


def stage(model: str, start: int, end: int):
    built = build_stage(model, start, end)
    add_lora(built, SPEC, cut_rank=False)
    optimizer = torch.optim.AdamW(lora_parameters(built.hf), lr=1e-4, fused=True)
    return built, optimizer


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 101, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
    return ids, torch.ones(BATCH, SEQ, dtype=torch.long), ids[:, 1:].int()


def top_half(model: str, conn, hidden: torch.Tensor, grad: torch.Tensor, compute_thread: bool) -> None:
    """The second process: stage CUT..LAYERS, on its main thread or on runtime.compute's thread."""
    from runtime.compute import for_process

    tune_malloc(*MALLOC)
    compute = for_process(torch.device("cpu"), THREADS, server=compute_thread)
    top, optimizer = compute.run(lambda: stage(model, CUT, LAYERS))
    conn.send("ready")
    while (step := conn.recv()) is not None:
        _, mask, targets = batch(step)
        x, loss = compute.run(partial(top_forward, top, hidden, mask, targets))
        conn.send(float(loss.detach()))
        conn.recv()
        compute.run(partial(top_backward, loss, x, grad, optimizer))
        conn.send(None)


def top_forward(top, hidden: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor):
    x = hidden.clone().requires_grad_()
    return x, target_loss(top(hidden=x, attention_mask=mask), targets)[0]


def top_backward(loss: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, optimizer) -> None:
    loss.backward()
    grad.copy_(x.grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(model: str, compute_thread: bool) -> dict:
    torch.set_num_threads(THREADS)
    tune_malloc(*MALLOC)
    bottom, opt_bottom = stage(model, 0, CUT)
    top, opt_top = stage(model, CUT, LAYERS)
    hidden = torch.zeros(BATCH, SEQ, HIDDEN).share_memory_()
    grad = torch.zeros(BATCH, SEQ, HIDDEN).share_memory_()
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=top_half, args=(model, child_conn, hidden, grad, compute_thread))
    child.start()
    try:
        conn.recv()
        times: dict[str, list[float]] = {"in_process": [], "cross_process": []}
        for step in range(2 * (PAIRS + WARMUP)):
            t0 = time.perf_counter()
            ids, mask, targets = batch(step)
            h = bottom(input_ids=ids, attention_mask=mask)
            if step % 2 == 0:
                x = h.detach().requires_grad_()
                target_loss(top(hidden=x, attention_mask=mask), targets)[0].backward()
                g = x.grad
                opt_top.step()
                opt_top.zero_grad(set_to_none=True)
            else:
                hidden.copy_(h.detach())
                conn.send(step)
                conn.recv()  # the loss
                conn.send("backward")
                conn.recv()
                g = grad
            h.backward(g)
            opt_bottom.step()
            opt_bottom.zero_grad(set_to_none=True)
            if step >= 2 * WARMUP:
                times["in_process" if step % 2 == 0 else "cross_process"].append(time.perf_counter() - t0)
        conn.send(None)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    ratios = [c / i for i, c in zip(times["in_process"], times["cross_process"])]
    return {
        "second_process_computes_on": "runtime.compute's thread" if compute_thread else "its main thread",
        "step_s": times,
        "ratio_by_pair": ratios,
        **interval(ratios, "cross_over_in_process"),
    }


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="splitft-two-processes-"))
    model = str(
        save_random_model("llama", tmp / "model", n_layers=LAYERS, hidden=HIDDEN, heads=8, max_len=SEQ)
    )
    settings = [measure(model, compute_thread) for compute_thread in (False, True)]
    result = {
        "command": ".venv/bin/python -m benchmarks.investigations.two_processes",
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {platform.python_version()}",
        "model": f"random Llama, {LAYERS} layers, hidden {HIDDEN}, seq {SEQ}, batch {BATCH}, float32, CPU",
        "pairs": PAIRS,
        "settings": settings,
        "all_pairs": interval([r for s in settings for r in s["ratio_by_pair"]], "cross_over_in_process"),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "two_processes.json").write_text(json.dumps(result, indent=2) + "\n")
    brief = [{k: v for k, v in st.items() if k not in ("step_s", "ratio_by_pair")} for st in settings]
    print(json.dumps({"settings": brief, "all_pairs": result["all_pairs"]}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
