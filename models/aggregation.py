"""The arithmetic of the aggregation rules: each holder's copies in, one global model out (no processes).

Every layer is held once per client *chain*: by client ``i`` below its cut, by its server replica
at and above it. Copy ``i`` of a module has rank ``r_i``, sample weight ``p_i`` (summing to 1 over
chains) and scaling ``s_i = alpha_i / r_i``; it adds ``s_i * B_i @ A_i`` to the frozen weight.
``runtime.aggregate`` sums one vector per rank over the process group; these functions say what
goes into that vector and what comes out of the sum.

``fedavg`` (the peers' baseline)
    ``A`` and ``B`` are averaged separately, component by component, each over the copies that have
    that component: the vector carries ``p_i * A_i``, ``p_i * B_i`` and, per component, the ``p_i``
    of its holders, and the sum is divided by that weight. A component held by one client keeps its
    value instead of being averaged with zeros. Bytes: ``sum_m R_m (in_m + out_m + 1)`` floats.
    Averaging the factors separately is not averaging the products: the result is not
    ``sum_i p_i s_i B_i A_i``.

``stack`` (noise-free: FLoRA, HSplitLoRA)
    Copy ``i`` contributes the block ``(p_i * A_i, s_i * B_i)``; stacking the blocks of all chains
    along the rank axis gives ``B_stack @ A_stack = sum_i p_i s_i B_i A_i`` exactly. That delta is
    merged into the frozen weight at every holder of the module, and LoRA starts again from the
    seed next round. Bytes: ``sum_m sum_i r_i,m (in_m + out_m)`` floats.

``svd`` (FlexLoRA)
    The same stacked blocks give the exact weighted product, which is cut back by SVD to the
    global rank ``R_m``; a holder of rank ``r`` takes the leading ``r`` components, which is the
    best rank-``r`` approximation. Exact whenever ``R_m`` covers the product's rank. Same bytes as
    ``stack``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.lora import ADAPTER, AdapterLayout, lora_modules

RULES = ("fedavg", "stack", "svd")


# ---------------------------------------------------------------------------------------------- fedavg
def fedavg_numel(layout: AdapterLayout) -> int:
    """Length of the fedavg vector: the weighted adapter, then each module's per-component weights."""
    return layout.numel + sum(s.rank for s in layout.slots)


def wire_numel(rule: str, layout: AdapterLayout, n_chains: int) -> int:
    """Floats each rank all-reduces per round under ``rule`` (``stack``/``svd``: every chain at the
    layout's rank, an upper bound when some clients hold lower ranks)."""
    return fedavg_numel(layout) if rule == "fedavg" else n_chains * layout.numel


def _mass_offsets(layout: AdapterLayout) -> dict[str, int]:
    offsets, offset = {}, layout.numel
    for s in layout.slots:
        offsets[s.name] = offset
        offset += s.rank
    return offsets


def fedavg_vector(holders: list[tuple[nn.Module, float]], layout: AdapterLayout) -> torch.Tensor:
    """This rank's share of the fedavg sum: ``p * A``, ``p * B`` and ``p`` on each component it holds."""
    vec = torch.zeros(fedavg_numel(layout), dtype=torch.float64)
    mass = _mass_offsets(layout)
    with torch.no_grad():
        for model, weight in holders:
            for name, m in lora_modules(model).items():
                a, b = layout.views(vec, name)
                la, lb = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
                r = la.shape[0]
                a[:r] += weight * la.detach().double().cpu()
                b[:, :r] += weight * lb.detach().double().cpu()
                vec[mass[name] : mass[name] + r] += weight
    return vec


def fedavg_result(summed: torch.Tensor, layout: AdapterLayout, previous: torch.Tensor) -> torch.Tensor:
    """The global adapter from the summed vectors; a component no copy holds keeps ``previous``."""
    flat = previous.detach().double().cpu().clone()
    mass = _mass_offsets(layout)
    for s in layout.slots:
        w = summed[mass[s.name] : mass[s.name] + s.rank]
        a, b = layout.views(summed, s.name)
        fa, fb = layout.views(flat, s.name)
        held = w > 0
        fa[held] = a[held] / w[held, None]
        fb[:, held] = b[:, held] / w[held]
    return flat.float()


# ------------------------------------------------------------------------------------------ stack, svd
class StackLayout:
    """Per module, one block per chain that adapts it: ``A_i`` (r_i x in) then ``B_i`` (out x r_i).

    ``chains`` maps a client rank to the rank its chain holds each module at (0: not adapted).
    """

    def __init__(self, layout: AdapterLayout, chains: dict[int, dict[str, int]]):
        self.layout = layout
        self.blocks: dict[str, list[tuple[int, int, int]]] = {}  # name -> [(chain, rank, offset)]
        offset = 0
        for s in layout.slots:
            self.blocks[s.name] = []
            for chain in sorted(chains):
                r = chains[chain].get(s.name, 0)
                if r > 0:
                    self.blocks[s.name].append((chain, r, offset))
                    offset += r * (s.in_features + s.out_features)
        self.numel = offset

    def views(self, vec: torch.Tensor, name: str, chain: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.layout.by_name[name]
        for c, r, o in self.blocks[name]:
            if c == chain:
                a = vec[o : o + r * s.in_features].view(r, s.in_features)
                b = vec[o + r * s.in_features : o + r * (s.in_features + s.out_features)].view(
                    s.out_features, r
                )
                return a, b
        raise KeyError(f"chain {chain} holds no copy of {name}")

    def factors(self, vec: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_stack, B_stack)`` of a module: ``B_stack @ A_stack = sum_i p_i s_i B_i A_i``."""
        views = [self.views(vec, name, c) for c, _, _ in self.blocks[name]]
        s = self.layout.by_name[name]
        if not views:
            return vec.new_zeros(0, s.in_features), vec.new_zeros(s.out_features, 0)
        return torch.cat([a for a, _ in views], 0), torch.cat([b for _, b in views], 1)


def stack_vector(holders: list[tuple[int, nn.Module, float]], stack: StackLayout) -> torch.Tensor:
    """This rank's blocks: ``(p_i * A_i, s_i * B_i)`` for each copy it holds, zeros elsewhere."""
    vec = torch.zeros(stack.numel, dtype=torch.float64)
    with torch.no_grad():
        for chain, model, weight in holders:
            for name, m in lora_modules(model).items():
                a, b = stack.views(vec, name, chain)
                la, lb = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
                if la.shape[0] != a.shape[0]:
                    raise ValueError(
                        f"{name}: chain {chain} holds rank {la.shape[0]}, the plan says {a.shape[0]}"
                    )
                a.copy_(weight * la.detach().double().cpu())
                b.copy_(m.scaling[ADAPTER] * lb.detach().double().cpu())
    return vec


def dense_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b @ a`` in float64, one rank-1 term at a time in a fixed order.

    A BLAS matmul may sum in an order that depends on the thread count; this does not, so every
    holder of a layer (client or server, any number of threads) merges bit-identical deltas.
    """
    out = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64, device=a.device)
    a, b = a.double(), b.double()
    for c in range(a.shape[0]):
        out.addr_(b[:, c], a[c])
    return out


def merge_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fan_in_fan_out: bool) -> None:
    """Adds ``b @ a`` to a frozen weight in place (stored ``(in, out)`` when ``fan_in_fan_out``)."""
    delta = dense_delta(a.to(weight.device), b.to(weight.device))
    with torch.no_grad():
        weight.add_((delta.T if fan_in_fan_out else delta).to(weight.dtype))


def svd_factors(
    a: torch.Tensor, b: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank ``rank`` with ``scale * B @ A`` the best rank-``rank`` approximation of ``b @ a``.

    Works on the factors (QR of each, SVD of the small core), never on the dense product.
    """
    a, b = a.double(), b.double()
    n_out, n_in = b.shape[0], a.shape[1]
    out_a, out_b = a.new_zeros(rank, n_in), a.new_zeros(n_out, rank)
    if a.shape[0] == 0:
        return out_a, out_b
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, sv, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, sv.shape[0])
    root = sv[:k].sqrt()
    out_b[:, :k] = (qb @ u[:, :k]) * root / scale
    out_a[:k] = root[:, None] * (qa @ vh[:k].T).T
    return out_a, out_b


def svd_result(summed: torch.Tensor, stack: StackLayout, scale: float) -> torch.Tensor:
    """The global adapter under ``svd``: each module's exact weighted product cut to its global rank."""
    layout = stack.layout
    flat = torch.zeros(layout.numel, dtype=torch.float64)
    for s in layout.slots:
        a, b = svd_factors(*stack.factors(summed, s.name), s.rank, scale)
        fa, fb = layout.views(flat, s.name)
        fa.copy_(a)
        fb.copy_(b)
    return flat.float()
