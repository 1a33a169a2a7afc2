"""The per-round client draw (partition.sampling): seeded, without replacement, weighted on request."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from partition.sampling import (
    WorkQueue,
    assign_clients,
    client_estimates,
    round_robin,
    round_weights,
    sample_clients,
)
from tests.assignment_oracles import best_split, longest_first, makespan, play

COUNTS = {c: n for c, n in enumerate([10, 10, 10, 10, 10, 50], start=1)}


def test_the_draw_is_k_distinct_clients_fixed_by_seed_and_round():
    draws = [sample_clients(0, r, COUNTS, 3) for r in range(1, 41)]
    assert all(len(d) == 3 == len(set(d)) and set(d) <= set(COUNTS) and d == sorted(d) for d in draws)
    assert draws == [sample_clients(0, r, COUNTS, 3) for r in range(1, 41)]  # any rank, any relaunch
    assert len({tuple(d) for d in draws}) > 5  # rounds draw differently
    assert draws != [sample_clients(1, r, COUNTS, 3) for r in range(1, 41)]  # and seeds do


def test_every_client_every_round_unless_asked():
    assert sample_clients(0, 1, COUNTS, None) == sample_clients(0, 1, COUNTS, 6) == list(COUNTS)
    with pytest.raises(ValueError, match="at least one client"):
        sample_clients(0, 1, COUNTS, 0)


def test_by_samples_draws_a_large_client_more_often_than_uniform_does():
    def rate(by: str) -> float:
        seen = Counter(c for r in range(1, 2001) for c in sample_clients(0, r, COUNTS, 1, by))
        return seen[6] / 2000

    assert rate("uniform") == pytest.approx(1 / 6, abs=0.03)
    assert rate("by_samples") == pytest.approx(0.5, abs=0.04)


def test_round_weights_are_the_participants_shares_and_zero_for_the_rest():
    w = round_weights(COUNTS, [1, 6])
    assert w == {1: 10 / 60, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0, 6: 50 / 60}
    everyone = round_weights(COUNTS, list(COUNTS))
    assert everyone == {c: n / 100 for c, n in COUNTS.items()}  # the run's sample weights, bit for bit


def test_the_longest_clients_go_first_onto_the_least_loaded_worker():
    predicted = {1: 5.0, 2: 4.0, 3: 3.0, 4: 3.0, 5: 2.0, 6: 1.0}
    assigned, load = assign_clients(list(predicted), predicted, [1, 2])
    assert assigned == {1: [1, 4, 6], 2: [2, 3, 5]} and load == {1: 9.0, 2: 9.0}
    # round-robin in client order would give 5+3+2=10 and 4+3+1=8: the round waits 10 s, not 9
    one, _ = assign_clients([2, 5], predicted, [1, 2, 3])
    assert one == {1: [2], 2: [5], 3: []}  # a worker with no client this round idles
    assert assign_clients(list(predicted), predicted, [1])[0] == {1: [1, 2, 3, 4, 5, 6]}


def test_round_robin_deals_the_clients_in_id_order():
    assert round_robin([5, 1, 3, 2], [1, 2]) == {1: [1, 3], 2: [2, 5]}


def test_a_client_not_yet_measured_is_estimated_in_the_measured_clients_seconds():
    modelled = {1: 2.0, 2: 2.0, 3: 4.0}
    assert client_estimates(modelled, {}) == modelled
    # measured over modelled: 0.25 and 1.5; their median (the upper one of two) scales client 3
    assert client_estimates(modelled, {1: 0.5, 2: 3.0}) == {1: 0.5, 2: 3.0, 3: 4.0 * 1.5}


def test_moves_and_swaps_take_the_assignment_below_lpt_and_never_above_it():
    # LPT's classic bad case: 3,3,2,2,2 on two workers is 7 against the best 6 (3+3 | 2+2+2)
    predicted = {1: 3.0, 2: 3.0, 3: 2.0, 4: 2.0, 5: 2.0}
    assigned, load = assign_clients(list(predicted), predicted, [1, 2])
    assert max(load.values()) == 6.0
    assert sorted(map(sorted, assigned.values())) == [[1, 2], [3, 4, 5]]
    rng = random.Random(0)
    ours, theirs = [], []  # each instance's time over the best, for this search and for LPT alone
    for _ in range(300):  # random instances: never worse than LPT, always a point no move or swap improves
        n, m = rng.randint(1, 9), rng.randint(1, 4)
        t = {c: round(rng.lognormvariate(0, 1), 3) for c in range(1, n + 1)}
        workers = list(range(1, m + 1))
        got, load = assign_clients(list(t), t, workers)
        assert sorted(c for cs in got.values() for c in cs) == list(t)
        for w, cs in got.items():
            assert load[w] == pytest.approx(sum(t[c] for c in cs))
            assert cs == sorted(cs, key=lambda c: (-t[c], c))  # longest first on each worker
        lpt = longest_first(t, m)
        assert max(load.values()) <= lpt + 1e-9
        if m**n <= 6561:  # brute force over every assignment
            best = best_split(t, m)
            assert max(load.values()) <= 4 / 3 * best + 1e-9
            ours.append(max(load.values()) / best)
            theirs.append(lpt / best)
    assert sum(ours) < sum(theirs) and max(ours) < max(theirs)  # the search finds what LPT misses


def test_a_worker_that_runs_out_takes_queued_clients_off_one_that_runs_late():
    predicted = {c: 1.0 for c in range(1, 9)}  # nothing measured yet: every client looks alike
    actual = {**predicted, 1: 6.0}  # but client 1 is six times slower
    assigned, _ = assign_clients(list(predicted), predicted, [1, 2])
    assert assigned[1][0] == 1  # client 1 starts first on worker 1, three more queued behind it
    static = makespan(assigned, actual)
    queue = WorkQueue(assigned, predicted)
    dynamic = play(queue, actual, [1, 2])
    # worker 2 ends its own four at 4 s, then takes two of the three queued behind client 1; worker 1
    # ends client 1 at 6 s and trains the last: 7 s, the best there is (13 s of work, 6 in one client)
    assert static == 9.0 and dynamic == 7.0
    assert sorted(queue.trained_by) == list(predicted)
    assert queue.moved == [(c, 1, 2) for c in assigned[1][1:3]]


def test_the_queue_trains_every_client_once_and_never_ends_later_when_predictions_hold():
    rng = random.Random(1)
    gains = []
    for _ in range(300):
        n, m = rng.randint(1, 12), rng.randint(1, 4)
        workers = list(range(1, m + 1))
        t = {c: round(rng.lognormvariate(0, 1), 3) for c in range(1, n + 1)}
        assigned, load = assign_clients(list(t), t, workers)
        queue = WorkQueue(assigned, t)
        assert play(queue, t, workers) <= max(load.values()) + 1e-9  # exact predictions: never later
        assert sorted(queue.trained_by) == list(t)
        # predictions off by a lognormal factor: the queue against the static lists, on the same times
        actual = {c: t[c] * rng.lognormvariate(0, 1) for c in t}
        queue = WorkQueue(assigned, t)
        took = play(queue, actual, workers)
        assert sorted(queue.trained_by) == list(t)
        gains.append(makespan(assigned, actual) / took)
    assert sum(gains) / len(gains) > 1.05 and max(gains) > 1.5
