"""Which clients train in a round: a seeded draw without replacement, the same on every rank.

The draw depends only on the run's seed, the round and the clients' sample counts, never on the
process that computes it, so every rank draws the same clients without a message, and a relaunch
that resumes round ``r`` draws what the uninterrupted run drew.
"""

from __future__ import annotations

import numpy as np

SAMPLING_STREAM = 0x5A4D  # keeps the draw's generator apart from every other seeded stream


def sample_clients(
    seed: int, rnd: int, counts: dict[int, int], k: int | None, by: str = "uniform"
) -> list[int]:
    """The clients (sorted ids) that train in round ``rnd``: ``k`` of ``counts``' clients (all if ``k`` is
    None or covers them), drawn uniformly or, ``by="by_samples"``, in proportion to their sample counts."""
    clients = sorted(counts)
    if k is None or k >= len(clients):
        return clients
    if k < 1:
        raise ValueError(f"k={k}: a round needs at least one client")
    rng = np.random.default_rng([seed, rnd, SAMPLING_STREAM])
    p = None
    if by == "by_samples":
        total = sum(counts[c] for c in clients)
        p = np.array([counts[c] / total for c in clients])
    elif by != "uniform":
        raise ValueError(f"client sampling {by!r}: use uniform or by_samples")
    chosen = rng.choice(len(clients), size=k, replace=False, p=p)
    return sorted(clients[i] for i in chosen)


def round_weights(counts: dict[int, int], participants: list[int]) -> dict[int, float]:
    """Each client's weight in the round's aggregate: its share of the participants' samples, 0 if it sat
    the round out."""
    total = sum(counts[c] for c in participants)
    return {c: (counts[c] / total if c in participants else 0.0) for c in sorted(counts)}


def assign_clients(
    participants: list[int], predicted_s: dict[int, float], workers: list[int]
) -> tuple[dict[int, list[int]], dict[int, float]]:
    """Which worker trains which of the round's clients, one after another: the longest predicted client
    first onto the least loaded worker (LPT; ties: the lower client id, the lower worker), then single
    moves and pairwise swaps off the busiest worker while one lowers the round's predicted time (LPT
    alone can be a third over the best; the search ends at a point no move or swap improves). Returns
    each worker's clients in the order it trains them (longest first), and its predicted busy time.
    Depends only on its arguments, so every rank that computes it gets the same assignment."""
    load = {w: 0.0 for w in workers}
    assigned: dict[int, list[int]] = {w: [] for w in workers}
    for c in sorted(participants, key=lambda c: (-predicted_s[c], c)):
        w = min(workers, key=lambda w: (load[w], w))
        assigned[w].append(c)
        load[w] += predicted_s[c]
    for _ in range(len(participants) ** 2):  # each step lowers the busiest load or the count at it
        if not _improve(assigned, load, predicted_s):
            break
    for w in workers:
        assigned[w].sort(key=lambda c: (-predicted_s[c], c))
    return assigned, load


def _improve(assigned: dict[int, list[int]], load: dict[int, float], t: dict[int, float]) -> bool:
    """One move or swap that takes work off the busiest worker without making another as busy (the
    first found, in worker and client id order); False if there is none."""
    busiest = max(sorted(load), key=lambda w: load[w])
    top = load[busiest]
    eps = 1e-9 * max(top, 1.0)
    for w in sorted(load):
        if w == busiest:
            continue
        for c in sorted(assigned[busiest]):
            if load[w] + t[c] < top - eps:
                assigned[busiest].remove(c)
                assigned[w].append(c)
                load[busiest] -= t[c]
                load[w] += t[c]
                return True
            for d in sorted(assigned[w]):
                gain = t[c] - t[d]
                if gain > eps and load[w] + gain < top - eps:
                    assigned[busiest][assigned[busiest].index(c)] = d
                    assigned[w][assigned[w].index(d)] = c
                    load[busiest] -= gain
                    load[w] += gain
                    return True
    return False


class WorkQueue:
    """A round's assignment as workers take it up (``split.assignment=dynamic``): each worker takes the
    next client of its own list; a worker whose list is done takes a client that has not started from
    the worker predicted to finish last, if it would finish that client no later than that worker would
    finish everything. With exact predictions that never ends the round later; a client much slower
    than predicted (one not measured yet) no longer holds up the clients queued behind it.

    Times are seconds from the round's start, in the predictions' units (measured training times).
    Pure: the caller serialises calls and passes the clock."""

    def __init__(self, assigned: dict[int, list[int]], predicted_s: dict[int, float]) -> None:
        self.queued = {w: list(cs) for w, cs in assigned.items()}
        self.t = predicted_s
        self.running: dict[int, tuple[int, float]] = {}  # worker -> (client, when it started)
        self.trained_by: dict[int, int] = {}  # client -> the worker that took it
        self.moved: list[tuple[int, int, int]] = []  # (client, from worker, to worker)

    def predicted_end(self, w: int, now: float) -> float:
        """When worker ``w`` is predicted to finish its current client and its queue (a client running
        past its prediction is taken to end now)."""
        end = now
        if w in self.running:
            c, start = self.running[w]
            end = max(now, start + self.t[c])
        return end + sum(self.t[c] for c in self.queued[w])

    def take(self, worker: int, now: float) -> tuple[int | None, float]:
        """What ``worker``, free at ``now``, does next: ``(client, 0)`` trains that client; ``(None, s)``:
        nothing is worth taking now, ask again in ``s`` seconds (when a running client is predicted to
        end); ``(None, 0)``: nothing is left for it this round."""
        self.running.pop(worker, None)
        if self.queued[worker]:
            c = self.queued[worker].pop(0)
        else:
            others = [w for w in sorted(self.queued) if w != worker and self.queued[w]]
            if not others:
                return None, 0.0
            c = self._steal(worker, others, now)
            if c is None:  # worth asking again once the soonest running client should have ended
                ends = [
                    self.running[w][1] + self.t[self.running[w][0]] - now for w in others if w in self.running
                ]
                return None, max(1e-3, min(ends, default=1e-3))
        self.running[worker] = (c, now)
        self.trained_by[c] = worker
        return c, 0.0

    def _steal(self, worker: int, others: list[int], now: float) -> int | None:
        victim = max(others, key=lambda w: (self.predicted_end(w, now), -w))
        end = self.predicted_end(victim, now)
        # the client whose move ends both soonest: max(the victim's end without it, now + its time)
        c = min(self.queued[victim], key=lambda c: (max(end - self.t[c], now + self.t[c]), c))
        if now + self.t[c] > end:
            return None  # taking it would end the round later
        self.queued[victim].remove(c)
        self.moved.append((c, victim, worker))
        return c


def round_robin(participants: list[int], workers: list[int]) -> dict[int, list[int]]:
    """The baseline assignment: the round's clients in id order, dealt to the workers in turn."""
    assigned: dict[int, list[int]] = {w: [] for w in workers}
    for i, c in enumerate(sorted(participants)):
        assigned[workers[i % len(workers)]].append(c)
    return assigned


def client_estimates(modelled: dict[int, float], measured: dict[int, float]) -> dict[int, float]:
    """Each client's expected training time: what it took when it last trained, else the cost model's
    figure scaled by how the model's figures compare with the measured ones (the median ratio over the
    clients measured so far), so measured and modelled clients are compared in the same seconds."""
    ratios = sorted(measured[c] / modelled[c] for c in measured if modelled.get(c, 0) > 0)
    scale = ratios[len(ratios) // 2] if ratios else 1.0
    return {c: measured.get(c, modelled[c] * scale) for c in modelled}
