"""The trained model as a plain Hugging Face checkpoint: the base with the global adapter merged in.

``merge_adapter`` loads the base from its folder and merges a PEFT adapter into it (PEFT's
``merge_and_unload``: ``W + scale * B @ A`` on every adapted module); ``save_merged`` writes the result
with the base's config and tokenizer, so ``AutoModelForCausalLM.from_pretrained`` loads it and it
gives the split model's logits. Under ``train.aggregation=stack`` the run has no adapter: the merged
weights come from its checkpoint (``with_weights``), and ``delta_adapter`` can approximate their
total delta by a low-rank PEFT adapter, with the error it carries.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

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


def with_weights(
    model_dir: str | Path, weights: dict[str, torch.Tensor], dtype: str = "float32"
) -> nn.Module:
    """The base model with the named modules' weights replaced (``stack``: the merged weights the
    run's checkpoint holds, the frozen base plus every round's exact delta)."""
    model = full_model(model_dir, dtype)
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)
    return model


def delta_adapter(
    model_dir: str | Path, weights: dict[str, torch.Tensor], rank: int, out_dir: str | Path
) -> float:
    """Writes a PEFT adapter of rank ``rank`` for the total delta ``weights - base`` (the best rank-``rank``
    approximation of each module's delta, by SVD) and returns its relative error over all modules,
    ``||delta - B A||_F / ||delta||_F``."""
    base = full_model(model_dir)
    tensors, err2, norm2 = {}, 0.0, 0.0
    for name, w in weights.items():
        module = base.get_submodule(name)
        delta = w.double() - module.weight.double()
        if isinstance(module, Conv1D):  # stored (in, out): LoRA's B @ A is (out, in)
            delta = delta.T
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, sv.shape[0])
        b = u[:, :k] * sv[:k].sqrt()
        a = sv[:k].sqrt()[:, None] * vh[:k]
        err2 += float((delta - b @ a).pow(2).sum())
        norm2 += float(delta.pow(2).sum())
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.float().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(weights), task_type="CAUSAL_LM")
    config.base_model_name_or_path = str(Path(model_dir).resolve())
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0


def save_merged(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    out_dir: str | Path,
    dtype: str = "float32",
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes the merged model (safetensors, config, generation config) and the base's tokenizer to
    ``out_dir``, whole: it is written under a temporary name and renamed into place. The model is
    the base with ``adapter_dir`` merged in, or (``stack``) the base with ``weights`` put in."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if weights is not None:
        merged = with_weights(model_dir, weights, dtype)
    else:
        merged = merge_adapter(model_dir, adapter_dir, dtype)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    if out.exists():  # an empty folder the caller made
        out.rmdir()
    os.replace(tmp, out)
    return out
