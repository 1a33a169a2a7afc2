"""Model families: where each Hugging Face causal LM keeps its parts, and how to run a slice of it.

A split run never calls the HF model's own ``forward``: the client runs the embeddings and
layers ``0..k-1``, the server runs layers ``k..L-1``, the final norm and the LM head. Each
family here says which module paths hold those parts and how to build the per-batch inputs
a decoder layer needs (causal mask, rotary or learned positions), reusing transformers' own
mask builders so a slice computes exactly what the full model computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


@dataclass(frozen=True)
class Family:
    """How one model family lays out its modules (paths relative to the ``*ForCausalLM`` object)."""

    name: str
    layers: str  # the ModuleList of decoder layers
    embed: tuple[str, ...]  # modules only the first stage needs (token and learned position embeddings)
    head: tuple[str, ...]  # modules only the last stage needs (final norm, projections, LM head)
    shared: tuple[str, ...]  # parameter-free modules every stage needs (rotary embedding)
    lora_targets: tuple[str, ...]  # default LoRA target module names inside a decoder layer
    embed_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    layer_inputs_fn: Callable[
        [nn.Module, PretrainedConfig, torch.Tensor, torch.Tensor | None], dict[str, Any]
    ]
    head_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    fan_in_fan_out: bool = False  # the LoRA targets store their weight (in, out): GPT-2's Conv1D


def get_module(model: nn.Module, path: str) -> Any:
    """The submodule at a dotted path (``model.layers``), as the family table names them."""
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _positions(attention_mask: torch.Tensor | None, seq_len: int, device: torch.device) -> torch.Tensor:
    # Right padding only (the collator pads on the right), so positions are 0..T-1 for every row.
    return torch.arange(seq_len, device=device).unsqueeze(0)


# ---- Llama, Qwen2, Mistral: rotary positions, RMSNorm, optional sliding-window layers ----


def _layer_types(config: PretrainedConfig) -> list[str]:
    """Per-layer attention kind, as the family's own forward chooses it."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    # Mistral has no layer_types: every layer slides when sliding_window is set.
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


def _llama_embed(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    return model.model.embed_tokens(input_ids)


def _llama_layer_inputs(
    model: nn.Module, config: PretrainedConfig, hidden: torch.Tensor, attention_mask: torch.Tensor | None
) -> dict[str, Any]:
    inputs = _plain_layer_inputs(model, config, hidden, attention_mask)
    types = _layer_types(config)
    if "sliding_attention" in types:
        inputs["masks"]["sliding_attention"] = create_sliding_window_causal_mask(
            *_mask_args(config, hidden, attention_mask, inputs["position_ids"])
        )
    inputs["layer_types"] = types
    inputs["position_embeddings"] = model.model.rotary_emb(hidden, inputs["position_ids"])
    return inputs


def _llama_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(hidden))


# ---- GPT-2 and GPT-Neo: learned positions added at the input, LayerNorm head ----


def _gpt2_embed(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    t = model.transformer
    position_ids = _positions(attention_mask, input_ids.shape[1], input_ids.device)
    return t.drop(t.wte(input_ids) + t.wpe(position_ids))


def _mask_args(
    config: PretrainedConfig,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
) -> tuple[Any, ...]:
    """The mask builders' arguments, by position: their fourth parameter, the KV cache (a split run
    has none), is ``past_key_values`` up to transformers 5.21 and ``cache`` from 5.24, where the old
    keyword is deprecated (removal announced for 5.40). By position both take it."""
    return (config, hidden, attention_mask, None, position_ids)


def _plain_layer_inputs(
    model: nn.Module, config: PretrainedConfig, hidden: torch.Tensor, attention_mask: torch.Tensor | None
) -> dict[str, Any]:
    """Causal mask and positions, built by transformers' own mask builder as the full model does."""
    position_ids = _positions(attention_mask, hidden.shape[1], hidden.device)
    mask = create_causal_mask(*_mask_args(config, hidden, attention_mask, position_ids))
    return {"masks": {"full_attention": mask}, "position_ids": position_ids}


def _gpt2_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.transformer.ln_f(hidden))


# ---- OPT: learned positions with an offset, optional in/out projections ----


def _opt_embed(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    d = model.model.decoder
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # OPT derives positions from the mask (cumsum), exactly as its own forward does.
    position_ids = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
    x = d.embed_tokens(input_ids)
    if d.project_in is not None:
        x = d.project_in(x)
    return x + d.embed_positions(attention_mask, 0, position_ids=position_ids)


def _opt_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    d = model.model.decoder
    if d.final_layer_norm is not None:
        hidden = d.final_layer_norm(hidden)
    if d.project_out is not None:
        hidden = d.project_out(hidden)
    return model.lm_head(hidden)


_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {}
for _name in ("llama", "qwen2", "mistral"):
    FAMILIES[_name] = Family(
        name=_name,
        layers="model.layers",
        embed=("model.embed_tokens",),
        head=("model.norm", "lm_head"),
        shared=("model.rotary_emb",),
        lora_targets=_LLAMA_TARGETS,
        embed_fn=_llama_embed,
        layer_inputs_fn=_llama_layer_inputs,
        head_fn=_llama_head,
    )
FAMILIES["gpt2"] = Family(
    name="gpt2",
    layers="transformer.h",
    embed=("transformer.wte", "transformer.wpe"),
    head=("transformer.ln_f", "lm_head"),
    shared=(),
    lora_targets=("c_attn", "c_proj", "c_fc"),
    embed_fn=_gpt2_embed,
    layer_inputs_fn=_plain_layer_inputs,
    head_fn=_gpt2_head,
    fan_in_fan_out=True,
)
FAMILIES["gpt_neo"] = Family(
    name="gpt_neo",
    layers="transformer.h",
    embed=("transformer.wte", "transformer.wpe"),
    head=("transformer.ln_f", "lm_head"),
    shared=(),
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"),
    embed_fn=_gpt2_embed,
    layer_inputs_fn=_plain_layer_inputs,
    head_fn=_gpt2_head,
)
FAMILIES["opt"] = Family(
    name="opt",
    layers="model.decoder.layers",
    embed=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    head=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    shared=(),
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    embed_fn=_opt_embed,
    layer_inputs_fn=_plain_layer_inputs,
    head_fn=_opt_head,
)


def family_of(config: PretrainedConfig) -> Family:
    """The family for a HF config, or a ValueError listing the supported ``model_type`` values."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(
            f"model_type {config.model_type!r} is not supported for splitting; supported: "
            f"{sorted(FAMILIES)}. Add a Family entry in models/families.py for it."
        )
    return family


def run_layer(layer: nn.Module, index: int, hidden: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """Runs decoder layer ``index`` with the per-batch inputs built by ``Family.layer_inputs_fn``."""
    masks = inputs["masks"]
    kinds = inputs.get("layer_types")
    kwargs: dict[str, Any] = {
        "attention_mask": masks[kinds[index]] if kinds else masks["full_attention"],
        "position_ids": inputs["position_ids"],
    }
    if "position_embeddings" in inputs:
        kwargs["position_embeddings"] = inputs["position_embeddings"]
    out = layer(hidden, **kwargs)
    # Some families still return a tuple (hidden, attn weights, ...).
    return out[0] if isinstance(out, tuple) else out
