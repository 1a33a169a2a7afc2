"""The trained model as a plain Hugging Face checkpoint: the base with the global adapter merged in.

``merge_adapter`` loads the base from its folder and merges a PEFT adapter into it (PEFT's
``merge_and_unload``: ``W + scale * B @ A`` on every adapted module); ``save_merged`` writes the result
with the base's config and tokenizer, so ``AutoModelForCausalLM.from_pretrained`` loads it and it
gives the split model's logits. Other aggregation modes extend ``merge_adapter``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer

from models.stages import full_model


def merge_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> nn.Module:
    """The base model in ``model_dir`` with the PEFT adapter in ``adapter_dir`` merged into its weights."""
    base = full_model(model_dir, dtype, attn_implementation)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def save_merged(
    model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32"
) -> Path:
    """Writes the merged model (safetensors, config, generation config) and the base's tokenizer to
    ``out_dir``, whole: it is written under a temporary name and renamed into place."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged = merge_adapter(model_dir, adapter_dir, dtype)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    if out.exists():  # an empty folder the caller made
        out.rmdir()
    os.replace(tmp, out)
    return out
