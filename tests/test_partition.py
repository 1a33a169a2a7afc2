"""Properties of the deterministic federated partitioners in ``partition``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from partition import (
    iid_partition,
    label_dirichlet_partition,
    length_buckets,
    length_dirichlet_partition,
    partition_skew,
)

N = 500
LENGTHS = np.random.default_rng(1234).integers(8, 2048, size=N).tolist()
LABELS = np.random.default_rng(99).integers(0, 6, size=N).tolist()


def bucket_ids(lengths: list[int], n_buckets: int) -> list[int]:
    """Category id of every sample, as used by the length Dirichlet split."""
    ids = [0] * len(lengths)
    for bucket, members in enumerate(length_buckets(lengths, n_buckets)):
        for index in members:
            ids[index] = bucket
    return ids


def assert_disjoint_in_range(parts: list[list[int]], n: int) -> list[int]:
    """Every index in [0, n), none assigned twice, each part sorted; returns the flattened indices."""
    flat = [index for part in parts for index in part]
    assert len(flat) == len(set(flat)), "a sample was assigned to two clients"
    assert all(0 <= index < n for index in flat)
    assert all(part == sorted(part) for part in parts)
    assert all(isinstance(index, int) for index in flat)
    return flat


# ---------------------------------------------------------------- length_buckets


def test_length_buckets_are_quantiles_and_cover_everything() -> None:
    buckets = length_buckets(LENGTHS, 7)
    assert sorted(i for b in buckets for i in b) == list(range(N))
    assert max(map(len, buckets)) - min(map(len, buckets)) <= 1
    # contiguous in length order: every sample of bucket b is no longer than any sample of bucket b+1
    for shorter, longer in itertools.pairwise(buckets):
        assert max(LENGTHS[i] for i in shorter) <= min(LENGTHS[i] for i in longer)


def test_length_buckets_break_ties_by_index() -> None:
    # order by (length, index) is 4, 0, 1, 2, 3; equal lengths may straddle the cut
    assert length_buckets([5, 5, 5, 5, 1], 2) == [[0, 1, 4], [2, 3]]


@pytest.mark.parametrize("n_buckets", [0, 4])
def test_length_buckets_rejects_bad_bucket_counts(n_buckets: int) -> None:
    with pytest.raises(ValueError, match="n_buckets"):
        length_buckets([1, 2, 3], n_buckets)


# ---------------------------------------------------------------- length Dirichlet


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_length_dirichlet_is_disjoint_and_leaves_few_leftovers(alpha: float) -> None:
    n_clients, n_buckets = 8, 5
    parts = length_dirichlet_partition(LENGTHS, n_clients, alpha, n_buckets, seed=3)
    assert len(parts) == n_clients
    flat = assert_disjoint_in_range(parts, N)
    leftovers = N - len(flat)
    assert 0 <= leftovers < n_buckets * n_clients
    assert min(map(len, parts)) >= 1


def test_length_dirichlet_is_reproducible_and_seed_dependent() -> None:
    first = length_dirichlet_partition(LENGTHS, 5, 0.5, 4, seed=7)
    assert first == length_dirichlet_partition(list(LENGTHS), 5, 0.5, 4, seed=7)
    assert first == length_dirichlet_partition(LENGTHS, 5, 0.5, 4, seed=np.int64(7))
    assert first != length_dirichlet_partition(LENGTHS, 5, 0.5, 4, seed=8)


def test_length_skew_grows_as_alpha_falls() -> None:
    n_buckets = 5
    ids = bucket_ids(LENGTHS, n_buckets)

    def mean_skew(alpha: float) -> float:
        return float(
            np.mean(
                [
                    partition_skew(length_dirichlet_partition(LENGTHS, 6, alpha, n_buckets, seed=s), ids)
                    for s in range(5)
                ]
            )
        )

    low, high = mean_skew(0.1), mean_skew(100.0)
    assert low > high + 0.3, (low, high)
    assert high < 0.1


def test_single_client_gets_every_sample() -> None:
    for alpha in (0.01, 1.0):
        assert length_dirichlet_partition(LENGTHS, 1, alpha, 5, seed=0) == [list(range(N))]


def test_too_small_dataset_names_the_client_and_fixes() -> None:
    with pytest.raises(ValueError, match=r"client \d+ received 0 samples") as excinfo:
        length_dirichlet_partition([10, 20, 30], n_clients=5, alpha=1.0, n_buckets=1, seed=0, max_redraws=3)
    message = str(excinfo.value)
    for fix in ("raise alpha", "fewer clients", "n_buckets", "more data"):
        assert fix in message


def test_min_samples_redraw_rescues_an_unlucky_first_draw() -> None:
    kwargs = {"lengths": LENGTHS[:60], "n_clients": 4, "alpha": 0.3, "n_buckets": 3, "min_samples": 5}
    unlucky = []
    for seed in range(40):
        try:
            length_dirichlet_partition(seed=seed, max_redraws=0, **kwargs)
        except ValueError:
            unlucky.append(seed)
    assert unlucky, "expected some seed whose first draw starves a client"
    for seed in unlucky[:3]:
        parts = length_dirichlet_partition(seed=seed, **kwargs)
        assert min(map(len, parts)) >= 5
        assert parts == length_dirichlet_partition(seed=seed, **kwargs)


def test_min_samples_zero_allows_empty_clients() -> None:
    parts = length_dirichlet_partition([1, 2, 3], n_clients=5, alpha=0.05, n_buckets=1, seed=0, min_samples=0)
    assert len(parts) == 5
    assert_disjoint_in_range(parts, 3)


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"n_clients": 0}, "n_clients"),
        ({"n_clients": 2.0}, "n_clients"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"n_buckets": 0}, "n_buckets"),
        ({"min_samples": -1}, "min_samples"),
        ({"seed": 1.5}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"max_redraws": -1}, "max_redraws"),
    ],
)
def test_length_dirichlet_validates_arguments(overrides: dict[str, object], argument: str) -> None:
    kwargs: dict[str, object] = {"lengths": LENGTHS, "n_clients": 4, "alpha": 1.0, "n_buckets": 3, "seed": 0}
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=argument):
        length_dirichlet_partition(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- IID


def test_iid_uses_every_sample_once_in_near_equal_parts() -> None:
    parts = iid_partition(103, 10, seed=5)
    assert sorted(assert_disjoint_in_range(parts, 103)) == list(range(103))
    assert {len(part) for part in parts} == {10, 11}
    assert parts == iid_partition(103, 10, seed=5)
    assert parts != iid_partition(103, 10, seed=6)


def test_iid_too_few_samples_names_the_client_and_fix() -> None:
    with pytest.raises(ValueError, match=r"client 3 received 0 samples.*fewer clients"):
        iid_partition(3, 4, seed=0)
    assert len(iid_partition(3, 4, seed=0, min_samples=0)[3]) == 0


def test_iid_skew_is_low() -> None:
    ids = bucket_ids(LENGTHS, 5)
    assert partition_skew(iid_partition(N, 5, seed=0), ids) < 0.1


# ---------------------------------------------------------------- label Dirichlet


def test_label_dirichlet_properties() -> None:
    n_clients, n_labels = 6, len(set(LABELS))
    parts = label_dirichlet_partition(LABELS, n_clients, alpha=0.5, seed=11)
    flat = assert_disjoint_in_range(parts, N)
    assert 0 <= N - len(flat) < n_labels * n_clients
    assert min(map(len, parts)) >= 1
    assert parts == label_dirichlet_partition(LABELS, n_clients, alpha=0.5, seed=11)
    assert parts != label_dirichlet_partition(LABELS, n_clients, alpha=0.5, seed=12)
    assert label_dirichlet_partition(LABELS, 1, alpha=0.5, seed=11) == [list(range(N))]


def test_label_dirichlet_orders_labels_by_value_not_by_hash() -> None:
    # String labels sort like their integer codes, so both must give the same partition whatever the
    # process's hash seed (set iteration order of strings varies between processes).
    names = ["ant", "bee", "cat", "dog", "eel", "fox"]
    as_strings = [names[label] for label in LABELS]
    assert label_dirichlet_partition(as_strings, 4, 1.0, seed=2) == label_dirichlet_partition(
        LABELS, 4, 1.0, seed=2
    )


def test_label_skew_grows_as_alpha_falls() -> None:
    def mean_skew(alpha: float) -> float:
        return float(
            np.mean(
                [
                    partition_skew(label_dirichlet_partition(LABELS, 6, alpha, seed=s), LABELS)
                    for s in range(5)
                ]
            )
        )

    assert mean_skew(0.1) > mean_skew(100.0) + 0.3


def test_label_dirichlet_too_small_raises() -> None:
    with pytest.raises(ValueError, match=r"client \d+ received"):
        label_dirichlet_partition(["a", "b"], 3, 1.0, seed=0, max_redraws=2)


# ---------------------------------------------------------------- partition_skew


def test_partition_skew_extremes() -> None:
    categories = [0, 0, 1, 1]
    assert partition_skew([[0, 2], [1, 3]], categories) == pytest.approx(0.0)
    assert partition_skew([[0, 1], [2, 3]], categories) == pytest.approx(0.5)
    assert partition_skew([[0, 1], [], [2, 3]], categories) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        partition_skew([[], []], categories)
