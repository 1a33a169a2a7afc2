"""Prints a finished (or running) run's per-round table and what changed since the base model, and
writes plots and a short markdown summary beside the metrics; given several runs, compares them.

    python -m launch.report runs/demo
    python -m launch.report runs/fixed runs/adaptive --out runs/compare [--target 1.2]

One run: writes into OUTPUT_DIR/report/ (or ``--out``): ``eval.png`` (eval loss and token accuracy per
round against the base model), ``cuts.png`` (each client's cut layer over the rounds, for the clients
that trained in each round), ``bytes.png`` (bytes each client moved, by category), ``time.png``
(predicted against measured training time per client and round) and ``summary.md``. A plot whose
data the run does not have (an unsplit ``train_local`` run has no clients or cuts) is left out.

Several runs: writes into ``--out``: ``loss.png`` (eval loss against round and against wall time),
``bytes.png`` (MB moved per round) and ``compare.md``, whose table (final eval loss, time to a target
loss, MB moved) is printed too. Each run is labelled by the settings in which its ``run_config.json``
differs from the others' (its folder name when none does); the target is the lowest eval loss that
every run reaches, unless ``--target`` gives one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.metrics import header, row
from runtime.outdir import read_metrics

CATEGORIES = ("activations_up", "gradients_down", "adapters_up", "adapters_down")


def load(out: Path) -> tuple[list[dict], dict | None]:
    """(metrics records, baseline or None) of a run's output_dir."""
    records = read_metrics(out / "metrics.jsonl")  # a run in progress: a torn last line is skipped
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


def _client_order(client: str) -> tuple:
    return (0, int(client), "") if client.isdigit() else (1, 0, client)


def _clients(records: list[dict]) -> list[str]:
    """Every client that has a cut in some round (a round's ``cut_layers`` holds its participants)."""
    return sorted({c for r in records for c in r.get("cut_layers", {})}, key=_client_order)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def evaluated(records: list[dict]) -> list[dict]:
    """The rounds that were evaluated (``eval.every`` skips some; the last round always is)."""
    return [r for r in records if "eval_loss" in r]


def eval_figure(records: list[dict], baseline: dict | None):
    """Two panels, eval loss and token accuracy per round; each has the run and (dashed) the base model."""
    fig, (loss_ax, acc_ax) = _figure(2, "held-out evaluation of the global model")
    records = evaluated(records)
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
    """One panel, one step line per client: its cut layer (layers it runs) in each round it trained in
    (a gap where it did not). Layers are whole numbers on the axis; each client's line is drawn a few
    points above or below the true value, with a marker of its own, so equal cuts do not hide a line."""
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import offset_copy

    fig, (ax,) = _figure(1, "cut layer of each client")
    rounds = [r["round"] for r in records]
    clients = _clients(records)
    for i, c in enumerate(clients):
        cuts = [r.get("cut_layers", {}).get(c) for r in records]
        (line,) = ax.step(
            rounds,
            [float("nan") if k is None else k for k in cuts],
            where="mid",
            marker=MARKERS[i % len(MARKERS)],
            label=f"client {c}",
        )
        # Shifted once drawn, so the axis limits still come from the true values.
        dy = 3.0 * (i - (len(clients) - 1) / 2)
        line.set_transform(offset_copy(ax.transData, fig=fig, y=dy, units="points"))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
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


def _cut_list(record: dict, clients: list[str]) -> str:
    """``[3, 2, -]``: each client's cut in this round, ``-`` for a client that did not train in it."""
    cuts = record.get("cut_layers", {})
    return "[" + ", ".join(str(cuts[c]) if c in cuts else "-" for c in clients) + "]"


def _moves(records: list[dict]) -> list[int]:
    """Rounds in which some client trained at another cut than the last time it trained."""
    last: dict[str, int] = {}
    rounds = []
    for r in records:
        cuts = r.get("cut_layers", {})
        if any(c in last and last[c] != k for c, k in cuts.items()):
            rounds.append(r["round"])
        last.update(cuts)
    return rounds


def summary(records: list[dict], baseline: dict | None, plots: list[str]) -> str:
    """The run in a few markdown lines, with the plots."""
    last = records[-1]
    lines = [f"# Run summary: {len(records)} rounds in {last['elapsed_s']:.1f} s", ""]
    last = (evaluated(records) or [last])[-1]
    if "eval_loss" not in last:
        lines.append("- no round was evaluated")
    elif baseline is not None:
        drop = 100 * (1 - last["eval_loss"] / baseline["eval_loss"])
        lines.append(
            f"- eval loss {baseline['eval_loss']:.4f} (base model) -> {last['eval_loss']:.4f} "
            f"({drop:.1f}% lower); token accuracy {baseline['eval_token_accuracy']:.4f} -> "
            f"{last['eval_token_accuracy']:.4f}"
        )
    else:
        lines.append(f"- eval loss {last['eval_loss']:.4f}, token accuracy {last['eval_token_accuracy']:.4f}")
    if "generation" in last:
        g, before = last["generation"], (baseline or {}).get("generation")
        was = f"{before['exact_match']:.3f} (base model) -> " if before else ""
        lines.append(
            f"- greedy decoding of {g['samples']} eval prompts: exact match {was}{g['exact_match']:.3f}, "
            f"ROUGE-L {g['rouge_l']:.3f}"
        )
    clients = _clients(records)
    if clients:
        policy = last.get("plan", {}).get("policy", "?")
        lines.append(
            f"- policy {policy}: cut layers (clients {', '.join(clients)}) {_cut_list(records[0], clients)} "
            f"in round {records[0]['round']}, {_cut_list(last, clients)} in round {last['round']}; "
            + (f"moved before round(s) {changes}" if (changes := _moves(records)) else "no move")
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


def write_report(out: Path, folder: Path | None = None) -> Path:
    """Writes the PNGs and summary.md into ``folder`` (default ``out/report``) and returns it."""
    records, baseline = load(out)
    folder = out / "report" if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    figs = figures(records, baseline)
    for name, fig in figs.items():
        fig.savefig(folder / f"{name}.png", dpi=100)
    (folder / "summary.md").write_text(summary(records, baseline, list(figs)))
    return folder


# ---- several runs ----


@dataclass
class Run:
    path: Path
    records: list[dict]
    config: dict | None  # run_config.json (an unsplit train_local run has none)
    label: str = ""

    @property
    def mb_per_round(self) -> list[float]:
        return [sum(sum(c.values()) for c in r.get("comm_bytes", {}).values()) / 1e6 for r in self.records]

    def time_to(self, target: float) -> tuple[float, int] | None:
        """(elapsed seconds, round) of the first round whose eval loss is at most ``target``."""
        return next(
            ((r["elapsed_s"], r["round"]) for r in evaluated(self.records) if r["eval_loss"] <= target), None
        )


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_settings(configs: list[dict | None]) -> list[str]:
    """Dotted keys (``split.policy``) whose values are not the same in every config; ``output_dir``,
    which always differs, is left out."""
    flats = [_flatten(c) for c in configs if c is not None]
    keys = sorted({k for f in flats for k in f} - {"output_dir"})
    return [k for k in keys if len({json.dumps(f.get(k, "(unset)")) for f in flats}) > 1]


def _value(flat: dict[str, object], key: str) -> str:
    value = flat.get(key, "(unset)")
    return value if isinstance(value, str) else json.dumps(value)


def label_runs(runs: list[Run]) -> list[str]:
    """Sets each run's label to ``key=value, ...`` over the settings that differ between the runs (its
    folder name where that says nothing, and appended where two labels would be the same); returns the
    differing keys."""
    keys = differing_settings([r.config for r in runs])
    for run in runs:
        flat = _flatten(run.config) if run.config is not None else None
        run.label = ", ".join(f"{k}={_value(flat, k)}" for k in keys) if flat is not None and keys else ""
        if not run.label:
            run.label = run.path.name
    seen = [r.label for r in runs]
    for run in runs:
        if seen.count(run.label) > 1:
            run.label = f"{run.label} ({run.path.name})" if run.label != run.path.name else str(run.path)
    return keys


def default_target(runs: list[Run]) -> float:
    """The lowest eval loss that every run reaches: the highest of the runs' best losses."""
    return max(min(r["eval_loss"] for r in evaluated(run.records)) for run in runs)


def _overlay_styles(runs: list[Run]) -> list[dict]:
    """A marker of its own per run, and earlier runs drawn wider, so that a run whose curve equals
    another's still shows around it."""
    n = len(runs)
    return [
        {
            "marker": MARKERS[i % len(MARKERS)],
            "linewidth": 1.5 + (n - 1 - i),
            "markersize": 6 + 2 * (n - 1 - i),
            "label": run.label,
        }
        for i, run in enumerate(runs)
    ]


def compare_figures(runs: list[Run]) -> dict:
    """``loss``: eval loss against round and against wall time; ``bytes``: MB moved per round; one
    line per run, labelled with its label."""
    fig, (by_round, by_time) = _figure(2, "eval loss of the global model")
    for run, style in zip(runs, _overlay_styles(runs)):
        records = evaluated(run.records)
        losses = [r["eval_loss"] for r in records]
        by_round.plot([r["round"] for r in records], losses, **style)
        by_time.plot([r["elapsed_s"] for r in records], losses, **style)
    by_round.set_xlabel("round")
    by_time.set_xlabel("wall time (s)")
    for ax in (by_round, by_time):
        ax.set_ylabel("eval loss")
        ax.legend(fontsize="small")
    loss = fig
    fig, (ax,) = _figure(1, "bytes between the clients and the server, per round")
    for run, style in zip(runs, _overlay_styles(runs)):
        ax.plot([r["round"] for r in run.records], run.mb_per_round, **style)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel("MB per round (all clients, both directions)")
    ax.legend(fontsize="small")
    return {"loss": loss, "bytes": fig}


def compare_table(runs: list[Run], target: float) -> str:
    """Markdown: one row per run with its final eval loss, time to ``target`` and MB moved."""
    lines = [
        f"| run | folder | rounds | final eval loss | time to eval loss {target:.4f} | MB moved |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        last = evaluated(run.records)[-1]
        reached = run.time_to(target)
        when = f"{reached[0]:.1f} s (round {reached[1]})" if reached else "not reached"
        lines.append(
            f"| {run.label} | {run.path} | {len(run.records)} | {last['eval_loss']:.4f} | {when} "
            f"| {sum(run.mb_per_round):.1f} |"
        )
    return "\n".join(lines)


def write_comparison(paths: list[Path], folder: Path, target: float | None = None) -> tuple[Path, str]:
    """Writes loss.png, bytes.png and compare.md into ``folder``; returns compare.md's path and the table."""
    runs = []
    for path in paths:
        config = path / "run_config.json"
        runs.append(Run(path, load(path)[0], json.loads(config.read_text()) if config.is_file() else None))
    keys = label_runs(runs)
    target = default_target(runs) if target is None else target
    folder.mkdir(parents=True, exist_ok=True)
    figs = compare_figures(runs)
    for name, fig in figs.items():
        fig.savefig(folder / f"{name}.png", dpi=100)
    table = compare_table(runs, target)
    differ = ", ".join(f"`{k}`" for k in keys) if keys else "nothing in run_config.json (labelled by folder)"
    text = "\n".join(
        [
            f"# Comparison of {len(runs)} runs",
            "",
            f"The runs differ in: {differ}.",
            f"Target eval loss {target:.4f}"
            + (" (the lowest that every run reaches)." if target == default_target(runs) else "."),
            "",
            table,
            "",
            *(f"![{name}]({name}.png)" for name in figs),
            "",
        ]
    )
    (folder / "compare.md").write_text(text)
    return folder / "compare.md", table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="a run's output_dir")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write (needed with several runs)")
    parser.add_argument(
        "--target", type=float, metavar="LOSS", help="the eval loss whose time to reach is compared"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for out in args.runs:
        if not (out / "metrics.jsonl").is_file():
            print(
                f"report error: no metrics.jsonl in {str(out)!r}: is output_dir right, and did round 1 "
                "finish?",
                file=sys.stderr,
            )
            raise SystemExit(2)
    if len(args.runs) > 1:
        if args.out is None:
            parser.error("comparing several runs needs --out DIR (where loss.png, bytes.png, compare.md go)")
        path, table = write_comparison(args.runs, args.out, args.target)
        print(table)
        print(f"\nplots and comparison: {path}")
        return
    if args.target is not None:
        parser.error("--target compares runs: give two or more")
    (out,) = args.runs
    try:
        records, baseline = load(out)
    except ValueError as e:  # a damaged line before the last
        print(f"report error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not records:
        print(f"report error: {str(out / 'metrics.jsonl')!r} holds no complete round yet", file=sys.stderr)
        raise SystemExit(2)
    print(header())
    for record in records:
        print(row(record))
    last = records[-1]
    comm = sum(sum(c.values()) for r in records for c in r["comm_bytes"].values()) / 1e6
    print(
        f"\n{len(records)} rounds in {last['elapsed_s']:.1f}s; cut layers {last['cut_layers']}; "
        f"{comm:.1f} MB moved between clients and server"
    )
    last = (evaluated(records) or [last])[-1]
    if baseline is not None and "eval_loss" in last:
        drop = 100 * (1 - last["eval_loss"] / baseline["eval_loss"])
        print(
            f"eval loss {baseline['eval_loss']:.4f} -> {last['eval_loss']:.4f} ({drop:.1f}% lower); "
            f"token accuracy {baseline['eval_token_accuracy']:.4f} -> {last['eval_token_accuracy']:.4f}"
        )
    print(f"global adapter (PEFT format): {out / 'adapter'}")
    print(f"plots and summary: {write_report(out, args.out)}")


if __name__ == "__main__":
    main()
