"""Prints a finished (or running) run's per-round table and what changed since the base model, and
writes plots and a short markdown summary beside the metrics.

    python -m launch.report runs/demo

Writes into OUTPUT_DIR/report/: ``eval.png`` (eval loss and token accuracy per round against the base
model), ``cuts.png`` (each client's cut layer over the rounds), ``bytes.png`` (bytes each client moved,
by category), ``time.png`` (predicted against measured training time per client and round) and
``summary.md``. A plot whose data the run does not have (an unsplit ``train_local`` run has no
clients or cuts) is left out.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from runtime.metrics import header, row

CATEGORIES = ("activations_up", "gradients_down", "adapters_up", "adapters_down")


def load(out: Path) -> tuple[list[dict], dict | None]:
    """(metrics records, baseline or None) of a run's output_dir."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    baseline = out / "baseline.json"
    return records, json.loads(baseline.read_text()) if baseline.is_file() else None


def _figure(panels: int, title: str):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.5 * panels, 4.0), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return fig, list(axes)


def _clients(records: list[dict]) -> list[str]:
    return sorted({c for r in records for c in r.get("cut_layers", {})}, key=int)


def eval_figure(records: list[dict], baseline: dict | None):
    """Two panels, eval loss and token accuracy per round; each has the run and (dashed) the base model."""
    fig, (loss_ax, acc_ax) = _figure(2, "held-out evaluation of the global model")
    rounds = [r["round"] for r in records]
    for ax, key, label in (
        (loss_ax, "eval_loss", "eval loss"),
        (acc_ax, "eval_token_accuracy", "token accuracy"),
    ):
        ax.plot(rounds, [r[key] for r in records], marker="o", label="fine-tuned")
        if baseline is not None:
            ax.axhline(baseline[key], linestyle="--", color="gray", label="base model")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.legend()
    return fig


def cuts_figure(records: list[dict]):
    """One panel, one step line per client: its cut layer (layers it runs) in each round."""
    fig, (ax,) = _figure(1, "cut layer of each client")
    rounds = [r["round"] for r in records]
    for c in _clients(records):
        ax.step(
            rounds, [r["cut_layers"].get(c) for r in records], where="mid", marker="o", label=f"client {c}"
        )
    ax.set_xlabel("round")
    ax.set_ylabel("cut layer k (client runs layers 0..k-1)")
    ax.legend()
    return fig


def bytes_figure(records: list[dict]):
    """One panel of stacked bars, one bar per client, one series per category (MB over the whole run)."""
    fig, (ax,) = _figure(1, "bytes between each client and the server")
    clients = _clients(records)
    bottom = [0.0] * len(clients)
    for cat in CATEGORIES:
        mb = [sum(r["comm_bytes"].get(c, {}).get(cat, 0) for r in records) / 1e6 for c in clients]
        ax.bar([f"client {c}" for c in clients], mb, bottom=bottom, label=cat.replace("_", " "))
        bottom = [b + m for b, m in zip(bottom, mb)]
    ax.set_ylabel("MB over all rounds")
    ax.legend()
    return fig


def time_figure(records: list[dict]):
    """One panel: each client's predicted (x) against measured (y) training time per round; y = x dashed."""
    fig, (ax,) = _figure(1, "predicted against measured training time per round")
    top = 0.0
    for c in _clients(records):
        pairs = [
            (r["clients"][c]["predicted_time_s"], r["clients"][c]["train_time_s"])
            for r in records
            if "predicted_time_s" in r.get("clients", {}).get(c, {})
        ]
        if pairs:
            ax.scatter(*zip(*pairs), label=f"client {c}")
            top = max(top, *(max(p) for p in pairs))
    ax.plot([0, top], [0, top], linestyle="--", color="gray", label="predicted = measured")
    ax.set_xlabel("predicted (s)")
    ax.set_ylabel("measured (s)")
    ax.legend()
    return fig


def figures(records: list[dict], baseline: dict | None) -> dict:
    """name -> matplotlib Figure, for the plots this run has data for."""
    out = {"eval": eval_figure(records, baseline)}
    if _clients(records):
        out["cuts"] = cuts_figure(records)
        out["bytes"] = bytes_figure(records)
        if any("predicted_time_s" in c for r in records for c in r.get("clients", {}).values()):
            out["time"] = time_figure(records)
    return out


def summary(records: list[dict], baseline: dict | None, plots: list[str]) -> str:
    """The run in a few markdown lines, with the plots."""
    last = records[-1]
    lines = [f"# Run summary: {len(records)} rounds in {last['elapsed_s']:.1f} s", ""]
    if baseline is not None:
        drop = 100 * (1 - last["eval_loss"] / baseline["eval_loss"])
        lines.append(
            f"- eval loss {baseline['eval_loss']:.4f} (base model) -> {last['eval_loss']:.4f} "
            f"({drop:.1f}% lower); token accuracy {baseline['eval_token_accuracy']:.4f} -> "
            f"{last['eval_token_accuracy']:.4f}"
        )
    else:
        lines.append(f"- eval loss {last['eval_loss']:.4f}, token accuracy {last['eval_token_accuracy']:.4f}")
    clients = _clients(records)
    if clients:
        cuts = [tuple(r["cut_layers"][c] for c in clients) for r in records]
        changes = [records[i]["round"] for i in range(1, len(cuts)) if cuts[i] != cuts[i - 1]]
        policy = last.get("plan", {}).get("policy", "?")
        lines.append(
            f"- policy {policy}: cut layers (clients {', '.join(clients)}) {list(cuts[0])} in round 1, "
            f"{list(cuts[-1])} in round {last['round']}; "
            + (f"moved before round(s) {changes}" if changes else "no move")
        )
        bottlenecks = sorted({r["plan"]["bottleneck"] for r in records if "plan" in r})
        if bottlenecks:
            lines.append(f"- predicted bottleneck: {', '.join(bottlenecks)}")
        total = {
            c: sum(sum(r["comm_bytes"][c].values()) for r in records if c in r["comm_bytes"]) for c in clients
        }
        lines.append("- MB moved: " + ", ".join(f"client {c} {b / 1e6:.1f}" for c, b in total.items()))
        errors = [
            abs(p["predicted_time_s"] - p["train_time_s"]) / p["train_time_s"]
            for r in records[1:]
            for p in r["clients"].values()
            if "predicted_time_s" in p and p["train_time_s"] > 0
        ]
        if errors:
            lines.append(
                f"- predicted training time off by {100 * statistics.median(errors):.0f}% (median, rounds 2+)"
            )
    lines += ["", *(f"![{name}]({name}.png)" for name in plots), ""]
    return "\n".join(lines)


def write_report(out: Path) -> Path:
    """Writes the PNGs and summary.md into ``out/report`` and returns that folder."""
    records, baseline = load(out)
    folder = out / "report"
    folder.mkdir(exist_ok=True)
    figs = figures(records, baseline)
    for name, fig in figs.items():
        fig.savefig(folder / f"{name}.png", dpi=100)
    (folder / "summary.md").write_text(summary(records, baseline, list(figs)))
    return folder


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    out = Path(args[0])
    path = out / "metrics.jsonl"
    if not path.is_file():
        print(
            f"report error: no metrics.jsonl in {str(out)!r}: is output_dir right, and did round 1 finish?",
            file=sys.stderr,
        )
        raise SystemExit(2)
    records, baseline = load(out)
    print(header())
    for record in records:
        print(row(record))
    last = records[-1]
    comm = sum(sum(c.values()) for r in records for c in r["comm_bytes"].values()) / 1e6
    print(
        f"\n{len(records)} rounds in {last['elapsed_s']:.1f}s; cut layers {last['cut_layers']}; "
        f"{comm:.1f} MB moved between clients and server"
    )
    if baseline is not None:
        drop = 100 * (1 - last["eval_loss"] / baseline["eval_loss"])
        print(
            f"eval loss {baseline['eval_loss']:.4f} -> {last['eval_loss']:.4f} ({drop:.1f}% lower); "
            f"token accuracy {baseline['eval_token_accuracy']:.4f} -> {last['eval_token_accuracy']:.4f}"
        )
    print(f"global adapter (PEFT format): {out / 'adapter'}")
    print(f"plots and summary: {write_report(out)}")


if __name__ == "__main__":
    main()
