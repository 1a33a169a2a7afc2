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


# ---- Configs shaped like the checkpoints the papers use ----
#
# The full-size configs below carry the real checkpoints' dimensions and flags (tied or untied head,
# dropout, OPT's projection dims, GPT-Neo's local attention, grouped-query attention). ``small=True``
# keeps every flag and ratio that changes the code path and shrinks the widths and depth, so a random
# copy builds in a second; the full size is used on the meta device only (no memory).

CHECKPOINT_SHAPES: dict[str, tuple[str, dict]] = {
    "gpt2-small": (
        "gpt2",
        dict(
            vocab_size=50257,
            n_positions=1024,
            n_embd=768,
            n_layer=12,
            n_head=12,
            activation_function="gelu_new",
            resid_pdrop=0.1,
            embd_pdrop=0.1,
            attn_pdrop=0.1,
            bos_token_id=50256,
            eos_token_id=50256,
            tie_word_embeddings=True,
        ),
    ),
    "opt-125m": (
        "opt",
        dict(
            vocab_size=50272,
            hidden_size=768,
            word_embed_proj_dim=768,
            num_hidden_layers=12,
            ffn_dim=3072,
            num_attention_heads=12,
            max_position_embeddings=2048,
            do_layer_norm_before=True,
            dropout=0.1,
            attention_dropout=0.0,
            activation_function="relu",
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            tie_word_embeddings=True,
        ),
    ),
    "gpt-neo-125m": (
        "gpt_neo",
        dict(
            vocab_size=50257,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            attention_types=[[["global", "local"], 6]],
            window_size=256,
            max_position_embeddings=2048,
            embed_dropout=0.0,
            resid_dropout=0.0,
            attention_dropout=0.0,
            activation_function="gelu_new",
            bos_token_id=50256,
            eos_token_id=50256,
            tie_word_embeddings=True,
        ),
    ),
    "llama-2-7b": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2-0.5b": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            use_sliding_window=False,
            bos_token_id=151643,
            eos_token_id=151643,
            tie_word_embeddings=True,
        ),
    ),
}

# The small versions: 4 layers; widths cut down with the head ratios kept (Qwen2's 7 query heads per
# key/value head; GPT-Neo's window shorter than the test sequences so local attention really cuts).
_SMALL = {
    "gpt2-small": dict(n_positions=256, n_embd=64, n_layer=4, n_head=4),
    "opt-125m": dict(
        hidden_size=64,
        word_embed_proj_dim=64,
        num_hidden_layers=4,
        ffn_dim=256,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "gpt-neo-125m": dict(
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        attention_types=[[["global", "local"], 2]],
        window_size=8,
        max_position_embeddings=256,
    ),
    "llama-2-7b": dict(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    ),
    "qwen2-0.5b": dict(
        hidden_size=56,
        intermediate_size=304,
        num_hidden_layers=4,
        num_attention_heads=7,
        num_key_value_heads=1,
        max_position_embeddings=256,
    ),
}
# Which of them ship a pad token (GPT-2, GPT-Neo and Llama-2 do not; OPT and Qwen2 do).
_HAS_PAD = {"opt-125m": "<pad>", "qwen2-0.5b": "<|endoftext|>"}


def checkpoint_config(name: str, *, small: bool = True, **overrides) -> PretrainedConfig:
    """The config of checkpoint shape ``name`` (``CHECKPOINT_SHAPES``), full size or small, with any
    ``overrides`` (e.g. the vocabulary size and special-token ids of a test tokenizer)."""
    family, kwargs = CHECKPOINT_SHAPES[name]
    kwargs = {**kwargs, **(_SMALL[name] if small else {}), **overrides}
    cls = {
        "gpt2": GPT2Config,
        "opt": OPTConfig,
        "gpt_neo": GPTNeoConfig,
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
    }[family]
    return cls(**kwargs)


def build_byte_bpe_tokenizer(texts: list[str], vocab_size: int = 300, pad_token: str | None = None):
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2's scheme): ``<|endoftext|>`` is bos, eos and
    unk, and there is no pad token unless ``pad_token`` is given (as for GPT-2, GPT-Neo and Llama-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    end = "<|endoftext|>"
    specials = [end] + ([pad_token] if pad_token and pad_token != end else [])
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    extra = {"pad_token": pad_token} if pad_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=end, eos_token=end, unk_token=end, model_max_length=256, **extra
    )


def save_checkpoint_shaped(name: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Saves a small random model of checkpoint shape ``name`` with a byte-level BPE tokenizer (trained
    on the ``sort`` task's text) whose special-token ids the config uses."""
    from models.tiny import generate_examples

    texts = [r["prompt"] + r["response"] for r in generate_examples("sort", 200, seed)]
    tokenizer = build_byte_bpe_tokenizer(texts, pad_token=_HAS_PAD.get(name))
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = checkpoint_config(
        name,
        vocab_size=len(tokenizer),
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
