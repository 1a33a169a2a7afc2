"""AdamW's step on a LoRA adapter: the default per-tensor loop, foreach, and fused (make_optimizer's).

    .venv/bin/python -m benchmarks.investigations.optimizer_step

takes seconds and writes benchmarks/investigations/results/optimizer_step.json.

The adapter is that of a four-layer stage of ``split_overhead``'s model (hidden 512, r = 8, the seven
projections of a Llama layer: 56 tensors) and of the whole eight layers (112), on 2 intra-op threads;
each figure is the mean of 50 steps after 3 warm-up steps, every implementation in this one process.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import psutil
import torch

from benchmarks.split_overhead import HIDDEN

OUT = Path(__file__).resolve().parent / "results"

INTERMEDIATE, R = 2 * HIDDEN, 8  # save_random_model's MLP width, and lora.r
PROJECTIONS = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTERMEDIATE)] * 2 + [(INTERMEDIATE, HIDDEN)]  # (in, out)


def adapter(layers: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(layers):
        for fan_in, fan_out in PROJECTIONS:
            for shape in ((R, fan_in), (fan_out, R)):
                p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.01)
                p.grad = torch.randn(shape, generator=gen)
                params.append(p)
    return params


def step_ms(layers: int, **kwargs) -> float:
    params = adapter(layers)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kwargs)
    for _ in range(3):
        opt.step()
    t0 = time.perf_counter()
    for _ in range(50):
        opt.step()
    return (time.perf_counter() - t0) / 50 * 1000


def main() -> None:
    torch.set_num_threads(2)
    kinds = {
        "loop (default on CPU)": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }
    result = {
        "command": ".venv/bin/python -m benchmarks.investigations.optimizer_step",
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, torch {torch.__version__}",
        "step_ms": {
            f"{layers} layers ({2 * len(PROJECTIONS) * layers} tensors)": {
                name: step_ms(layers, **kw) for name, kw in kinds.items()
            }
            for layers in (4, 8)
        },
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "optimizer_step.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
