"""LoRA on a stage through PEFT, and the global adapter's flat layout.

Every holder of a layer's adapter (a client below its cut, or the server's replica for that
client above it) names the adapter as the full model does, so one *layout* over all layers
describes the global adapter: per target module its global rank ``R`` (the largest rank any
holder uses), ``A`` of shape ``(R, in)`` and ``B`` of shape ``(out, R)``. A holder of a smaller
rank uses the leading rows of ``A`` and columns of ``B``. The scaling ``alpha / r`` is the same
for every rank (``alpha`` grows with ``r``), so zero-padding keeps ``B @ A * scale`` exact.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from models.families import Family, family_of, get_module
from models.stages import Stage

ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    """The run's LoRA settings: rank ``r`` everywhere, ``r_cut`` on a client's last (cut) layer."""

    r: int
    alpha: float
    r_cut: int
    targets: tuple[str, ...]
    dropout: float = 0.0
    module_ranks: tuple[tuple[str, int], ...] | None = None
    """HSplitLoRA's chosen weights: (full module name, rank) for every candidate module; rank 0 means
    no LoRA there. None: every module named by ``targets`` gets ``r``. A holder's rank on a module is
    ``min(this rank, the holder's rank for the layer)``."""

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def module_rank(self, name: str) -> int:
        """The rank the selection gives module ``name`` (``r`` without a selection)."""
        if self.module_ranks is None:
            return self.r
        return dict(self.module_ranks).get(name, 0)


def with_selection(spec: LoraSpec, ranks: Mapping[str, int]) -> LoraSpec:
    """``spec`` with per-module ranks (the importance selection)."""
    return LoraSpec(
        spec.r,
        spec.alpha,
        spec.r_cut,
        spec.targets,
        spec.dropout,
        tuple(sorted((n, int(r)) for n, r in ranks.items())),
    )


def _layer_pattern(family: Family, layer: int) -> str:
    return family.layers.replace(".", r"\.") + rf"\.{layer}\..*"


def lora_config(spec: LoraSpec, family: Family, ranks: dict[int, int] | None = None) -> LoraConfig:
    """A PEFT LoraConfig; ``ranks`` maps layer index -> rank for layers that differ from ``spec.r``.

    With a selection (``spec.module_ranks``) the config names exactly the chosen modules of the
    layers in ``ranks`` (all layers if None) and gives each its rank (``min`` of the selection's and
    the layer's), through PEFT's ``rank_pattern``/``alpha_pattern``.
    """
    if spec.module_ranks is not None:
        wanted = {}
        for name, r in spec.module_ranks:
            j = module_layer(name, family)
            if r > 0 and (ranks is None or j in ranks):
                wanted[name] = min(r, ranks[j]) if ranks is not None else r
        return module_lora_config(spec, family, wanted)
    ranks = {j: r for j, r in (ranks or {}).items() if r != spec.r}
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=spec.dropout,
        bias="none",
        rank_pattern={_layer_pattern(family, j): r for j, r in ranks.items()},
        # Same alpha/r on every layer: zero-padding a small-rank copy then changes nothing.
        alpha_pattern={_layer_pattern(family, j): spec.scale * r for j, r in ranks.items()},
        fan_in_fan_out=family.fan_in_fan_out,
        task_type="CAUSAL_LM",
    )


def module_lora_config(spec: LoraSpec, family: Family, ranks: Mapping[str, int]) -> LoraConfig:
    """A PEFT LoraConfig naming each module (full name) with its own rank; alpha/r stays ``spec.scale``."""
    key = lambda name: re.escape(name)
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=sorted(ranks),
        lora_dropout=spec.dropout,
        bias="none",
        rank_pattern={key(n): r for n, r in ranks.items() if r != spec.r},
        alpha_pattern={key(n): spec.scale * r for n, r in ranks.items() if r != spec.r},
        fan_in_fan_out=family.fan_in_fan_out,
        task_type="CAUSAL_LM",
    )


def target_ranks(
    start: int, end: int, spec: LoraSpec, cut_rank: int | None, cap: int | None = None
) -> dict[int, int]:
    """Rank of each layer of a stage ``[start, end)``: ``cap`` (a client's own rank, default ``spec.r``)
    everywhere and ``cut_rank`` (client stages) on ``end-1``."""
    ranks = {j: cap or spec.r for j in range(start, end)}
    if cut_rank is not None and end > start:
        ranks[end - 1] = min(cut_rank, cap or spec.r)
    return ranks


def add_lora(stage: Stage, spec: LoraSpec, cut_rank: bool) -> None:
    """Injects LoRA into the stage's decoder layers (``r_cut`` on its last layer if ``cut_rank``)."""
    inject_layers(stage, spec, target_ranks(stage.start, stage.end, spec, spec.r_cut if cut_rank else None))


def inject_layers(stage: Stage, spec: LoraSpec, ranks: dict[int, int]) -> None:
    """Injects LoRA of the given rank into each listed layer of the stage (layers without LoRA yet).

    PEFT sees a bare container that holds just those layers under their full-model path, so the
    stage's other (already adapted) layers are untouched and module names stay the full model's.
    """
    if not ranks:
        return
    root = nn.Module()
    node = root
    *parents, leaf = stage.family.layers.split(".")
    for part in parents:
        setattr(node, part, nn.Module())
        node = getattr(node, part)
    setattr(node, leaf, nn.ModuleDict({str(j): stage.layers[str(j)] for j in sorted(ranks)}))
    config = lora_config(spec, stage.family, ranks)
    if config.target_modules:  # a selection may choose no module of these layers
        _inject(config, root, stage.family)
    stage.lora_ranks.update(ranks)
    for j in ranks:
        for name, p in stage.layers[str(j)].named_parameters():
            p.requires_grad_(".lora_" in name)


def strip_layers(stage: Stage, layers: list[int]) -> None:
    """Removes LoRA from the listed layers (each adapted module goes back to its base layer)."""
    for j in layers:
        layer = stage.layers[str(j)]
        stage.lora_ranks.pop(j, None)
        for name, m in list(lora_modules(layer).items()):
            parent, _, leaf = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, leaf, m.get_base_layer())


def layer_rank(stage: Stage, layer: int) -> int:
    """The LoRA rank the stage holds at ``layer`` (its modules have ``min`` of it and their selected rank)."""
    return stage.lora_ranks[layer]


def set_layer_rank(stage: Stage, spec: LoraSpec, layer: int, rank: int) -> None:
    """Re-creates layer ``layer``'s LoRA at ``rank`` (values are then loaded with ``write_adapter``)."""
    if layer_rank(stage, layer) != rank:
        strip_layers(stage, [layer])
        inject_layers(stage, spec, {layer: rank})


def _inject(config: LoraConfig, model: nn.Module, family: Family) -> None:
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:
        if "not found" not in str(e):
            raise
        raise ValueError(
            f"lora.targets={sorted(config.target_modules)} match no module of this {family.name} model; "
            f"use names of a decoder layer's linear layers (defaults for {family.name}: "
            f"{list(family.lora_targets)}) or lora.targets=null"
        ) from e


def lora_modules(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def named_lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".lora_" in n]


def module_layer(name: str, family: Family) -> int:
    """The decoder layer index of a module named ``<layers>.<j>.<...>``."""
    return int(name[len(family.layers) + 1 :].split(".", 1)[0])


@dataclass(frozen=True)
class Slot:
    name: str  # full-model module name, e.g. model.layers.3.self_attn.q_proj
    layer: int
    rank: int  # the global rank R of this module
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False  # the base weight is stored (in, out) (GPT-2's Conv1D)

    @property
    def numel(self) -> int:
        return self.rank * (self.in_features + self.out_features)


class AdapterLayout:
    """The global adapter as one flat vector: for each slot, ``A`` (R x in) then ``B`` (out x R)."""

    def __init__(self, slots: list[Slot]):
        self.slots = sorted(slots, key=lambda s: (s.layer, s.name))
        self.offsets: dict[str, int] = {}
        offset = 0
        for s in self.slots:
            self.offsets[s.name] = offset
            offset += s.numel
        self.numel = offset
        self.by_name = {s.name: s for s in self.slots}

    def views(self, flat: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        s, o = self.by_name[name], self.offsets[name]
        a = flat[o : o + s.rank * s.in_features].view(s.rank, s.in_features)
        b = flat[o + s.rank * s.in_features : o + s.numel].view(s.out_features, s.rank)
        return a, b


def target_shapes(config: PretrainedConfig, spec: LoraSpec) -> dict[str, tuple[int, int, bool]]:
    """(in, out, fan_in_fan_out) of every LoRA target module of the full model, found on the meta device."""
    family = family_of(config)
    with init_empty_weights():
        hf = AutoModelForCausalLM.from_config(config)
        _inject(lora_config(LoraSpec(1, 1.0, 1, spec.targets), family), hf, family)
    shapes = {}
    for name, m in lora_modules(hf).items():
        if name.startswith(family.layers + "."):
            a, b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
            shapes[name] = (a.shape[1], b.shape[0], bool(getattr(m, "fan_in_fan_out", False)))
    return shapes


def candidate_targets(config: PretrainedConfig) -> tuple[str, ...]:
    """Every linear weight of a decoder layer (the candidates of ``lora.selection=importance``)."""
    from transformers.pytorch_utils import Conv1D

    family = family_of(config)
    with init_empty_weights():
        hf = AutoModelForCausalLM.from_config(config)
    layer = get_module(hf, family.layers)[0]
    return tuple(
        sorted({n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
    )


def holder_rank(
    layer: int,
    cut: int,
    spec: LoraSpec,
    cut_rank: int | None = None,
    cap: int | None = None,
    tail_start: int | None = None,
) -> int:
    """The rank of layer ``layer`` in the chain of a client cut at ``cut``: on the client ``cap`` (its own
    rank, default ``spec.r``) and ``cut_rank`` (default ``spec.r_cut``) on its cut layer; ``spec.r`` on
    its server replica. Layers from ``tail_start`` on (a U-shaped split's tail) are the client's again."""
    if tail_start is not None and layer >= tail_start:
        return cap or spec.r
    if layer >= cut:
        return spec.r
    cap = cap or spec.r
    return min(spec.r_cut if cut_rank is None else cut_rank, cap) if layer == cut - 1 else cap


def chain_ranks(
    layout: AdapterLayout,
    spec: LoraSpec,
    cut: int,
    cut_rank: int,
    cap: int | None = None,
    tail_start: int | None = None,
) -> dict[str, int]:
    """The rank of every module of the layout in one client's chain (its layers and its server replica's)."""
    return {
        s.name: min(spec.module_rank(s.name), holder_rank(s.layer, cut, spec, cut_rank, cap, tail_start))
        for s in layout.slots
    }


def build_layout(
    config: PretrainedConfig,
    spec: LoraSpec,
    cut_layers: list[int],
    caps: list[int | None] | None = None,
    tail_start: int | None = None,
) -> AdapterLayout:
    """The layout for clients cut at ``cut_layers`` (own ranks ``caps``): each module's rank is the largest
    among its holders; modules the selection leaves out (rank 0) have no slot.

    With no cut layers (the unsplit model) every module has its selected rank (``spec.r`` by default).
    """
    family = family_of(config)
    caps = caps or [None] * len(cut_layers)
    slots = []
    for name, (n_in, n_out, fan) in target_shapes(config, spec).items():
        j = module_layer(name, family)
        held = max(
            (holder_rank(j, k, spec, None, c, tail_start) for k, c in zip(cut_layers, caps)), default=spec.r
        )
        rank = min(spec.module_rank(name), held)
        if rank > 0:
            slots.append(Slot(name, j, rank, n_in, n_out, fan))
    return AdapterLayout(slots)


def _initial_a(s: Slot, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(s.name.encode()))
    bound = 1.0 / math.sqrt(s.in_features)  # kaiming_uniform_(a=sqrt(5)), as PEFT does
    return torch.rand((s.rank, s.in_features), generator=g) * 2 * bound - bound


def initial_adapter(layout: AdapterLayout, seed: int) -> torch.Tensor:
    """The round-0 global adapter: PEFT's init (A kaiming-uniform, B zero), drawn per module from the seed.

    Every holder must start from the same adapter, so A is drawn from a generator keyed by the
    module's name rather than from each process's global RNG.
    """
    flat = torch.zeros(layout.numel)
    for s in layout.slots:
        layout.views(flat, s.name)[0].copy_(_initial_a(s, seed))
    return flat


def reducible(layout: AdapterLayout, flat: torch.Tensor, layer: int, rank: int) -> bool:
    """Whether a holder of rank ``rank`` at ``layer`` computes exactly what the global adapter does there.

    True when no component past ``rank`` is live (``B[:, rank:] == 0`` in every module of the layer):
    then truncating to ``rank`` changes nothing.
    """
    return all(
        not bool(layout.views(flat, s.name)[1][:, rank:].any()) for s in layout.slots if s.layer == layer
    )


def grow_layers(
    model: nn.Module, layout: AdapterLayout, flat: torch.Tensor, layers: set[int], old_rank: int, seed: int
) -> None:
    """After ``write_adapter``: makes layers that grew from ``old_rank`` compute what they did before.

    Their new components get ``B = 0`` (so the function is unchanged) and the global ``A`` rows, or
    the seeded initial ``A`` where those rows are all zero (so the new components can still learn).
    """
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            s = layout.by_name[name]
            if s.layer not in layers:
                continue
            la, lb = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
            lb[:, old_rank:].zero_()
            a = layout.views(flat, name)[0][old_rank : la.shape[0]]
            if not bool(a.any()):
                la[old_rank:].copy_(_initial_a(s, seed)[old_rank : la.shape[0]].to(la))


def write_adapter(model: nn.Module, layout: AdapterLayout, flat: torch.Tensor) -> None:
    """Loads the global adapter into the model's LoRA modules (each takes its leading rank)."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            a, b = layout.views(flat, name)
            la, lb = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
            r = la.shape[0]
            la.copy_(a[:r].to(la))
            lb.copy_(b[:, :r].to(lb))


@contextmanager
def global_view(
    models: list[nn.Module], layout: AdapterLayout | None, flat: torch.Tensor | None
) -> Iterator[None]:
    """Within the block every LoRA module of ``models`` computes the global adapter at its full rank.

    A holder may train a smaller rank than the global adapter has (a client's own rank, ``r_cut``);
    evaluating through this view measures exactly the adapter that is exported, not the holders'
    truncations. The holders' own weights are put back afterwards.
    """
    saved = []
    try:
        for model in models if layout is not None else []:
            for name, m in lora_modules(model).items():
                la, lb = m.lora_A[ADAPTER], m.lora_B[ADAPTER]
                a, b = layout.views(flat, name)
                saved.append((la, lb, la.weight, lb.weight))
                la.weight = nn.Parameter(a.to(la.weight), requires_grad=False)
                lb.weight = nn.Parameter(b.to(lb.weight), requires_grad=False)
        yield
    finally:
        for la, lb, wa, wb in saved:
            la.weight, lb.weight = wa, wb


def read_adapter(model: nn.Module, layout: AdapterLayout, flat: torch.Tensor, weight: float) -> None:
    """Adds ``weight *`` the model's LoRA weights into ``flat`` (zero-padded to the global rank)."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            a, b = layout.views(flat, name)
            la, lb = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
            r = la.shape[0]
            a[:r].add_(la.detach().to(flat), alpha=weight)
            b[:, :r].add_(lb.detach().to(flat), alpha=weight)


def peft_adapter(
    layout: AdapterLayout, flat: torch.Tensor, spec: LoraSpec, config: PretrainedConfig, base_model: str
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The PEFT config and tensors (copies, one per LoRA weight) of the global adapter ``flat``."""
    family = family_of(config)
    per_layer: dict[int, set[int]] = {}
    for s in layout.slots:
        per_layer.setdefault(s.layer, set()).add(s.rank)
    if spec.module_ranks is None and all(len(r) == 1 for r in per_layer.values()):
        cfg = lora_config(spec, family, {j: r.pop() for j, r in per_layer.items()})
    else:  # per-weight ranks (a selection, or clients' own ranks): every module named with its rank
        cfg = module_lora_config(spec, family, {s.name: s.rank for s in layout.slots})
    cfg.base_model_name_or_path = base_model
    tensors = {}
    for s in layout.slots:
        a, b = layout.views(flat, s.name)
        tensors[f"base_model.model.{s.name}.lora_A.weight"] = a.contiguous().clone()
        tensors[f"base_model.model.{s.name}.lora_B.weight"] = b.contiguous().clone()
    return cfg, tensors


def write_peft_adapter(cfg: LoraConfig, tensors: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Writes what :func:`peft_adapter` made into ``out_dir``; runs no tensor op."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(out))
    return out
