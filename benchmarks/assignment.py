"""How good the assignment of a round's clients to workers is, on exact and on wrong predictions.

    .venv/bin/python -m benchmarks.assignment     # a few seconds; writes results/assignment.json

Pure arithmetic on predicted and actual client times (``partition.sampling``), no training:

search   300 random rounds (1-9 clients, 1-4 workers, lognormal times; seed 0): the predicted
         assignment (longest first, then moves and swaps) and longest-first alone, each as a multiple of
         the best split found by brute force (where that is at most 6,561 splits).
queue    300 random rounds (1-12 clients, 1-4 workers; seed 1) whose actual times are the predictions
         times a lognormal(0, 1) factor: the round's end under the static lists over its end under
         ``split.assignment=dynamic`` (``WorkQueue``), both on the actual times.
draws    the best a perfect split can do against round-robin for 8 of 100 clients on 2 workers, on exact
         times ``1 + a * slowdown`` (``a``: the client's share of a step at 1x), averaged over 4,000
         draws: for the slowdown draw ``benchmarks.many_clients hetero`` runs (the runtime's
         ``{lognormal: 1}``, as recorded in results/many_clients.json) and for ``max(1, lognormal(0, 1))``.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from datetime import date
from pathlib import Path

from partition.sampling import WorkQueue, assign_clients, round_robin
from tests.assignment_oracles import best_split, longest_first, makespan, play

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "assignment.json"


def search_part() -> dict:
    rng = random.Random(0)
    ours, lpt = [], []
    for _ in range(300):
        n, m = rng.randint(1, 9), rng.randint(1, 4)
        t = {c: round(rng.lognormvariate(0, 1), 3) for c in range(1, n + 1)}
        _, load = assign_clients(list(t), t, list(range(1, m + 1)))
        if m**n <= 6561:
            b = best_split(t, m)
            ours.append(max(load.values()) / b)
            lpt.append(longest_first(t, m) / b)
    return {
        "rounds_with_a_brute_force_best": len(ours),
        "predicted_over_best": {"mean": statistics.mean(ours), "worst": max(ours)},
        "longest_first_over_best": {"mean": statistics.mean(lpt), "worst": max(lpt)},
    }


def queue_part() -> dict:
    rng = random.Random(1)
    gains = []
    for _ in range(300):
        n, m = rng.randint(1, 12), rng.randint(1, 4)
        workers = list(range(1, m + 1))
        t = {c: round(rng.lognormvariate(0, 1), 3) for c in range(1, n + 1)}
        assigned, _ = assign_clients(list(t), t, workers)
        actual = {c: t[c] * rng.lognormvariate(0, 1) for c in t}
        gains.append(makespan(assigned, actual) / play(WorkQueue(assigned, t), actual, workers))
    return {"static_over_dynamic": {"mean": statistics.mean(gains), "min": min(gains), "max": max(gains)}}


def perfect_over_round_robin(slowdown: list[float], share: float) -> float:
    ratios = []
    for r in range(4000):
        drawn = sorted(random.Random(r).sample(range(1, len(slowdown) + 1), 8))
        t = {c: 1 + share * slowdown[c - 1] for c in drawn}
        rr = makespan(round_robin(drawn, [1, 2]), t)
        ratios.append(rr / best_split(t, 2))
    return statistics.mean(ratios)


def draws_part() -> dict:
    recorded = json.loads((REPO / "benchmarks" / "results" / "many_clients.json").read_text())
    rng = random.Random(0)
    draws = {
        "runtime {lognormal: 1}": recorded["hetero"]["slowdown"]["values"],
        "max(1, lognormal(0, 1))": [round(max(1.0, math.exp(rng.gauss(0.0, 1.0))), 3) for _ in range(100)],
    }
    return {
        name: {
            "median_slowdown": statistics.median(s),
            "largest_slowdown": max(s),
            **{f"share_{a}": perfect_over_round_robin(s, a) for a in (0.25, 1.0)},
        }
        for name, s in draws.items()
    }


def main() -> None:
    result = {"search": search_part(), "queue": queue_part(), "draws": draws_part()}
    result["command"] = ".venv/bin/python -m benchmarks.assignment"
    result["date"] = date.today().isoformat()
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
