"""Random-weight checkpoints of every supported family, saved as ordinary HF folders.

Tests and benchmarks use these: they build in seconds, need no hub, and go through the same
``from_pretrained`` / safetensors loading path as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

from models.tiny import build_char_tokenizer


def random_config(
    family: str, *, n_layers: int = 4, hidden: int = 64, heads: int = 4, vocab: int = 128, max_len: int = 256
) -> PretrainedConfig:
    """A small config of ``family`` with the given sizes (eager-free defaults, no dropout)."""
    if family in ("llama", "qwen2", "mistral"):
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
        extra = {"sliding_window": None} if family == "mistral" else {}
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_len,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=n_layers,
            n_head=heads,
            n_positions=max_len,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "gpt_neo":
        return GPTNeoConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=n_layers,
            num_heads=heads,
            attention_types=[[["global", "local"], max(1, n_layers // 2)]]
            if n_layers % 2 == 0
            else [[["global"], n_layers]],
            window_size=16,
            max_position_embeddings=max_len,
            resid_dropout=0.0,
            embed_dropout=0.0,
            attention_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            ffn_dim=hidden * 2,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            max_position_embeddings=max_len,
            dropout=0.0,
            attention_dropout=0.0,
            word_embed_proj_dim=hidden,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(f"unknown family {family!r}")


def save_random_model(family: str, out_dir: str | Path, *, seed: int = 0, **sizes: int) -> Path:
    """Saves a random ``family`` model (safetensors) and the built-in character tokenizer to ``out_dir``."""
    tokenizer = build_char_tokenizer()
    sizes.setdefault("vocab", len(tokenizer))
    if sizes["vocab"] < len(tokenizer):
        raise ValueError(f"vocab={sizes['vocab']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(random_config(family, **sizes))
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
