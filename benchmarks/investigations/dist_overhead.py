"""What torch.distributed's threads cost a process that computes, measured on the unsplit trainer.

    .venv/bin/python -m benchmarks.investigations.dist_overhead runtime_world   # about 14 minutes
    .venv/bin/python -m benchmarks.investigations.dist_overhead gloo_world      # about 13 minutes

each writing ``benchmarks/investigations/results/dist_overhead__<variant>.json``.

Job A is ``launch.train_local`` alone (``split_overhead``'s model, data and settings, 12 rounds). Job B is
the same trainer with

- ``runtime_world``: every thread the runtime starts in its processes, inside the trainer's process: it
  runs on rank 0 of a 2-rank world started by ``runtime.dist.start`` (gloo group, TensorPipe RPC with
  the runtime's defaults), rank 1 idle;
- ``gloo_world``: an idle 2-process gloo group beside it, nothing but gloo's loop threads (each wakes
  100 times a second): the wake-ups a split process's computing threads see, without the split.

Both jobs run at once and take turns on the cores, as in ``split_interleaved`` (same ``Job`` and
turns); rounds 2-12 of A and B are paired, 2 repeats alternating which job starts. Reported: B / A
per repeat and over all pairs, geometric mean and 95% interval.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.investigations.split_interleaved import OUT, Job, interleave, round_rates
from benchmarks.split_overhead import HIDDEN, LAYERS, SEQ, overrides, write_text_data
from benchmarks.stats import interval
from tests.random_models import save_random_model

ROUNDS, REPEATS = 12, 2
VARIANTS = ("runtime_world", "gloo_world")


def in_runtime_world(argv: list[str]) -> None:
    """Under torchrun: the unsplit trainer on rank 0 of a runtime world; rank 1 waits at the end."""
    from runtime import dist
    from runtime.config import RuntimeConfig

    rt = RuntimeConfig()
    world = dist.start("cpu", rt.rpc_timeout_s, rt.round_timeout_s, rt.rpc_threads, rt.rpc_transports)
    if world.rank == 0:
        from launch.train_local import main

        main(argv)
    dist.barrier(world)
    dist.stop(world)


def idle_gloo(rank: int, store: str) -> None:
    """One rank of an idle 2-process gloo group, until it is killed."""
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    td.barrier()
    time.sleep(10**6)


def commands(variant: str, model: Path, data: Path, a: Path, b: Path, store: Path) -> tuple[list, list]:
    py = sys.executable
    args = lambda out: overrides(model, data, out, argv=[], **{"train.rounds": str(ROUNDS)})  # noqa: E731
    alone = [py, "-m", "launch.train_local", *args(a)]
    if variant == "runtime_world":
        run = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        return alone, [py, *run, "-m", "benchmarks.investigations.dist_overhead", "_in_world", *args(b)]
    idle = f"{py} -m benchmarks.investigations.dist_overhead _idle_gloo"
    trainer = " ".join([py, "-m", "launch.train_local", *args(b)])
    script = f"{idle} 0 {store} & P0=$!; {idle} 1 {store} & P1=$!; {trainer}; c=$?; kill $P0 $P1; exit $c"
    return alone, ["bash", "-c", script]


def main(variant: str) -> None:
    if variant not in VARIANTS:
        raise SystemExit(f"usage: python -m benchmarks.investigations.dist_overhead {{{','.join(VARIANTS)}}}")
    tmp = Path(tempfile.mkdtemp(prefix="splitft-dist-overhead-"))
    model = save_random_model("llama", tmp / "model", n_layers=LAYERS, hidden=HIDDEN, heads=8, max_len=SEQ)
    data = tmp / "train.txt"
    write_text_data(data, 400)
    repeats = []
    for i in range(REPEATS):
        a_cmd, b_cmd = commands(variant, model, data, tmp / f"a{i}", tmp / f"b{i}", tmp / f"store{i}")
        a, b = Job("A", a_cmd, tmp / f"a{i}"), Job("B", b_cmd, tmp / f"b{i}")
        jobs = [a, b] if i % 2 == 0 else [b, a]
        try:
            interleave(jobs)
        except BaseException:
            for job in jobs:
                job.kill()
            raise
        rates = round_rates(jobs)
        ratios = [y / x for x, y in zip(rates["A"], rates["B"])]
        repeats.append({"first": jobs[0].name, "ratio_by_round": ratios, **interval(ratios)})
        print(json.dumps(repeats[-1]), flush=True)
    result = {
        "command": f".venv/bin/python -m benchmarks.investigations.dist_overhead {variant}",
        "variant": variant,
        "method": f"B / A, both alive, split_interleaved's turns, rounds 2..{ROUNDS} paired, "
        f"{REPEATS} repeats",
        "repeats": repeats,
        "all_rounds": interval([r for rep in repeats for r in rep["ratio_by_round"]]),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"dist_overhead__{variant}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["all_rounds"], indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_in_world"]:
        in_runtime_world(sys.argv[2:])
    elif sys.argv[1:2] == ["_idle_gloo"]:
        idle_gloo(int(sys.argv[2]), sys.argv[3])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "")
