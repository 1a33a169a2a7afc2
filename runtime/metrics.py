"""metrics.jsonl (one JSON object per round, the output contract) and the per-round table."""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

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
