"""Training progress in the cut decision: loss trends, and a deeper cut for a client whose loss has plateaued.

The rule (``adaptive`` policy, after the speed rule of ``partition.planner.AdaptivePlanner`` found no
move worth making):

* a client's trend is the relative fall of its training loss per round, the mean of its last
  ``window`` rounds against the mean of the ``window`` rounds before them;
* a client whose trend is below ``plateau`` has plateaued: what it still learns per round is small,
  so it can take on more of the model without the run losing much;
* each plateaued client whose memory holds one more layer gets it, cheapest first, as long as the
  predicted round time of the whole plan stays within ``hysteresis`` of the current one ("its
  resources allow": a deeper cut that would make the round slower than that is not made).

Why deeper: a client's cut layer trains at the reduced rank ``r_cut`` and the server computes every
layer past the cut for every client; one more client layer gives the old cut layer its full rank and
takes a layer per step off the server, which all clients share. The global eval loss guards the
rule: a move after which it rises by more than 1% is undone (``AdaptivePlanner``).
Pure: stdlib and the planner's cost model only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from partition.planner import ClientCosts, ModelCosts, ServerCosts, max_cut, predict

__all__ = ["deepen_plateaued", "loss_trend"]


def loss_trend(history: Sequence[float], window: int) -> float | None:
    """Relative fall of the loss per round: (mean of the ``window`` values before the last ``window``
    minus the mean of the last ``window``) / the former / ``window``. None with fewer than 2 x window."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if len(history) < 2 * window:
        return None
    before = sum(history[-2 * window : -window]) / window
    last = sum(history[-window:]) / window
    if before <= 0:
        return None
    return (before - last) / before / window


def deepen_plateaued(
    model: ModelCosts,
    clients: Sequence[ClientCosts],
    server: ServerCosts,
    cores: Mapping[str, float],
    cuts: Sequence[int],
    trends: Sequence[float | None],
    plateau: float,
    hysteresis: float,
    headroom: float = 0.1,
) -> tuple[list[int], list[int]] | None:
    """(new cuts, indices of the clients deepened) or None: every plateaued client (trend below
    ``plateau``) whose memory holds one more layer gets it, the cheapest first, while the predicted
    round time stays within ``(1 + hysteresis)`` of the current plan's."""
    if not len(cuts) == len(trends) == len(clients):
        raise ValueError(f"need one cut and one trend per client ({len(clients)})")
    if plateau <= 0:
        return None
    rt = lambda p: predict(model, clients, server, cores, p).round_time_s
    limit = rt(cuts) * (1 + hysteresis)
    candidates = [
        i
        for i, (k, t) in enumerate(zip(cuts, trends))
        if t is not None and t < plateau and k + 1 <= max_cut(model, clients[i], headroom)
    ]
    new, deepened = [int(k) for k in cuts], []
    while candidates:
        trials = []
        for i in candidates:
            trial = list(new)
            trial[i] += 1
            trials.append((rt(trial), i, trial))
        cost, i, trial = min(trials)
        if cost > limit:
            break
        new, deepened = trial, [*deepened, i]
        candidates.remove(i)
    return (new, sorted(deepened)) if deepened else None
