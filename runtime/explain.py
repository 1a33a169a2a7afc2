"""The plan in words, for the log: each client's cut and what limits it, the bottleneck, and each re-plan.

Only describes what ``runtime.scheduler`` decided, from the same figures (the probe's, refit from
measurements under ``adaptive``); it decides nothing.
"""

from __future__ import annotations

from collections import Counter

from partition.planner import max_cut
from runtime.scheduler import Scheduler

SHOWN_CLIENTS = 16  # a plan of more clients is summarised by cut, not listed client by client


def describe_plan(scheduler: Scheduler, cuts: list[int]) -> list[str]:
    """One line for the plan, then one per client: cut, speed, memory limit, predicted time."""
    model, headroom = scheduler.model, scheduler.cfg.split.memory_headroom
    clients, _ = scheduler.figures
    pred = scheduler.predict(cuts)
    n = model.n_layers
    fastest = min(c.layer_time_s for c in clients) or 1e-12
    shared = (
        f" ({scheduler.slots} clients train at a time, each planned for its own time)"
        if scheduler.slots is not None
        else ""
    )
    lines = [
        f"plan ({scheduler.policy}): cuts {cuts}, predicted training {pred.round_time_s:.2f}s a round, "
        f"bound by {pred.bottleneck}{shared}"
    ]
    if len(cuts) > SHOWN_CLIENTS:
        by_cut = Counter(cuts)
        lines.append("  clients per cut: " + ", ".join(f"cut {k}: {by_cut[k]}" for k in sorted(by_cut)))
        return lines
    for i, (c, k) in enumerate(zip(clients, cuts)):
        kmax = max_cut(model, c, headroom)
        why = []
        if k == kmax and kmax < n - 1:
            why.append(f"its memory ({c.memory_bytes / 1e9:.2f} GB free) holds at most {kmax}")
        if pred.bottleneck == f"client {i + 1}":
            why.append("the bottleneck")
        lines.append(
            f"  client {i + 1}: cut {k} (layers 0-{k - 1} here, {n - k} on the server); a layer takes "
            f"{c.layer_time_s * 1e3:.1f} ms ({c.layer_time_s / fastest:.1f}x the fastest client); "
            f"memory for up to {kmax} layers; predicted {pred.client_time_s[i]:.2f}s"
            + (f" [{'; '.join(why)}]" if why else "")
        )
    return lines


def describe_replan(
    scheduler: Scheduler, rnd: int, cuts: list[int], new_cuts: list[int] | None
) -> str | None:
    """What the scheduler did after round ``rnd``: a move and its predicted gain, or why it kept the cuts."""
    time_of = lambda p: scheduler.predict(p).round_time_s
    if new_cuts is not None:
        return (
            f"re-plan after round {rnd}: move cuts {cuts} -> {new_cuts} (predicted training "
            f"{time_of(cuts):.2f}s -> {time_of(new_cuts):.2f}s a round under the measured times)"
        )
    a = scheduler.adaptive
    if a is None or rnd % a.every != 0 or rnd >= scheduler.cfg.train.rounds:
        return None
    best = scheduler.best()
    if best == list(cuts):
        return f"re-plan after round {rnd}: keep cuts {cuts} (still the best plan under the measured times)"
    return (
        f"re-plan after round {rnd}: keep cuts {cuts} (best alternative {best} predicted "
        f"{time_of(best):.2f}s against {time_of(cuts):.2f}s: not {a.hysteresis:.0%} faster, or reverted)"
    )
