"""What ``runtime.debug=true`` writes for the tests: every holder's LoRA copies before aggregation."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from models.lora import lora_modules


def dump_copies(folder: Path, copies: dict[str, tuple[torch.nn.Module, float]]) -> None:
    """Writes each holder's pre-aggregation LoRA weights and its weight (runtime.debug; used by the tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (model, weight) in copies.items():
        tensors = {}
        for module, m in lora_modules(model).items():
            tensors[f"{module}.A"] = m.lora_A["default"].weight.detach().cpu().contiguous()
            tensors[f"{module}.B"] = m.lora_B["default"].weight.detach().cpu().contiguous()
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"weight": repr(weight)})
