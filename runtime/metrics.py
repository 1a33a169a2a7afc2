"""metrics.jsonl (one JSON object per round, the output contract) and the per-round table."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from runtime.messages import EvalDetails

log = logging.getLogger("splitft")

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


class TensorBoardLog:
    """runtime.tensorboard: every number of each metrics.jsonl row as a TensorBoard scalar, tagged by its
    path in the row (``comm_bytes/1/activations_up``), at step = the round. Made at the first round this
    launch records: on a resumed run its purge step makes TensorBoard drop what an earlier launch wrote
    from that round on (as metrics.jsonl is rewritten from the checkpoint)."""

    def __init__(self, folder: Path, first_round: int):
        from tensorboardX import SummaryWriter  # runtime.config.validate checked that it is installed

        self.writer = SummaryWriter(logdir=str(folder), purge_step=first_round if first_round > 1 else None)

    def write(self, record: dict) -> None:
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, record["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def scalars(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    """(tag, value) of every number in a metrics row (nested mappings joined with "/"; not the round,
    lists, strings or booleans)."""
    out = []
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out += scalars(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and tag != "round":
            out.append((tag, float(value)))
    return out


def write_baseline(out: Path, evaluation: tuple[float, float, float], details: EvalDetails) -> None:
    """baseline.json: the base model's evaluation before any training (round 0), logged too."""
    loss, acc, tokens = evaluation
    log.info("before training: eval_loss %.4f, token accuracy %.4f", loss, acc)
    fields = eval_fields(details)
    g = fields.get("generation")
    if g is not None:
        log.info("before training: exact match %.4f, ROUGE-L %.4f (%d prompts)", *list(g.values())[:3])
    (out / "baseline.json").write_text(
        json.dumps({"eval_loss": loss, "eval_token_accuracy": acc, "eval_tokens": tokens, **fields})
    )


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
    evaluation: tuple[float, float, float] | None,
    input_tokens: float,
    cut_layers: dict,
    comm_bytes: dict,
    **extra: object,
) -> dict:
    """One line of metrics.jsonl: the output contract's fields (listed in the README), then ``extra``. A
    round not evaluated (``eval.every``) has no eval fields."""
    rec = {
        "round": rnd,
        "elapsed_s": round(elapsed, 4),
        "round_time_s": round(round_time, 4),
        "train_loss": train_loss,
    }
    if evaluation is not None:
        eval_loss, eval_acc, eval_tokens = evaluation
        rec.update(
            eval_loss=eval_loss,
            eval_token_accuracy=eval_acc,
            eval_perplexity=perplexity(eval_loss),
            eval_tokens=int(eval_tokens),
        )
    return {
        **rec,
        "tokens_per_s": input_tokens / round_time,
        "cut_layers": cut_layers,
        "comm_bytes": comm_bytes,
        **extra,
    }


def eval_fields(details: EvalDetails | None) -> dict:
    """An evaluated round's fields beyond the contract's: the loss eval's time, each client's loss on its
    held-back samples (``eval.client_fraction``), the generation scores (``eval.generate``)."""
    if details is None:
        return {}
    out: dict = {"eval_time_s": details.time_s}
    if details.clients:
        out["client_eval"] = {
            str(c): {"eval_loss": loss, "eval_token_accuracy": acc, "eval_tokens": int(tokens)}
            for c, (loss, acc, tokens) in sorted(details.clients.items())
        }
    g = details.generation
    if g is not None:
        out["generation"] = {
            "exact_match": g.exact_match,
            "rouge_l": g.rouge_l,
            "samples": g.samples,
            "time_s": g.time_s,
        }
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def header() -> str:
    return " ".join(f"{c:>10}" for c in COLUMNS)


def row(record: dict) -> str:
    comm = record.get("comm_bytes", {})
    up = sum(c["activations_up"] + c["adapters_up"] for c in comm.values()) / 1e6
    down = sum(c["gradients_down"] + c["adapters_down"] for c in comm.values()) / 1e6
    train = record.get("train_loss")
    cell = lambda key, fmt: f"{record[key]:>10{fmt}}" if key in record else f"{'-':>10}"
    cells = [
        f"{record['round']:>10d}",
        f"{train:>10.4f}" if train is not None else f"{'-':>10}",
        cell("eval_loss", ".4f"),
        cell("eval_token_accuracy", ".4f"),
        cell("eval_perplexity", ".2f"),
        f"{record.get('round_time_s', 0.0):>10.2f}",
        f"{record.get('tokens_per_s', 0.0):>10.0f}",
        f"{up:>10.2f}",
        f"{down:>10.2f}",
    ]
    return " ".join(cells)
