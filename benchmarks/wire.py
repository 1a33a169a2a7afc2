"""The wire: bytes per step for each wire.dtype, their effect on the demo's eval loss, round trips per
step, U-shaped against standard, and the server under 1, 2, 4 and 8 clients.

    .venv/bin/python -m benchmarks.wire                 # every part; writes benchmarks/results/wire.json
    .venv/bin/python -m benchmarks.wire bytes quality   # only the named parts (bytes quality ushape scaling)

bytes    one client cut at 4 of a random 8-layer Llama (hidden 512, seq 256, batch 8), one round per
         wire.dtype: bytes per training step over the floor 2 x batch x seq x hidden x 4, counted from
         the tensors sent; goals <= 0.51 (bfloat16) and <= 0.27 (int8). Round trips per step: the RPCs
         the server served for the client's steps plus one distributed backward each (goal: 2).
quality  the demo (torchrun_configs/tiny_cpu.yaml: 4 clients, 5 rounds) for each wire.dtype: final eval
         loss against float32's; goals: within 1% (bfloat16), within 2% (int8).
ushape   tokens/s of one client, standard and U-shaped (tail of 1 layer), against launch.train_local,
         alternated twice on the bytes model; goal for standard/unsplit >= 0.97; and bytes per step.
scaling  1, 2, 4 and 8 clients cut at 1 of the bytes model (the server runs 7 layers and the head for
         each): aggregate training tokens/s against the server's own compute rate for one client's
         steps (batch x seq over its median compute per step), and the cores the server process and
         the whole host kept busy while the clients trained (what binds).
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

from benchmarks.split_overhead import overrides, write_text_data
from tests.random_models import save_random_model

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "wire.json"
HIDDEN, LAYERS, SEQ, BATCH = 512, 8, 256, 8
DTYPES = ["float32", "bfloat16", "float16", "int8"]
FLOOR = 2 * BATCH * SEQ * HIDDEN * 4


def model_args(model: Path, data: Path, out: Path, **extra: str) -> list[str]:
    """The one-client setting of ``benchmarks.split_overhead`` (this command's arguments are part names)."""
    return overrides(model, data, out, argv=[], **extra)


def run(cmd: list[str], threads: str = "2") -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def launch(n: int, args: list[str], threads: str = "2") -> float:
    """``torchrun --standalone --nproc_per_node=n -m launch.train ARGS``; returns its wall seconds."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    return run([*torchrun, "-m", "launch.train", *args], threads)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_bytes(rec: dict, rank: str = "1") -> float:
    c, steps = rec["comm_bytes"][rank], rec["clients"][rank]["steps"]
    keys = ("activations_up", "gradients_down", "activations_down", "gradients_up")
    return sum(c.get(k, 0) for k in keys) / steps


def round_trips(rec: dict, rank: str = "1") -> float:
    """RPCs the server served for the client's steps (one forward call each; the optimizer step needs
    none) plus the distributed backward of each step, per step."""
    calls, steps = rec["clients"][rank]["server_calls"], rec["clients"][rank]["steps"]
    return sum(calls.values()) / steps


def part_bytes(tmp: Path, model: Path, data: Path) -> dict:
    out = {}
    for dtype in DTYPES:
        o = tmp / f"bytes_{dtype}"
        launch(
            2,
            model_args(model, data, o, **{"split.cut_layers": "4", "wire.dtype": dtype, "train.rounds": "1"}),
        )
        rec = records(o)[-1]
        out[dtype] = {"bytes_per_step": step_bytes(rec), "ratio_over_floor": step_bytes(rec) / FLOOR}
        out[dtype]["round_trips_per_step"] = round_trips(rec)
    return {"floor": FLOOR, "by_dtype": out}


def part_quality(tmp: Path) -> dict:
    out = {}
    for dtype in DTYPES:
        o = tmp / f"demo_{dtype}"
        wall = launch(5, ["torchrun_configs/tiny_cpu.yaml", f"output_dir={o}", f"wire.dtype={dtype}"], "1")
        rec = records(o)
        out[dtype] = {
            "eval_loss": [r["eval_loss"] for r in rec],
            "final_eval_loss": rec[-1]["eval_loss"],
            "bytes_per_step_client1": step_bytes(rec[-1]),
            "wall_s": wall,
        }
    base = out["float32"]["final_eval_loss"]
    for dtype in DTYPES:
        out[dtype]["final_vs_float32"] = out[dtype]["final_eval_loss"] / base - 1
    return out


def part_ushape(tmp: Path, model: Path, data: Path) -> dict:
    tps: dict[str, list[float]] = {"local": [], "standard": [], "u_shape": []}
    per_step: dict[str, float] = {}
    for i in range(2):
        o = tmp / f"local{i}"
        run([sys.executable, "-m", "launch.train_local", *model_args(model, data, o)])
        tps["local"].append(records(o)[-1]["tokens_per_s"])
        for mode in ("standard", "u_shape"):
            o = tmp / f"{mode}{i}"
            tail = "1" if mode == "u_shape" else "0"
            extra = {"split.cut_layers": "4", "split.mode": mode, "split.tail_layers": tail}
            launch(2, model_args(model, data, o, **extra))
            rec = records(o)[-1]
            tps[mode].append(rec["tokens_per_s"])
            per_step[mode] = step_bytes(rec)
    ratio = lambda mode: statistics.median(s / u for s, u in zip(tps[mode], tps["local"]))
    return {
        "tokens_per_s": tps,
        "standard_over_unsplit": ratio("standard"),
        "u_shape_over_unsplit": ratio("u_shape"),
        "bytes_per_step": per_step,
        "u_shape_bytes_over_standard": per_step["u_shape"] / per_step["standard"],
    }


def part_scaling(tmp: Path, model: Path, data: Path) -> dict:
    out = {}
    for n in (1, 2, 4, 8):
        o = tmp / f"scale{n}"
        extra = {"split.cut_layers": "1", "train.local_steps": "4", "runtime.intra_op_threads": "1"}
        launch(n + 1, model_args(model, data, o, **extra), "1")
        rec = records(o)[-1]
        clients = rec["clients"].values()
        tokens = BATCH * SEQ * sum(c["steps"] for c in clients)
        train_s = max(c["train_time_s"] for c in clients)
        server_s = [c["server_s"] for c in clients if c.get("server_s")]
        out[str(n)] = {
            "aggregate_tokens_per_s": tokens / train_s,
            "server_compute_s_per_step": statistics.median(server_s),
            "client_step_s": statistics.median(c["step_time_s"] for c in clients),
            # what binds: the server process near one core with host cores idle is the GIL or its
            # threads; every host core busy is the machine
            "server_cores_used": rec["server"]["train_cores_used"],
            "host_cores_busy": rec["server"]["host_cores_busy"],
        }
    capacity = BATCH * SEQ / out["1"]["server_compute_s_per_step"]
    for v in out.values():
        v["over_server_capacity"] = v["aggregate_tokens_per_s"] / capacity
    return {"server_capacity_tokens_per_s": capacity, "by_clients": out}


def main() -> None:
    parts = sys.argv[1:] or ["bytes", "quality", "ushape", "scaling"]
    tmp = Path(tempfile.mkdtemp(prefix="splitft-wire-"))
    model = save_random_model("llama", tmp / "model", n_layers=LAYERS, hidden=HIDDEN, heads=8, max_len=SEQ)
    data = tmp / "train.txt"
    write_text_data(data, 400)
    result = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for part in parts:
        t0 = time.perf_counter()
        if part == "bytes":
            result["bytes"] = part_bytes(tmp, model, data)
        elif part == "quality":
            result["quality"] = part_quality(tmp)
        elif part == "ushape":
            result["ushape"] = part_ushape(tmp, model, data)
        elif part == "scaling":
            result["scaling"] = part_scaling(tmp, model, data)
        else:
            raise SystemExit(f"unknown part {part!r}: use bytes, quality, ushape or scaling")
        print(part, f"{time.perf_counter() - t0:.0f}s", json.dumps(result[part], indent=1), flush=True)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    result["command"] = ".venv/bin/python -m benchmarks.wire " + " ".join(parts)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
