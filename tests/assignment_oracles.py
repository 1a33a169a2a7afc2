"""Reference answers for the assignment of a round's clients to workers (``partition.sampling``), for
tests/test_sampling.py and benchmarks/assignment.py: when a round ends under fixed lists, under
longest-first alone, under the best split (brute force) and under the dynamic queue."""

from __future__ import annotations

import heapq
import itertools

from partition.sampling import WorkQueue


def makespan(assigned: dict[int, list[int]], times: dict[int, float]) -> float:
    """When the round ends with each worker training its list one client after another."""
    return max(sum(times[c] for c in cs) for cs in assigned.values())


def longest_first(times: dict[int, float], m: int) -> float:
    """The round's end under longest-first alone (LPT) on ``m`` workers."""
    load = [0.0] * m
    for c in sorted(times, key=lambda c: (-times[c], c)):
        load[load.index(min(load))] += times[c]
    return max(load)


def best_split(times: dict[int, float], m: int) -> float:
    """The round's earliest end on ``m`` workers, by brute force over all ``m ** len(times)`` splits."""
    return min(
        max(sum(times[c] for c, w in zip(times, ws) if w == k) for k in range(m))
        for ws in itertools.product(range(m), repeat=len(times))
    )


def play(queue: WorkQueue, actual: dict[int, float], workers: list[int]) -> float:
    """A round under the queue: each worker asks it when it is free; returns when the last client ends."""
    free = [(0.0, w) for w in workers]
    end = 0.0
    while free:
        now, w = heapq.heappop(free)
        c, wait = queue.take(w, now)
        if c is not None:
            heapq.heappush(free, (now + actual[c], w))
            end = max(end, now + actual[c])
        elif wait > 0:
            heapq.heappush(free, (now + wait, w))
    return end
