"""Where each rank computes, which backend aggregates, and the RPC device maps: pure decisions.

Every function here takes plain numbers (what each rank reported: its node and how many CUDA devices
it sees) and returns the same answer on every rank, so the whole decision is unit-tested without a
GPU or a process group (``tests/test_placement.py``). ``runtime.dist.start`` gathers the reports and
applies the answer; it is the only place that touches CUDA or ``torch.distributed``.

Rules (``runtime.device``, ``runtime.server_gpu``, ``runtime.aggregation_backend``):

- A node's ranks, in rank order, share its G GPUs. G == 0: CPU. G == 1: every rank on it uses cuda:0.
  On the server's node (rank 0's) with G >= 2 and ``server_gpu=own`` (the default) the server gets
  cuda:0 to itself and the workers take cuda:1..G-1 round-robin; ``server_gpu=shared`` puts every
  rank of the node round-robin on cuda:0..G-1 (the server on cuda:0, the workers from cuda:1 on).
  On every other node the workers use all its GPUs round-robin.
- ``device=auto`` computes on CUDA only when every rank sees a GPU (a mixed world computes on CPU
  everywhere); ``device=cpu`` always on CPU; ``device=cuda`` needs a GPU on every rank.
- The adapter all-reduce runs on NCCL only when every rank is on a CUDA device and no two ranks share
  one (NCCL refuses two ranks on one device: "Duplicate GPU detected"); else on the gloo group
  (adapters are megabytes). ``aggregation_backend=nccl`` where that cannot hold is a config error.
- RPC: each worker on a GPU maps its device to the server's device; replies take the reverse map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtime.config import ConfigError

SERVER_GPU = ("own", "shared")
AGGREGATION_BACKENDS = ("auto", "nccl", "gloo")


class PlacementError(ConfigError):
    """The placement or backend the config asks for cannot hold on this world (names field and fix)."""


@dataclass(frozen=True)
class RankReport:
    """What one rank says about itself before placement."""

    rank: int
    node: str
    """Ranks with the same node share its GPUs (``dist`` uses the host name and CUDA_VISIBLE_DEVICES)."""
    gpus: int
    """CUDA devices this rank sees (0: none, or ``runtime.device=cpu``)."""


@dataclass(frozen=True)
class Placement:
    gpus: tuple[int | None, ...]
    """Per rank: the CUDA device index it computes on, or None for CPU."""
    nodes: tuple[str, ...]
    """Per rank: its node."""
    reason: str
    """One line per node: what was placed where and why (logged by rank 0)."""

    def device(self, rank: int) -> str:
        """``cpu`` or ``cuda:I``: what ``torch.device`` takes."""
        g = self.gpus[rank]
        return "cpu" if g is None else f"cuda:{g}"

    def shared(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """(node, CUDA index, ranks) for every device that two or more ranks compute on."""
        holders: dict[tuple[str, int], list[int]] = {}
        for rank, (node, g) in enumerate(zip(self.nodes, self.gpus)):
            if g is not None:
                holders.setdefault((node, g), []).append(rank)
        return [(node, g, tuple(rs)) for (node, g), rs in holders.items() if len(rs) > 1]


@dataclass(frozen=True)
class Backend:
    name: str
    """``nccl`` or ``gloo``: the adapter all-reduce's backend."""
    reason: str


def torchrun_layout(ranks_per_node: Sequence[int], gpus_per_node: int | Sequence[int]) -> list[RankReport]:
    """The reports of a torchrun world: node n (``node{n}``) holds the next ``ranks_per_node[n]``
    ranks (torchrun numbers ranks node by node) and sees ``gpus_per_node`` (one count or one per node)."""
    gpus = [gpus_per_node] * len(ranks_per_node) if isinstance(gpus_per_node, int) else list(gpus_per_node)
    if len(gpus) != len(ranks_per_node):
        raise ValueError(
            f"gpus_per_node={gpus_per_node}: give one count or one per node ({len(ranks_per_node)})"
        )
    out: list[RankReport] = []
    for n, (count, g) in enumerate(zip(ranks_per_node, gpus)):
        out += [RankReport(len(out) + i, f"node{n}", g) for i in range(count)]
    return out


def place_on_node(n_ranks: int, gpus: int, holds_server: bool, server_gpu: str = "own") -> list[int | None]:
    """The CUDA index of each rank of one node, in rank order (the server first if the node holds it)."""
    if server_gpu not in SERVER_GPU:
        raise PlacementError(f"runtime.server_gpu={server_gpu!r}: use own or shared")
    if gpus <= 0:
        return [None] * n_ranks
    if holds_server and gpus >= 2 and server_gpu == "own":
        return [0] + [1 + j % (gpus - 1) for j in range(n_ranks - 1)]
    return [p % gpus for p in range(n_ranks)]


def place(reports: Sequence[RankReport], device: str = "auto", server_gpu: str = "own") -> Placement:
    """Every rank's device (``runtime.device`` ``auto``, ``cpu`` or ``cuda``) from every rank's report."""
    reports = sorted(reports, key=lambda r: r.rank)
    if [r.rank for r in reports] != list(range(len(reports))) or not reports:
        raise ValueError(
            f"reports must cover ranks 0..{len(reports) - 1} once each, got {[r.rank for r in reports]}"
        )
    nodes = tuple(r.node for r in reports)
    if device not in ("auto", "cpu", "cuda"):
        raise PlacementError(f"runtime.device={device!r}: use auto, cpu or cuda")
    if device == "cpu":
        return Placement((None,) * len(reports), nodes, "runtime.device=cpu: every rank computes on CPU")
    blind = [r.rank for r in reports if r.gpus <= 0]
    if blind:
        if device == "cuda":
            raise PlacementError(
                f"runtime.device=cuda but {_ranks(blind, 'see')} no CUDA device: use runtime.device=auto "
                "(CPU everywhere unless every rank has a GPU) or cpu"
            )
        return Placement(
            (None,) * len(reports),
            nodes,
            f"runtime.device=auto: {_ranks(blind, 'see')} no CUDA device, so every rank computes on CPU",
        )
    by_node: dict[str, list[RankReport]] = {}
    for r in reports:
        by_node.setdefault(r.node, []).append(r)
    gpus: list[int | None] = [None] * len(reports)
    lines = []
    for node, members in by_node.items():
        count = min(r.gpus for r in members)  # ranks of one node see the same devices
        holds_server = members[0].rank == 0
        for r, g in zip(members, place_on_node(len(members), count, holds_server, server_gpu)):
            gpus[r.rank] = g
        lines.append(_describe_node(node, members, count, holds_server, server_gpu, gpus))
    return Placement(tuple(gpus), nodes, "; ".join(lines))


def choose_backend(placement: Placement, requested: str = "auto") -> Backend:
    """The adapter all-reduce's backend (``runtime.aggregation_backend`` auto, nccl or gloo).

    auto: NCCL when every rank is on a CUDA device and no two share one, else gloo. An explicit nccl
    that cannot hold raises ``PlacementError`` naming the field and the fix.
    """
    if requested not in AGGREGATION_BACKENDS:
        raise PlacementError(f"runtime.aggregation_backend={requested!r}: use auto, nccl or gloo")
    if requested == "gloo":
        return Backend("gloo", "runtime.aggregation_backend=gloo")
    on_cpu = [r for r, g in enumerate(placement.gpus) if g is None]
    shared = placement.shared()
    if requested == "nccl":
        if on_cpu:
            raise PlacementError(
                f"runtime.aggregation_backend=nccl needs a CUDA device on every rank, but "
                f"{_ranks(on_cpu, 'compute')} on CPU ({placement.reason}): use "
                "runtime.aggregation_backend=auto or gloo"
            )
        if shared:
            raise PlacementError(
                f"runtime.aggregation_backend=nccl but {_sharing(shared)}, and NCCL refuses two ranks on one "
                'device ("Duplicate GPU detected"): use runtime.aggregation_backend=auto (gloo when ranks '
                "share a GPU) or gloo, or start at most as many ranks on a node as it has GPUs"
            )
        return Backend("nccl", "runtime.aggregation_backend=nccl: every rank has a GPU of its own")
    if on_cpu:
        return Backend("gloo", "runtime.aggregation_backend=auto: the ranks compute on CPU")
    if shared:
        return Backend(
            "gloo",
            f"runtime.aggregation_backend=auto: {_sharing(shared)} (NCCL refuses two ranks on one "
            "device), so the adapters are summed over gloo",
        )
    return Backend("nccl", "runtime.aggregation_backend=auto: every rank has a GPU of its own")


def device_maps(placement: Placement, rank: int) -> dict[int, dict[int, int]]:
    """{target rank: {this rank's CUDA index: the target's}}: what ``set_device_map`` gets on ``rank``.

    Workers call the server (rank 0), never each other, and the server only replies (TensorPipe uses
    the reverse of the caller's map), so only a worker on a GPU calling a server on a GPU has a map.
    """
    mine, server = placement.gpus[rank], placement.gpus[0]
    if rank == 0 or mine is None or server is None:
        return {}
    return {0: {mine: server}}


def _ranks(ranks: Sequence[int], verb: str = "") -> str:
    """``rank 3`` or ``ranks 3, 4``, with the verb agreeing (``rank 3 sees``, ``ranks 3, 4 see``)."""
    one = len(ranks) == 1
    said = ("rank " if one else "ranks ") + ", ".join(map(str, ranks))
    return f"{said} {verb}{'s' if one else ''}" if verb else said


def _sharing(shared: list[tuple[str, int, tuple[int, ...]]]) -> str:
    return "; ".join(f"{_ranks(rs)} share cuda:{g} on {node}" for node, g, rs in shared)


def _describe_node(
    node: str, members: list[RankReport], count: int, holds_server: bool, server_gpu: str, gpus: list
) -> str:
    ranks = [r.rank for r in members]
    where = ", ".join(f"{r}->cuda:{gpus[r]}" for r in ranks)
    if holds_server and count >= 2 and server_gpu == "own":
        why = "the server has cuda:0 to itself, the workers share the rest (runtime.server_gpu=own)"
    elif holds_server and count >= 2:
        why = "the server shares the GPUs with the workers (runtime.server_gpu=shared)"
    elif count == 1:
        why = "all on its one GPU"
    else:
        why = "round-robin"
    return f"{node}: {len(ranks)} rank(s) on {count} GPU(s), {why}: {where}"
