"""Cut-layer planner for federated split fine-tuning: which decoder layers each client runs.

Client i at cut k runs the embeddings and layers 0..k-1; the server runs layers k..L-1 and the head.
Per round of ``steps`` optimizer steps the cost model predicts, with c_i/s the client/server layer time:

* memory_need(k) = embed + k * (layer + 4 * lora + activation) + payload + gradient
* link_i = payload / bw_i + gradient / bw_i + 2 * rtt_i (per step)
* crit_i(k) = steps * (k*c_i + link_i + (L-k)*s + head + overhead_i) + 2 * adapter / bw_i: client i's
  critical path if the server were idle
* client_time_i: every client's chain (its layers, the link, its share of the server) runs at once;
  chains that share a host's cores or the server slow down together (processor sharing) until the
  first ones finish (``_shared_run``); round = max_i client_time_i
* server_load = steps * sum_j ((L-k_j)*s + head) / parallel and host_load[h] = steps * (host CPU
  seconds on h) / cores[h] name the bottleneck alongside each crit_i

Policies: ``fixed``/``manual`` (checked against memory), ``resource`` (minimise the predicted round time
under every client's memory) and ``adaptive`` (``resource``, then re-planned from measurements).
Pure: stdlib and numpy only, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "AdaptivePlanner",
    "ClientCosts",
    "Measured",
    "ModelCosts",
    "PlanError",
    "Prediction",
    "ServerCosts",
    "check_memory",
    "max_cut",
    "memory_need",
    "plan",
    "plan_resource",
    "plan_shared",
    "predict",
    "shared_times",
    "rank_for_memory",
]

GB = 1e9
EXHAUSTIVE_LIMIT = 20_000  # largest number of plans searched exhaustively
REL_TOL = 1e-9  # round times within this relative tolerance count as equal
LOSS_RISE = 0.01  # an eval-loss rise above 1% after a move reverts it
LEVEL_SHIFT = (
    0.5  # a layer time measured this far (relative) from its estimate replaces it: the speed changed
)
_MAX_PASSES = 1000  # coordinate-descent guard (it converges in a handful of passes)


class PlanError(ValueError):
    """A plan that cannot run; the message names the client (1-based, rank = index + 1) and the fix."""


@dataclass(frozen=True)
class ModelCosts:
    n_layers: int  # L; a cut k in 1..L-1 puts layers 0..k-1 on the client
    steps: int  # optimizer steps per client per round
    layer_param_bytes: float  # frozen weights of one decoder layer
    embed_param_bytes: float  # embeddings, always on the client
    lora_param_bytes: float  # LoRA weights of one layer; training state = 4x this
    activation_bytes: float  # bytes one layer keeps for backward at the run's batch x seq
    payload_bytes: float  # sent up per step (hidden, mask, labels)
    gradient_bytes: float  # sent down per step
    adapter_bytes: float  # global adapter; each client sends and receives it once per round
    # split.mode=u_shape: the client also runs ``tail_layers`` layers above the cut range (n_layers counts
    # only the range the cut falls in) and the final norm + head + loss; the server runs no head
    tail_layers: int = 0
    head_on_client: bool = False
    head_param_bytes: float = 0.0


def _client_extra(model: ModelCosts, server: ServerCosts) -> float:
    """Work a client does besides its cut's layers, in layers (U-shaped split: its tail and the head,
    whose time is the server's head time relative to a server layer)."""
    if not model.head_on_client:
        return 0.0
    return model.tail_layers + (server.head_time_s / server.layer_time_s if server.layer_time_s > 0 else 0.0)


@dataclass(frozen=True)
class ClientCosts:
    layer_time_s: float  # wall s of one decoder layer forward+backward on this client
    layer_cpu_s: float  # host CPU seconds of that (all threads); ~0 on a GPU
    memory_bytes: float  # memory the client can still use for its stage
    bandwidth_Bps: float  # bytes/s to the server (math.inf allowed)
    rtt_s: float  # round trip of a small message
    host: str  # processes on one host share its cores
    overhead_s: float = 0.0  # fixed per-step cost


@dataclass(frozen=True)
class ServerCosts:
    layer_time_s: float
    layer_cpu_s: float
    head_time_s: float  # final norm + LM head + loss, forward+backward, per step
    head_cpu_s: float
    host: str
    parallel: float = 1.0  # client requests the server computes at once at full speed (1 on a GPU)


@dataclass(frozen=True)
class Prediction:
    round_time_s: float
    client_time_s: tuple[float, ...]  # each client's predicted training time this round
    memory_bytes: tuple[float, ...]  # each client's memory need at its cut
    bottleneck: str  # "client 3", "server" or "host <name>"


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def memory_need(model: ModelCosts, k: int) -> float:
    """Bytes a client needs at cut ``k``: embeddings, k layers with LoRA training state and activations."""
    per_layer = model.layer_param_bytes + 4 * model.lora_param_bytes + model.activation_bytes
    held = k + model.tail_layers if model.head_on_client else k
    head = model.head_param_bytes if model.head_on_client else 0.0
    return model.embed_param_bytes + head + held * per_layer + model.payload_bytes + model.gradient_bytes


def max_cut(model: ModelCosts, client: ClientCosts, headroom: float = 0.1) -> int:
    """Largest cut k in 1..L-1 whose need * (1 + headroom) fits the client's memory; 0 if none does."""
    best = 0
    for k in range(1, model.n_layers):
        if memory_need(model, k) * (1 + headroom) > client.memory_bytes:
            break
        best = k
    return best


def _kmax(model: ModelCosts, client: ClientCosts, index: int, headroom: float) -> int:
    """``max_cut``, or a PlanError when the client cannot hold even one layer."""
    if model.n_layers < 2:
        raise ValueError(f"n_layers must be >= 2 to split the model, got {model.n_layers}")
    kmax = max_cut(model, client, headroom)
    if kmax == 0:
        need = memory_need(model, 1) * (1 + headroom)
        raise PlanError(
            f"client {index + 1} has {_gb(client.memory_bytes)} available; one layer needs {_gb(need)} "
            f"(embeddings, one layer with LoRA training state and activations, {headroom:.0%} headroom); "
            "raise the client's runtime memory, or use a smaller model, dtype, batch or sequence length"
        )
    return kmax


def _link(model: ModelCosts, client: ClientCosts) -> float:
    """Per-step transfer time: payload up, gradient down, two round trips."""
    bw = client.bandwidth_Bps
    return model.payload_bytes / bw + model.gradient_bytes / bw + 2 * client.rtt_s


def _evaluate(model, clients, server, cores, cuts):
    """Cost terms for P plans at once; ``cuts`` is (P, n). Returns crit, server_load, host loads, times.

    ``times`` comes from :func:`_shared_run`: every client's chain of work (its layers, the link, its
    share of the server) runs at once, and chains that share a host's cores or the server slow down
    together (processor sharing) until the first ones finish.
    """
    K = np.asarray(cuts, dtype=float)
    L, steps = model.n_layers, model.steps
    col = lambda attr: np.array([getattr(c, attr) for c in clients], dtype=float)
    c, cpu, bw = col("layer_time_s"), col("layer_cpu_s"), col("bandwidth_Bps")
    link = np.array([_link(model, cl) for cl in clients])
    head_s, head_cpu = (0.0, 0.0) if model.head_on_client else (server.head_time_s, server.head_cpu_s)
    Kc = K + _client_extra(model, server)  # the client's work in layers
    remote = (L - K) * server.layer_time_s + head_s
    fixed = steps * (link + col("overhead_s")) + 2 * model.adapter_bytes / bw
    crit = steps * (Kc * c + remote) + fixed
    server_load = steps * remote.sum(axis=1) / server.parallel
    hosts: dict[str, np.ndarray] = {}
    for h in dict.fromkeys([cl.host for cl in clients] + [server.host]):
        n_cores = cores.get(h, math.inf)
        if math.isinf(n_cores):
            continue
        if not n_cores > 0:
            raise ValueError(f"cores[{h!r}] must be > 0, got {n_cores}")
        on_h = np.array([cl.host == h for cl in clients])
        work = (Kc[:, on_h] * cpu[on_h]).sum(axis=1)
        if server.host == h:
            work = work + ((L - K) * server.layer_cpu_s + head_cpu).sum(axis=1)
        hosts[h] = steps * work / n_cores
    # Segments of each chain: (ideal wall s, resource s, pool). Resource s are CPU seconds on a host,
    # or server busy time in the "server" pool (a GPU server, or a CPU server whose host is unknown).
    segments = []
    client_pool = [cl.host if cl.host in hosts and cl.layer_cpu_s > 0 else None for cl in clients]
    segments.append((steps * Kc * c, steps * Kc * cpu, client_pool))
    server_pool = server.host if server.host in hosts and server.layer_cpu_s > 0 else "server"
    if server_pool != "server":
        server_cpu = steps * ((L - K) * server.layer_cpu_s + head_cpu)
        segments.append((steps * remote, server_cpu, [server.host] * len(clients)))
    else:
        segments.append((steps * remote, steps * remote, ["server"] * len(clients)))
    capacity = {**{h: cores[h] for h in hosts}, "server": server.parallel}
    times, first = _shared_run(fixed, segments, capacity)
    ones = np.ones(K.shape[0])
    stretch = (
        np.stack([first.get(pool, ones) if pool else ones for pool in client_pool], axis=1),
        np.stack([first.get(server_pool, ones)] * len(clients), axis=1),
    )
    return crit, server_load, hosts, times, stretch


def _shared_run(fixed: np.ndarray, segments: list, capacity: dict[str, float]) -> np.ndarray:
    """Finish times of chains that share pools of capacity (cores) by processor sharing; (P, n) arrays.

    A chain's ideal duration is ``fixed`` plus its segments' wall time. The part of a segment spent
    computing (min(wall, resource)) stretches by its pool's factor u >= 1; u is the least value at which
    the pool's delivered rate, sum over chains of resource / (stretched duration), fits its capacity.
    When a chain finishes the others get its share: the run proceeds in phases, one per finish.
    """
    busy = [np.minimum(w, r) for w, r, _ in segments]
    base = fixed + sum(w for w, _, _ in segments)  # ideal duration, no sharing
    P, n = base.shape
    members: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for (_, r, names), b in zip(segments, busy):
        for i, name in enumerate(names):
            if name is not None:
                members.setdefault(name, []).append((i, b[:, i], r[:, i]))
    left = np.ones((P, n))  # fraction of each chain's work still to do
    now, done = np.zeros(P), np.zeros((P, n))
    active = base > 0
    u = {name: np.ones(P) for name in members}
    first: dict[str, np.ndarray] = {}

    def duration() -> np.ndarray:
        wall = base.copy()
        for name, ms in members.items():
            for i, b, _ in ms:
                wall[:, i] += b * (u[name] - 1)
        return wall

    for _ in range(n):
        if not active.any():
            break
        for _ in range(10):  # Gauss-Seidel over the pools
            previous = {name: v.copy() for name, v in u.items()}
            for name, ms in members.items():
                u[name] = _stretch(duration(), u[name], ms, active, capacity[name])
            if all(np.allclose(u[k], previous[k], rtol=1e-9) for k in u):
                break
        first = first or {k: v.copy() for k, v in u.items()}
        wall = duration()
        step = np.where(active, left * wall, np.inf).min(axis=1)  # until the next chain finishes
        step = np.where(np.isfinite(step), step, 0.0)
        now = now + step
        left = np.where(active, left - step[:, None] / wall, left)
        finished = active & (left <= 1e-9)
        done = np.where(finished, now[:, None], done)
        active = active & ~finished
    return done, first


def _stretch(wall, u, members, active, capacity) -> np.ndarray:
    """The least u >= 1 with sum_i r_i / (a_i + b_i u) <= capacity, for each plan (Newton from u = 1).

    The rate is convex and decreasing in u, so Newton's steps from the left approach the root from
    below without overshooting.
    """
    terms = [(np.where(active[:, i], r, 0.0), wall[:, i] - b * u, b) for i, b, r in members]
    x = np.ones_like(u)
    for _ in range(50):
        rate = sum(r / (a + b * x) for r, a, b in terms)
        excess = rate - capacity
        if not (excess > capacity * 1e-10).any():
            break
        slope = sum(r * b / (a + b * x) ** 2 for r, a, b in terms)
        x = np.where(excess > 0, x + excess / np.maximum(slope, 1e-300), x)
    return x


def _objective(model, clients, server, cores, cuts):
    """Lexicographic objective arrays: round time, total client time, total cut (larger is better)."""
    times = _evaluate(model, clients, server, cores, cuts)[3]
    return times.max(axis=1), times.sum(axis=1), np.asarray(cuts).sum(axis=1)


def _best_index(rt: np.ndarray, total: np.ndarray, cut_sum: np.ndarray) -> int:
    """Index of the best plan: least round time, then least total client time, then deepest cuts."""
    idx = np.flatnonzero(rt <= rt.min() * (1 + REL_TOL))
    idx = idx[total[idx] <= total[idx].min() * (1 + REL_TOL)]
    return int(idx[np.argmax(cut_sum[idx])])


def _better(a: tuple, b: tuple) -> bool:
    """Whether objective ``a`` is strictly better than ``b`` (same order and tolerance as _best_index)."""
    for x, y, sign in zip(a, b, (1, 1, -1)):
        if not math.isclose(x, y, rel_tol=REL_TOL):
            return sign * x < sign * y
    return False


def predict(
    model: ModelCosts,
    clients: Sequence[ClientCosts],
    server: ServerCosts,
    cores: Mapping[str, float],
    cuts: Sequence[int],
) -> Prediction:
    """Predicted round time, per-client times and memory, and the term that sets the round time."""
    if not clients or len(cuts) != len(clients):
        raise ValueError(f"need one cut per client: {len(clients)} clients, {len(cuts)} cuts")
    crit, server_load, hosts, times, _ = _evaluate(model, clients, server, cores, [list(cuts)])
    terms = [(crit[0, i], f"client {i + 1}") for i in range(len(clients))]
    terms += [(server_load[0], "server")] + [(load[0], f"host {h}") for h, load in hosts.items()]
    return Prediction(
        round_time_s=float(times[0].max()),
        client_time_s=tuple(float(t) for t in times[0]),
        memory_bytes=tuple(memory_need(model, k) for k in cuts),
        bottleneck=max(terms, key=lambda t: t[0])[1],
    )


def check_memory(
    model: ModelCosts, clients: Sequence[ClientCosts], cuts: Sequence[int], headroom: float = 0.1
) -> None:
    """Raise a PlanError naming the first client whose cut is out of range or does not fit its memory."""
    if len(cuts) != len(clients):
        raise ValueError(f"need one cut per client: {len(clients)} clients, {len(cuts)} cuts")
    last = model.n_layers - 1
    for i, (client, k) in enumerate(zip(clients, cuts)):
        if not 1 <= k <= last:
            raise PlanError(f"client {i + 1}: cut {k} is outside 1..{last}; pick a cut in that range")
        kmax = _kmax(model, client, i, headroom)
        need = memory_need(model, k) * (1 + headroom)
        if need > client.memory_bytes:
            raise PlanError(
                f"client {i + 1} has {_gb(client.memory_bytes)} available; cut {k} needs {_gb(need)} "
                f"({headroom:.0%} headroom); the largest cut that fits is {kmax}. Use a cut <= {kmax}, "
                f"give client {i + 1} more memory, or use policy 'resource' or 'adaptive'"
            )


def _heuristic(model, clients, server, cores, kmax: list[int]) -> np.ndarray:
    """Candidate plans (fixed k, all-kmax, crit thresholds), then coordinate descent from the best."""
    n, L = len(clients), model.n_layers
    caps = np.array(kmax)
    ks = np.arange(1, L)
    cands = [np.minimum(k, caps) for k in ks] + [caps]
    crit = _evaluate(model, clients, server, cores, np.repeat(ks[:, None], n, axis=1))[0].T  # (n, L-1)
    crit = np.where(ks[None, :] <= caps[:, None], crit, np.inf)
    thresholds = np.unique(crit[np.isfinite(crit)])
    for chunk in np.array_split(thresholds, max(1, len(thresholds) // 256)):
        ok = crit[None] <= chunk[:, None, None]  # (m, n, L-1)
        largest = (L - 1) - np.argmax(ok[..., ::-1], axis=2)
        cands.extend(largest[ok.any(axis=2).all(axis=1)])
    plans = np.array(cands)
    cur = plans[_best_index(*_objective(model, clients, server, cores, plans))]
    key = tuple(a[0] for a in _objective(model, clients, server, cores, cur[None]))
    for _ in range(_MAX_PASSES):
        changed = False
        for i in range(n):
            trial = np.repeat(cur[None], kmax[i], axis=0)
            trial[:, i] = np.arange(1, kmax[i] + 1)
            obj = _objective(model, clients, server, cores, trial)
            j = _best_index(*obj)
            if _better(tuple(a[j] for a in obj), key):
                cur, key, changed = trial[j], tuple(a[j] for a in obj), True
        if not changed:
            break
    return cur


def _monotone(model, clients, server, cores, kmax: list[int], cuts: list[int]) -> list[int]:
    """Give faster clients the deeper cuts within groups of equal (kmax, link, host, overhead).

    Each group's reassignment is kept only if the predicted round time does not get worse.
    """
    groups: dict[tuple, list[int]] = {}
    for i, cl in enumerate(clients):
        key = (kmax[i], cl.bandwidth_Bps, cl.rtt_s, cl.host, cl.overhead_s)
        groups.setdefault(key, []).append(i)
    rt = lambda p: predict(model, clients, server, cores, p).round_time_s
    best, best_rt = list(cuts), rt(cuts)
    for members in groups.values():
        trial = list(best)
        fastest_first = sorted(members, key=lambda i: clients[i].layer_time_s)
        for i, k in zip(fastest_first, sorted((best[i] for i in members), reverse=True)):
            trial[i] = k
        if trial != best and (trial_rt := rt(trial)) <= best_rt * (1 + REL_TOL):
            best, best_rt = trial, min(best_rt, trial_rt)
    return best


def plan_resource(
    model: ModelCosts,
    clients: Sequence[ClientCosts],
    server: ServerCosts,
    cores: Mapping[str, float],
    headroom: float = 0.1,
) -> list[int]:
    """Cuts minimising the predicted round time under every client's memory (``resource`` policy).

    Exhaustive (vectorised) when there are at most EXHAUSTIVE_LIMIT plans, else a candidate set plus
    coordinate descent. Ties go to less total client time, then deeper cuts (offloading the server).
    """
    kmax = [_kmax(model, cl, i, headroom) for i, cl in enumerate(clients)]
    if not kmax:
        return []
    if math.prod(kmax) <= EXHAUSTIVE_LIMIT:
        grids = np.meshgrid(*[np.arange(1, m + 1) for m in kmax], indexing="ij")
        plans = np.stack([g.ravel() for g in grids], axis=1)
        best = plans[_best_index(*_objective(model, clients, server, cores, plans))]
    else:
        best = _heuristic(model, clients, server, cores, kmax)
    return _monotone(model, clients, server, cores, kmax, [int(k) for k in best])


def _beside(clients: Sequence[ClientCosts], cuts: Sequence[int]) -> tuple[ClientCosts, int]:
    """What trains beside a client when clients share workers: a typical client (the median layer time)
    at the median cut."""
    order = sorted(range(len(clients)), key=lambda i: clients[i].layer_time_s)
    return clients[order[len(order) // 2]], sorted(int(k) for k in cuts)[len(cuts) // 2]


def _alone_times(model, client, server, cores, slots, ks, beside) -> np.ndarray:
    """Predicted training time of ``client`` at each cut in ``ks`` while ``slots - 1`` copies of the
    typical client ``beside`` = (costs, cut) train at the same time on the other workers."""
    typical, k_typ = beside
    fed = [client] + [typical] * (slots - 1)
    plans = np.column_stack([np.asarray(ks)] + [np.full(len(ks), k_typ)] * (slots - 1))
    return _evaluate(model, fed, server, cores, plans)[3][:, 0]


def shared_times(
    model: ModelCosts,
    clients: Sequence[ClientCosts],
    server: ServerCosts,
    cores: Mapping[str, float],
    slots: int,
    cuts: Sequence[int],
    around: Sequence[int] | None = None,
) -> list[float]:
    """Clients sharing workers (``slots`` train at a time): each client's predicted training time at its
    cut, beside ``slots - 1`` typical clients (``_beside``) of the plan ``around`` (default ``cuts``)."""
    beside, memo = _beside(clients, cuts if around is None else around), {}
    for cl, k in zip(clients, cuts):
        if (cl, k) not in memo:
            memo[cl, k] = float(_alone_times(model, cl, server, cores, slots, [k], beside)[0])
    return [memo[cl, k] for cl, k in zip(clients, cuts)]


def plan_shared(
    model: ModelCosts,
    clients: Sequence[ClientCosts],
    server: ServerCosts,
    cores: Mapping[str, float],
    slots: int,
    headroom: float = 0.1,
    start: Sequence[int] | None = None,
) -> list[int]:
    """Cuts for clients that share workers, ``slots`` training at a time (``resource`` and ``adaptive``
    when there are more clients than workers, or a round draws fewer than all).

    A worker trains its clients one after another, so a round is the sum of its clients' times, not the
    longest of all: each client gets the cut that minimises its own predicted time (ties: the deeper)
    under its memory, with ``slots - 1`` typical clients at the typical cut beside it, repeated until
    the typical cut settles. Clients with the same figures get the same cut; O(distinct clients x L).
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    kmax = [_kmax(model, cl, i, headroom) for i, cl in enumerate(clients)]
    cuts = list(start) if start is not None else [max(1, k // 2) for k in kmax]
    for _ in range(8):
        beside, memo, new = _beside(clients, cuts), {}, []
        for cl, top in zip(clients, kmax):
            if (cl, top) not in memo:
                ks = np.arange(1, top + 1)
                t = _alone_times(model, cl, server, cores, slots, ks, beside)
                memo[cl, top] = int(ks[np.flatnonzero(t <= t.min() * (1 + REL_TOL))].max())
            new.append(memo[cl, top])
        if new == cuts:
            break
        cuts = new
    return cuts


def plan(
    policy: str,
    model: ModelCosts,
    clients: Sequence[ClientCosts],
    server: ServerCosts,
    cores: Mapping[str, float],
    cut_layers: int | Sequence[int] | None = None,
    headroom: float = 0.1,
) -> list[int]:
    """Initial cuts for ``policy``: fixed (one int for all), manual (one per client), resource, adaptive."""
    if policy in ("resource", "adaptive"):
        return plan_resource(model, clients, server, cores, headroom)
    if policy == "fixed":
        if isinstance(cut_layers, bool) or not isinstance(cut_layers, (int, np.integer)):
            raise ValueError(f"policy 'fixed' needs one int cut_layers, got {cut_layers!r}")
        cuts = [int(cut_layers)] * len(clients)
    elif policy == "manual":
        if cut_layers is None or isinstance(cut_layers, (int, np.integer)):
            raise ValueError(f"policy 'manual' needs a list of cuts, one per client, got {cut_layers!r}")
        cuts = [int(k) for k in cut_layers]
    else:
        raise ValueError(f"unknown cut policy {policy!r}; use 'fixed', 'manual', 'resource' or 'adaptive'")
    check_memory(model, clients, cuts, headroom)
    return cuts


def _shifted(measured: float, estimate: float) -> bool:
    """Whether ``measured`` is more than ``LEVEL_SHIFT`` away from ``estimate`` in either direction."""
    return estimate > 0 and not 1 / (1 + LEVEL_SHIFT) <= measured / estimate <= 1 + LEVEL_SHIFT


def _copy_move(move: Mapping) -> dict:
    return {
        "before": [int(k) for k in move["before"]],
        "after": [int(k) for k in move["after"]],
        "loss_index": int(move["loss_index"]),
    }


@dataclass
class Measured:
    compute_s: float  # client-side forward+backward wall s per step (median)
    step_s: float  # wall s per step (median)
    train_time_s: float
    train_loss: float
    server_s: float | None = None  # the server's forward+backward wall s per step for this client (median)


class AdaptivePlanner:
    """``resource`` policy re-planned every ``every`` rounds from measured step times, with hysteresis.

    ``observe`` refits client and server layer times (EWMA with weight ``smoothing``); ``propose`` returns
    a new plan only if it is predicted ``hysteresis`` faster, and reverts a move after which the eval loss
    rose by more than 1% (that plan is never proposed again). Memory caps stay those of the probe figures.
    """

    def __init__(
        self,
        model: ModelCosts,
        clients: Sequence[ClientCosts],
        server: ServerCosts,
        cores: Mapping[str, float],
        every: int = 2,
        hysteresis: float = 0.1,
        smoothing: float = 0.5,
        headroom: float = 0.1,
        slots: int | None = None,
    ) -> None:
        if every < 1 or not 0 < smoothing <= 1 or not 0 <= hysteresis < 1:
            raise ValueError("need every >= 1, 0 < smoothing <= 1 and 0 <= hysteresis < 1")
        # clients that share workers or sit rounds out: ``slots`` train at a time, each client is planned
        # for its own time (``plan_shared``) and refit only from the rounds it trained (None: every client
        # trains every round, all at once, and the plan minimises the round)
        self.slots = slots
        self.model, self.cores = model, dict(cores)
        self.every, self.hysteresis, self.smoothing, self.headroom = every, hysteresis, smoothing, headroom
        self._probe_clients, self._probe_server = tuple(clients), server
        for i, cl in enumerate(clients):
            _kmax(model, cl, i, headroom)
        self._clients, self._server = list(clients), server
        self._losses: list[float] = []
        self._move: dict | None = None  # {"before", "after", "loss_index"} of the last accepted move
        self._forbidden: set[tuple[int, ...]] = set()
        self.reason: dict | None = None  # why the last ``propose`` moved (or did not), for the record

    @property
    def clients(self) -> tuple[ClientCosts, ...]:
        return tuple(self._clients)

    @property
    def server(self) -> ServerCosts:
        return self._server

    def initial(self) -> list[int]:
        if self.slots is not None:
            return plan_shared(
                self.model, self._probe_clients, self._probe_server, self.cores, self.slots, self.headroom
            )
        return plan_resource(self.model, self._probe_clients, self._probe_server, self.cores, self.headroom)

    def _stretches(self, cuts: Sequence[int]):
        """(client, server) stretch of each client's compute in the round just measured, as a function of
        the client's index: all clients at once, or beside ``slots - 1`` typical clients."""
        if self.slots is None:
            u = _evaluate(self.model, self._clients, self._server, self.cores, [list(cuts)])[4]
            return lambda i: (u[0][0, i], u[1][0, i])
        typical, k_typ = _beside(self._clients, cuts)

        def stretch(i: int) -> tuple[float, float]:
            fed = [self._clients[i]] + [typical] * (self.slots - 1)
            u = _evaluate(
                self.model, fed, self._server, self.cores, [[cuts[i]] + [k_typ] * (self.slots - 1)]
            )[4]
            return u[0][0, 0], u[1][0, 0]

        return stretch

    def observe(self, cuts: Sequence[int], measured: Sequence[Measured | None], eval_loss: float) -> None:
        """Refit client/server layer times and per-step overheads from one round's medians.

        A layer time measured more than ``LEVEL_SHIFT`` away from its estimate (1.5x slower or faster)
        replaces the estimate instead of being averaged in: the device's speed changed, and the next
        re-plan should act on the new speed, not on half of it.

        Measured times ran under contention, so the stretch the cost model predicts for that plan is
        taken out before they update the (contention-free) layer times: a layer measured at m with
        busy part b under stretch u took m - b (u - 1) alone. What a step took beyond compute, server
        and link becomes the client's per-step overhead (framework, optimizer steps). Without a
        server measurement, the remote part of the step is attributed to the server's layers. A client
        that sat the round out (None) keeps its figures (only with ``slots``).
        """
        if not len(cuts) == len(measured) == len(self._clients):
            raise ValueError(f"need one cut and one measurement per client ({len(self._clients)})")
        a, L = self.smoothing, self.model.n_layers
        sv = self._server
        s, head = sv.layer_time_s, sv.head_time_s
        extra = _client_extra(self.model, sv)
        head_ratio = 0.0 if self.model.head_on_client else (head / s if s > 0 else 0.0)
        if self.slots is None and any(m is None for m in measured):
            raise ValueError("every client must be measured when every client trains every round")
        stretch = self._stretches(cuts)
        s_busy = min(s, sv.layer_cpu_s) if sv.layer_cpu_s > 0 else s
        fits = []
        for i, (k, m) in enumerate(zip(cuts, measured)):
            if m is None:
                continue
            cl = self._clients[i]
            u_client, u_server = stretch(i)
            busy = min(cl.layer_time_s, cl.layer_cpu_s)
            c_alone = max(1e-9, m.compute_s / (k + extra) - busy * (u_client - 1))
            w = 1.0 if _shifted(c_alone, cl.layer_time_s) else a
            if m.server_s is not None:
                server_alone = m.server_s - (L - k + head_ratio) * s_busy * (u_server - 1)
                fits.append(max(0.0, server_alone) / ((L - k) + head_ratio))
                overhead = m.step_s - m.compute_s - m.server_s - _link(self.model, cl)
            else:
                remote = m.step_s - m.compute_s - _link(self.model, cl) - cl.overhead_s
                fits.append(max(0.0, remote) / ((L - k) + head_ratio))
                overhead = cl.overhead_s
            self._clients[i] = replace(
                cl,
                layer_time_s=(1 - w) * cl.layer_time_s + w * c_alone,
                overhead_s=(1 - a) * cl.overhead_s + a * max(0.0, overhead),
            )
        if not fits:  # nobody trained
            self._losses.append(float(eval_loss))
            return
        fit = float(np.mean(fits))
        w = 1.0 if _shifted(fit, s) else a
        s_new = (1 - w) * s + w * fit
        head_new = head * s_new / s if s > 0 else head
        self._server = replace(sv, layer_time_s=s_new, head_time_s=head_new)
        self._losses.append(float(eval_loss))

    def propose(self, round_: int, cuts: Sequence[int]) -> list[int] | None:
        """New cuts for round ``round_`` (a multiple of ``every``), or None to keep ``cuts``."""
        cuts = [int(k) for k in cuts]
        self.reason = None
        if round_ % self.every != 0 or not self._losses:
            return None
        move = self._move
        if move is not None:
            i = move["loss_index"]
            if len(self._losses) <= i:
                return None  # no eval loss since the move yet
            self._move = None
            before = self._losses[i - 1] if i > 0 else None
            if before is not None and self._losses[i] - before > LOSS_RISE * abs(before):
                self._forbidden.add(tuple(move["after"]))
                self.reason = {
                    "rule": "revert",
                    "detail": f"eval loss rose {self._losses[i] / before - 1:+.1%} after the move to "
                    f"{move['after']} (limit {LOSS_RISE:.0%}); that plan is not proposed again",
                }
                return list(move["before"])
        if self.slots is not None:
            return self._propose_shared(cuts)
        new = plan_resource(self.model, self._clients, self._server, self.cores, self.headroom)
        rt = lambda p: predict(self.model, self._clients, self._server, self.cores, p).round_time_s
        now, best = rt(cuts), rt(new)
        self.reason = {"rule": None, "predicted_round_time_s": {"current": now, "best": best}}
        if new == cuts or tuple(new) in self._forbidden:
            return None
        if best >= (1 - self.hysteresis) * now:
            return None
        self.register(cuts, new)
        self.reason.update(
            rule="speed",
            detail=f"with the measured speeds {new} is predicted {1 - best / now:.0%} faster than {cuts} "
            f"(more than split.hysteresis {self.hysteresis:.0%})",
        )
        return new

    def _propose_shared(self, cuts: list[int]) -> list[int] | None:
        """Clients sharing workers: a client moves when its own predicted time drops by more than
        ``hysteresis`` (its time is what it adds to its worker's round)."""
        best = plan_shared(
            self.model, self._clients, self._server, self.cores, self.slots, self.headroom, start=cuts
        )
        # both in today's surroundings: a client moves for its own gain, not for a shift of the typical cut
        times = lambda p: shared_times(
            self.model, self._clients, self._server, self.cores, self.slots, p, cuts
        )
        now, after = times(cuts), times(best)
        new = [b if a < (1 - self.hysteresis) * n else k for k, b, n, a in zip(cuts, best, now, after)]
        self.reason = {"rule": None, "predicted_client_time_s": {"current": sum(now), "best": sum(after)}}
        if new == cuts or tuple(new) in self._forbidden:
            return None
        moved = [i for i, (k, b) in enumerate(zip(cuts, new)) if k != b]
        self.register(cuts, new)
        shown = ", ".join(
            f"client {i + 1} cut {cuts[i]} -> {new[i]} ({1 - after[i] / now[i]:.0%} faster)"
            for i in moved[:8]
        )
        self.reason.update(
            rule="speed",
            detail=f"with the measured speeds {len(moved)} client(s) are each predicted more than "
            f"split.hysteresis {self.hysteresis:.0%} faster: {shown}" + (", ..." if len(moved) > 8 else ""),
        )
        return new

    @property
    def pending(self) -> bool:
        """Whether a move awaits the eval loss that decides whether it is kept."""
        return self._move is not None

    def forbidden(self, cuts: Sequence[int]) -> bool:
        return tuple(int(k) for k in cuts) in self._forbidden

    def register(self, before: Sequence[int], after: Sequence[int]) -> None:
        """Records a move (this planner's or another rule's) so the eval-loss guard can revert it."""
        self._move = {
            "before": [int(k) for k in before],
            "after": [int(k) for k in after],
            "loss_index": len(self._losses),
        }

    def state_dict(self) -> dict:
        """JSON-able state: refit times, eval-loss history, the pending move and the forbidden plans."""
        return {
            "client_layer_time_s": [cl.layer_time_s for cl in self._clients],
            "client_overhead_s": [cl.overhead_s for cl in self._clients],
            "server_layer_time_s": self._server.layer_time_s,
            "server_head_time_s": self._server.head_time_s,
            "eval_losses": list(self._losses),
            "move": None if self._move is None else _copy_move(self._move),
            "forbidden": [list(p) for p in sorted(self._forbidden)],
        }

    def load_state_dict(self, state: Mapping) -> None:
        times = state["client_layer_time_s"]
        if len(times) != len(self._clients):
            raise ValueError(f"state has {len(times)} clients, this planner {len(self._clients)}")
        overheads = state.get("client_overhead_s", [cl.overhead_s for cl in self._clients])
        self._clients = [
            replace(cl, layer_time_s=float(t), overhead_s=float(o))
            for cl, t, o in zip(self._clients, times, overheads)
        ]
        self._server = replace(
            self._server,
            layer_time_s=float(state["server_layer_time_s"]),
            head_time_s=float(state["server_head_time_s"]),
        )
        self._losses = [float(x) for x in state["eval_losses"]]
        move = state["move"]
        self._move = None if move is None else _copy_move(move)
        self._forbidden = {tuple(int(k) for k in p) for p in state["forbidden"]}


def rank_for_memory(model: ModelCosts, client: ClientCosts, k: int, r: int, headroom: float = 0.1) -> int:
    """The largest LoRA rank ``<= r`` at which a client cut at ``k`` fits its memory; 0 if none does.

    ``model.lora_param_bytes`` is one layer's LoRA at rank ``r``; LoRA's weights, gradients and AdamW
    state scale linearly with the rank. Used by ``lora.client_ranks=auto`` (HSplitLoRA's per-client
    budget): the cut is planned first, then each client trains the largest rank its memory holds.
    """
    for rank in range(r, 0, -1):
        scaled = replace(model, lora_param_bytes=model.lora_param_bytes * rank / r)
        if memory_need(scaled, k) * (1 + headroom) <= client.memory_bytes:
            return rank
    return 0
