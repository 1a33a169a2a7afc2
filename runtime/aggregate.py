"""Aggregation of every holder's adapter copies into one global adapter, in one all-reduce.

Each rank writes ``p_i *`` its copies (a client: layers below its cut; the server: each
replica's layers at and above that client's cut) into one flat vector laid out over all
layers, zeros elsewhere. ``all_reduce(SUM)`` gives every rank the sample-weighted average
(``fedavg``; a copy of smaller rank is zero-padded, its alpha/r scaling is the same), and each
holder then loads its leading rank of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from models.lora import AdapterLayout, read_adapter, write_adapter


def local_contribution(
    holders: list[tuple[nn.Module, float]], layout: AdapterLayout, device: torch.device
) -> torch.Tensor:
    flat = torch.zeros(layout.numel, dtype=torch.float32, device=device)
    for model, weight in holders:
        read_adapter(model, layout, flat, weight)
    return flat


def aggregate(
    holders: list[tuple[nn.Module, float]],
    layout: AdapterLayout,
    device: torch.device,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """All-reduces the weighted copies, loads the result into every holder and returns it."""
    flat = local_contribution(holders, layout, device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for model, _ in holders:
        write_adapter(model, layout, flat)
    return flat
