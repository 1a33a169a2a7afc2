"""HSplitLoRA's first two steps: which weight matrices get LoRA, and at which rank (no processes).

Step 1, important weights. A short warm-up trains LoRA of rank ``r`` on every linear weight of
every decoder layer (the candidates) and scores each one by AdaLoRA's smoothed sensitivity
(Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
ICLR 2023, eqs. 8-10): per trainable entry ``w`` of the module's LoRA factors,

    I = |w * dL/dw|                       (first-order estimate of the loss change if w were removed)
    I_bar = b1 * I_bar + (1 - b1) * I     (smoothed over the warm-up steps)
    U_bar = b2 * U_bar + (1 - b2) * |I - I_bar|   (its uncertainty)
    score = mean over the module's entries of I_bar * U_bar

Every warm-up client scores the weights its chain trains (its layers on the client, the rest on
its server replica); the server combines the clients' scores weighted by their sample counts.

Step 2, ranks under a budget. The budget is a number of trainable parameters: ``lora.budget``
times what rank ``r`` on every ``lora.targets`` module costs (the uniform placement). Each
candidate gets a share of it proportional to its score, i.e. rank
``floor(share / (in + out))`` capped at ``r``, and what rounding left goes one rank at a time to
the highest-scoring weights that still fit. Low-scoring weights get no LoRA at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def module_of(param_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.lora_A.default.weight`` -> ``model.layers.3.self_attn.q_proj``."""
    return param_name.split(".lora_", 1)[0]


class Sensitivity:
    """AdaLoRA's smoothed sensitivity times uncertainty, kept per LoRA parameter, reported per module."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        self.beta1, self.beta2 = beta1, beta2
        self.i_bar: dict[str, torch.Tensor] = {}
        self.u_bar: dict[str, torch.Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, nn.Parameter]]) -> None:
        """Call after the backward, before the optimizer step (the gradients are on the parameters)."""
        self.steps += 1
        for name, p in named_params:
            if p.grad is None:
                continue
            i = (p.detach() * p.grad).abs().float().cpu()
            if name not in self.i_bar:
                self.i_bar[name] = torch.zeros_like(i)
                self.u_bar[name] = torch.zeros_like(i)
            self.i_bar[name].mul_(self.beta1).add_(i, alpha=1 - self.beta1)
            self.u_bar[name].mul_(self.beta2).add_((i - self.i_bar[name]).abs(), alpha=1 - self.beta2)

    def scores(self) -> dict[str, float]:
        """Module name -> mean of ``I_bar * U_bar`` over its LoRA entries."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for name, i_bar in self.i_bar.items():
            m = module_of(name)
            sums[m] = sums.get(m, 0.0) + float((i_bar * self.u_bar[name]).sum())
            counts[m] = counts.get(m, 0) + i_bar.numel()
        return {m: sums[m] / counts[m] for m in sums}


def combine(scores: Iterable[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """The clients' scores weighted by their sample weights (each module summed over the chains)."""
    out: dict[str, float] = {}
    for per_module, weight in scores:
        for m, s in per_module.items():
            out[m] = out.get(m, 0.0) + weight * s
    return out


def uniform_params(shapes: Mapping[str, tuple[int, int]], r: int) -> int:
    """Trainable parameters of rank ``r`` on every module in ``shapes`` ((in, out) per module)."""
    return sum(r * (n_in + n_out) for n_in, n_out in shapes.values())


def allocate_ranks(
    scores: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], budget: float, r_max: int
) -> dict[str, int]:
    """Rank per module: a score-proportional share of ``budget`` parameters, capped at ``r_max``.

    The result never exceeds the budget; a module with a higher score never gets a lower rank than
    one of the same shape with a lower score.
    """
    names = sorted(shapes, key=lambda n: (-scores.get(n, 0.0), n))
    total = sum(max(scores.get(n, 0.0), 0.0) for n in names)
    cost = {n: shapes[n][0] + shapes[n][1] for n in names}
    ranks = {n: 0 for n in names}
    if total > 0:
        for n in names:
            share = budget * max(scores.get(n, 0.0), 0.0) / total
            ranks[n] = min(r_max, math.floor(share / cost[n]))
    left = budget - sum(ranks[n] * cost[n] for n in names)
    grew = True
    while grew:  # fill what rounding left, best score first, one rank at a time
        grew = False
        for n in names:
            if ranks[n] < r_max and cost[n] <= left and (scores.get(n, 0.0) > 0 or total == 0):
                ranks[n] += 1
                left -= cost[n]
                grew = True
    return ranks
