"""metrics.jsonl (one JSON object per round, the output contract) and the per-round table."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

import psutil

COLUMNS = ("round", "train_loss", "eval_loss", "eval_acc", "eval_ppl", "round_s", "tok/s", "up_MB", "down_MB")


class MetricsWriter:
    """Appends one line per round. On resume the file is rewritten (atomically) from the records the
    checkpoint holds, so rounds recomputed after it, or a half-written last line, leave no trace."""

    def __init__(self, path: Path, records: list[dict]):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class CpuUsage:
    """Cores this process and the whole host kept busy from construction to ``stop()``: what binds a server
    under many clients (its process near one core while the host has cores idle: the GIL or its threads;
    the host's cores all busy: the machine)."""

    def __init__(self):
        self.t0, self.cpu0, self.host0 = time.perf_counter(), time.process_time(), psutil.cpu_times()

    def stop(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        host = psutil.cpu_times()
        total = sum(host) - sum(self.host0)
        idle = sum(getattr(host, f) - getattr(self.host0, f) for f in ("idle", "iowait") if hasattr(host, f))
        cores = psutil.cpu_count() or 1
        return {
            "train_cores_used": (time.process_time() - self.cpu0) / wall,
            "host_cores_busy": cores * (total - idle) / total if total > 0 else 0.0,
            "host_cores": cores,
        }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def round_record(
    rnd: int,
    elapsed: float,
    round_time: float,
    train_loss: float,
    evaluation: tuple[float, float, float],
    input_tokens: float,
    cut_layers: dict,
    comm_bytes: dict,
    **extra: object,
) -> dict:
    """One line of metrics.jsonl: the output contract's fields (listed in the README), then ``extra``."""
    eval_loss, eval_acc, eval_tokens = evaluation
    return {
        "round": rnd,
        "elapsed_s": round(elapsed, 4),
        "round_time_s": round(round_time, 4),
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "eval_token_accuracy": eval_acc,
        "eval_perplexity": perplexity(eval_loss),
        "eval_tokens": int(eval_tokens),
        "tokens_per_s": input_tokens / round_time,
        "cut_layers": cut_layers,
        "comm_bytes": comm_bytes,
        **extra,
    }


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def header() -> str:
    return " ".join(f"{c:>10}" for c in COLUMNS)


def row(record: dict) -> str:
    comm = record.get("comm_bytes", {})
    up = sum(c["activations_up"] + c["adapters_up"] for c in comm.values()) / 1e6
    down = sum(c["gradients_down"] + c["adapters_down"] for c in comm.values()) / 1e6
    train = record.get("train_loss")
    cells = [
        f"{record['round']:>10d}",
        f"{train:>10.4f}" if train is not None else f"{'-':>10}",
        f"{record['eval_loss']:>10.4f}",
        f"{record['eval_token_accuracy']:>10.4f}",
        f"{record['eval_perplexity']:>10.2f}",
        f"{record.get('round_time_s', 0.0):>10.2f}",
        f"{record.get('tokens_per_s', 0.0):>10.0f}",
        f"{up:>10.2f}",
        f"{down:>10.2f}",
    ]
    return " ".join(cells)
