"""Deterministic federated data partitioners (IID, length-skew and label-skew Dirichlet).

Every rank of a federated run calls these functions independently instead of receiving its shard
over the network, so each function is a pure function of its arguments: the same inputs give the
same partition on every machine, every process and every Python hash seed. Only numpy's
``default_rng``/``SeedSequence`` supply randomness, and categories are ordered explicitly rather
than by set/dict iteration order.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

# numpy's dirichlet scales by 1/sum, so a share that is exactly 1 (or k/n_k) can come out one ulp low and
# floor() would silently drop a sample (one client would not get the whole dataset). The tolerance is far
# below 1/n_k for any real dataset, so it never promotes a genuinely fractional share.
_FLOOR_TOLERANCE = 1e-9

__all__ = [
    "iid_partition",
    "label_dirichlet_partition",
    "length_buckets",
    "length_dirichlet_partition",
    "partition_skew",
]


def _require_int(name: str, value: object, minimum: int, fix: str) -> int:
    """Return ``value`` as an int, or raise a ValueError naming ``name`` and how to fix it.

    bool is rejected on purpose: ``n_clients=True`` is almost certainly a bug, not a request for one client.
    Wrong types raise ValueError too (not TypeError) so callers validating a config catch one exception type.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__}); {fix}")  # noqa: TRY004
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; {fix}")
    return int(value)


def _require_alpha(alpha: object) -> float:
    """Dirichlet concentration must be a finite positive number; Dir(0) and Dir(inf) are undefined."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise ValueError(f"alpha must be a positive float, got {alpha!r}; pass e.g. alpha=0.5")  # noqa: TRY004
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"alpha must be a finite number > 0, got {alpha}; use a small value (e.g. 0.1) for strong skew "
            "or a large one (e.g. 100) for a near-IID split"
        )
    return float(alpha)


def _require_seed(seed: object) -> int:
    """Seeds must be non-negative ints so every rank builds the identical numpy generator."""
    return _require_int("seed", seed, 0, "pass the same non-negative integer seed on every rank")


def length_buckets(lengths: Sequence[int], n_buckets: int) -> list[list[int]]:
    """Split sample indices into ``n_buckets`` equal-frequency (quantile) buckets by length.

    Indices are sorted by ``(length, index)`` and cut into contiguous groups whose sizes differ by at
    most one (``np.array_split``), so bucket ``b`` holds the ``b``-th shortest slice of the data. Equal
    lengths may straddle a bucket boundary: equal bucket sizes matter more than tie purity, because the
    Dirichlet split draws one proportion vector per bucket and a tiny bucket would be all leftovers.
    Using the index as tie-breaker keeps the result deterministic.

    Returns one ascending list of indices per bucket, ordered from shortest to longest samples.
    """
    n_buckets = _require_int("n_buckets", n_buckets, 1, "use at least one length bucket")
    if n_buckets > len(lengths):
        raise ValueError(
            f"n_buckets={n_buckets} exceeds the number of samples ({len(lengths)}); "
            "use fewer buckets or supply more data"
        )
    # A stable argsort on the lengths is exactly the (length, index) ordering.
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    return [sorted(chunk.tolist()) for chunk in np.array_split(order, n_buckets)]


def _dirichlet_split(
    categories: list[list[int]],
    n_clients: int,
    alpha: float,
    seed: int,
    min_samples: int,
    max_redraws: int,
    fewer_categories_hint: str,
) -> list[list[int]]:
    """Shared Dirichlet mechanics of the length- and label-skew partitioners.

    For each category (in the given order): shuffle its indices, draw ``p ~ Dir(alpha * 1)``, and hand
    client ``i`` the next ``floor(p_i * n_k)`` shuffled indices. Remainders are left unassigned, as in
    the SplitFT paper. Attempt 0 uses ``default_rng(seed)`` so the common no-retry case is a plain seeded
    draw; re-draw ``a`` uses ``SeedSequence([seed, a])`` so each retry is independent yet reproducible.
    """
    concentration = np.full(n_clients, alpha)
    attempts = 1 + max_redraws
    for attempt in range(attempts):
        rng = np.random.default_rng(seed if attempt == 0 else np.random.SeedSequence([seed, attempt]))
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for members in categories:
            shuffled = np.asarray(members, dtype=np.int64)
            rng.shuffle(shuffled)
            proportions = rng.dirichlet(concentration)
            counts = np.floor(proportions * len(shuffled) + _FLOOR_TOLERANCE).astype(np.int64)
            bounds = np.concatenate(([0], np.cumsum(counts)))
            for client in range(n_clients):
                parts[client].extend(shuffled[bounds[client] : bounds[client + 1]].tolist())
        sizes = [len(part) for part in parts]
        poorest = int(np.argmin(sizes))
        if sizes[poorest] >= min_samples:
            return [sorted(part) for part in parts]
    n_total = sum(len(members) for members in categories)
    raise ValueError(
        f"client {poorest} received {sizes[poorest]} samples, fewer than min_samples={min_samples}, "
        f"after {attempts} Dirichlet draws (1 + max_redraws={max_redraws}); fixes: raise alpha "
        f"(currently {alpha}), use fewer clients (n_clients={n_clients}){fewer_categories_hint}, "
        f"or supply more data (currently {n_total} samples)"
    )


def length_dirichlet_partition(
    lengths: Sequence[int],
    n_clients: int,
    alpha: float,
    n_buckets: int,
    seed: int,
    min_samples: int = 1,
    max_redraws: int = 100,
) -> list[list[int]]:
    """SplitFT's length-based Dirichlet split: clients differ in the sequence lengths they hold.

    Samples are grouped into ``n_buckets`` equal-frequency length buckets (:func:`length_buckets`),
    which play the role of the K categories. For each bucket ``k`` (shortest first), its indices are
    shuffled with ``rng = numpy.random.default_rng(seed)``, then ``p_k ~ Dir(alpha * ones(n_clients))``
    is drawn from the same ``rng`` and client ``i`` gets ``floor(p_ki * n_k)`` of them. Small ``alpha``
    concentrates each bucket on few clients (strong length skew); large ``alpha`` approaches IID.

    Leftovers: the ``n_k - sum_i floor(p_ki * n_k)`` samples of each bucket that the floors leave over
    (fewer than ``n_clients`` per bucket) are NOT assigned to anyone, matching the paper. So the union
    of all parts may miss up to ``n_buckets * (n_clients - 1)`` samples.

    If some client ends with fewer than ``min_samples`` samples the whole split is re-drawn with a
    generator seeded by ``SeedSequence([seed, attempt])``, up to ``max_redraws`` times; after that a
    ValueError names the client, its sample count and the possible fixes.

    Returns one ascending list of sample indices per client. The output depends only on the arguments,
    so every rank can call this independently and agree on the partition.
    """
    n_clients = _require_int("n_clients", n_clients, 1, "use at least one client")
    alpha = _require_alpha(alpha)
    n_buckets = _require_int("n_buckets", n_buckets, 1, "use at least one length bucket")
    seed = _require_seed(seed)
    min_samples = _require_int("min_samples", min_samples, 0, "use 0 to allow empty clients")
    max_redraws = _require_int("max_redraws", max_redraws, 0, "use 0 to disable re-drawing")
    return _dirichlet_split(
        length_buckets(lengths, n_buckets),
        n_clients,
        alpha,
        seed,
        min_samples,
        max_redraws,
        fewer_categories_hint=f" or fewer length buckets (n_buckets={n_buckets})",
    )


def label_dirichlet_partition(
    labels: Sequence[Hashable],
    n_clients: int,
    alpha: float,
    seed: int,
    min_samples: int = 1,
    max_redraws: int = 100,
) -> list[list[int]]:
    """Classic label-skew Dirichlet split: like :func:`length_dirichlet_partition`, categories = labels.

    Distinct labels are processed in sorted order (falling back to first-occurrence order when labels
    are not mutually comparable), never in set iteration order, because string hashing differs between
    processes and every rank must draw the same proportions for the same label. Leftover samples of each
    label (fewer than ``n_clients`` per label) are left unassigned, and the ``min_samples`` re-draw
    behaves exactly as in the length-based split.
    """
    n_clients = _require_int("n_clients", n_clients, 1, "use at least one client")
    alpha = _require_alpha(alpha)
    seed = _require_seed(seed)
    min_samples = _require_int("min_samples", min_samples, 0, "use 0 to allow empty clients")
    max_redraws = _require_int("max_redraws", max_redraws, 0, "use 0 to disable re-drawing")
    members: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(label, []).append(index)
    try:
        ordered = sorted(members)  # type: ignore[type-var]  # Hashable is not necessarily orderable
    except TypeError:
        ordered = list(members)  # dicts keep first-occurrence order, which is equally deterministic
    return _dirichlet_split(
        [members[label] for label in ordered],
        n_clients,
        alpha,
        seed,
        min_samples,
        max_redraws,
        fewer_categories_hint="",
    )


def iid_partition(n_samples: int, n_clients: int, seed: int, min_samples: int = 1) -> list[list[int]]:
    """Uniform random split: shuffle with ``default_rng(seed)`` and cut into near-equal parts.

    Every sample is assigned exactly once; part sizes differ by at most one (``np.array_split``).
    Returns one ascending list of indices per client.
    """
    n_samples = _require_int("n_samples", n_samples, 0, "pass the dataset size")
    n_clients = _require_int("n_clients", n_clients, 1, "use at least one client")
    seed = _require_seed(seed)
    min_samples = _require_int("min_samples", min_samples, 0, "use 0 to allow empty clients")
    order = np.random.default_rng(seed).permutation(n_samples)
    parts = [sorted(chunk.tolist()) for chunk in np.array_split(order, n_clients)]
    for client, part in enumerate(parts):
        if len(part) < min_samples:
            raise ValueError(
                f"client {client} received {len(part)} samples, fewer than min_samples={min_samples}; "
                f"use fewer clients (n_clients={n_clients}), lower min_samples, or supply at least "
                f"{n_clients * min_samples} samples (currently {n_samples})"
            )
    return parts


def partition_skew(parts: list[list[int]], categories: Sequence[int]) -> float:
    """Mean total-variation distance between each client's category histogram and the global one.

    ``categories[i]`` is the category (e.g. length-bucket id or label id) of sample ``i``; the global
    histogram is taken over the whole dataset. 0 means every client mirrors the global mix (IID); values
    near 1 mean clients hold disjoint categories. Clients with no samples have no histogram and are
    skipped rather than counted as 0 or 1, which would bias the mean either way.
    """
    if len(categories) == 0:
        raise ValueError("categories is empty; pass one category id per sample of the dataset")
    _, category_ids = np.unique(np.asarray(categories), return_inverse=True)
    n_categories = int(category_ids.max()) + 1
    global_hist = np.bincount(category_ids, minlength=n_categories) / len(category_ids)
    distances = []
    for part in parts:
        if not part:
            continue
        local = np.bincount(category_ids[np.asarray(part, dtype=np.int64)], minlength=n_categories)
        distances.append(0.5 * float(np.abs(local / len(part) - global_hist).sum()))
    if not distances:
        raise ValueError("every part is empty; partition_skew needs at least one client with samples")
    return float(np.mean(distances))
