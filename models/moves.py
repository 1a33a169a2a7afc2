"""Re-planning moves layers: a stage gains or loses decoder layers and their LoRA state comes along.

A client cut at ``k`` holds layers ``[0, k)`` with rank ``r`` and a reduced rank on its cut layer
``k-1``; its server replica holds ``[k, L)`` at rank ``r``. Moving the cut to ``k'`` only touches
the layers concerned: layers leaving a stage are dropped (their memory goes), layers arriving are
built from just their checkpoint tensors (client) or shared from the server's frozen base
(server), and every holder loads the current global adapter for them.

The move keeps the model the same function, so the loss right after it equals the loss before:

- a layer whose rank grows (the old cut layer, from ``r_cut`` to ``r``) keeps its old components and
  gets new ones with ``B = 0``;
- a layer is reduced to ``r_cut`` (the new cut layer) only where that drops nothing: the caller
  picks the new cut layer's rank with :func:`models.lora.reducible` and keeps ``r`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.lora import (
    AdapterLayout,
    LoraSpec,
    grow_layers,
    inject_layers,
    layer_rank,
    reducible,
    set_layer_rank,
    target_ranks,
    write_adapter,
)
from models.stages import Stage


def restage(
    stage: Stage,
    spec: LoraSpec,
    start: int,
    end: int,
    cut_rank: int | None,
    new_layers: Callable[[int, int], dict[int, nn.Module]],
    layout: AdapterLayout,
    flat: torch.Tensor,
    seed: int,
    arriving_ranks: dict[int, int] | None = None,
    cap: int | None = None,
) -> tuple[list[int], list[int]]:
    """Moves ``stage`` to layers ``[start, end)``; returns (layers added, layers dropped).

    ``new_layers(lo, hi)`` builds the frozen layers ``[lo, hi)`` that arrive; ``arriving_ranks``
    gives the rank their previous holder used where it was not ``spec.r`` (the client's old cut
    layer). ``flat`` is the global adapter every holder currently agrees on. ``cap`` is a client's own
    rank (``lora.client_ranks``): its layers hold at most that rank, so a layer arriving from a
    holder of a higher rank takes the leading ``cap`` components of the global adapter, as every
    round's load does; only a shrink below that (the cut layer's ``r_cut``) must change nothing.
    """
    old = range(stage.start, stage.end)
    if not (start < end and (start in old or end - 1 in old)):
        raise ValueError(f"a move from [{stage.start}, {stage.end}) to [{start}, {end}) must overlap")
    ranks = target_ranks(start, end, spec, cut_rank, cap)
    previous = {j: layer_rank(stage, j) for j in old if start <= j < end}
    previous.update({j: spec.r for j in range(start, end) if j not in old})
    previous.update({j: r for j, r in (arriving_ranks or {}).items() if start <= j < end and j not in old})
    for j, r in ranks.items():
        if r < min(previous[j], cap or spec.r) and not reducible(layout, flat, j, r):
            raise ValueError(f"layer {j} cannot shrink to rank {r} without changing the model")

    dropped = [j for j in old if not start <= j < end]
    below, above = [j for j in dropped if j < start], [j for j in dropped if j >= end]
    stage.drop_layers(below)
    stage.drop_layers(above)
    added = [j for j in range(start, end) if j not in old]
    for lo, hi in _blocks(added):
        stage.add_layers(new_layers(lo, hi))
    inject_layers(stage, spec, {j: ranks[j] for j in added})
    for j in old:
        if start <= j < end:
            set_layer_rank(stage, spec, j, ranks[j])
    write_adapter(stage.hf, layout, flat)
    grown = {j for j, r in ranks.items() if previous[j] < r}
    for old_rank in {previous[j] for j in grown}:
        grow_layers(stage.hf, layout, flat, {j for j in grown if previous[j] == old_rank}, old_rank, seed)
    return added, dropped


def _blocks(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``[lo, hi)`` of sorted indices."""
    runs: list[tuple[int, int]] = []
    for j in indices:
        if runs and runs[-1][1] == j:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs
