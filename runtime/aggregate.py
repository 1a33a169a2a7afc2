"""Aggregation over the process group: every rule is one all-reduce of one vector per round.

Each rank writes what its holders contribute (a client: its layers; the server: every replica's
layers) into one vector laid out over all layers and all chains, zeros elsewhere, and
``all_reduce(SUM)`` gives every rank the same sum; ``models.aggregation`` says what the vector
holds under each rule and how the global model follows from the sum. The vector crosses as
float32: under ``stack``/``svd`` every position has exactly one non-zero contributor, so the sum
is exact and identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from models.aggregation import (
    StackLayout,
    fedavg_result,
    fedavg_vector,
    stack_restart,
    stack_vector,
    svd_result,
)
from models.lora import AdapterLayout, LoraSpec


@dataclass
class Aggregated:
    flat: torch.Tensor
    """The global adapter every holder loads next (under ``stack``: ``B = 0`` and the averaged ``A``)."""
    stack: StackLayout | None
    summed: torch.Tensor | None
    """``stack``: the summed blocks, whose products each holder merges into its frozen weights."""
    nbytes: int
    """Bytes of the vector this rank sent into the all-reduce."""


def aggregate(
    rule: str,
    holders: list[tuple[int, nn.Module, float]],
    layout: AdapterLayout,
    chains: dict[int, dict[str, int]],
    previous: torch.Tensor,
    spec: LoraSpec,
    device: torch.device,
    group: dist.ProcessGroup | None,
    weights: dict[int, float],
    contribution: torch.Tensor | None = None,
) -> Aggregated:
    """Sums this rank's contribution with every other rank's and returns the global model's state.

    ``holders`` are (client chain, model, sample weight); ``chains`` gives every chain's rank on
    every module (from the plan, the same on every rank); ``weights`` the chains' sample weights.
    ``contribution`` (clients sharing workers): this rank's share of the sum, already made.
    """
    if rule == "fedavg":
        # clients sharing workers: the rank's copies were taken as each client finished
        vec = (
            contribution
            if contribution is not None
            else fedavg_vector([(m, w) for _, m, w in holders], layout)
        )
        summed = _all_reduce(vec, device, group)
        return Aggregated(fedavg_result(summed, layout, previous), None, None, 4 * vec.numel())
    stack = StackLayout(layout, chains)
    vec = contribution if contribution is not None else stack_vector(holders, stack)
    summed = _all_reduce(vec, device, group)
    if rule == "svd":
        return Aggregated(svd_result(summed, stack, spec.scale), stack, None, 4 * stack.numel)
    return Aggregated(stack_restart(summed, stack, weights), stack, summed, 4 * stack.numel)


def _all_reduce(vec: torch.Tensor, device: torch.device, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sums ``vec`` over every rank: on ``device`` in the NCCL ``group``, on CPU in the default gloo group
    (``group`` None, also where ranks share a GPU)."""
    wire = vec.to(device=device if group is not None else torch.device("cpu"), dtype=torch.float32)
    dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=group)
    return wire.double().cpu()
