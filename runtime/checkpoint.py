"""Checkpoints (what ``runtime.resume`` needs) and the exported PEFT adapter, written atomically.

A round's state is the global adapter plus the round number: optimizers restart every round
and data order is a function of (seed, client, round), so nothing else is needed to continue
exactly where a preempted job stopped. Files are written to a temporary name and renamed, and
``state.json`` goes last, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.lora import export_peft_adapter

ADAPTER_FILE = "global_adapter.safetensors"
STATE_FILE = "state.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(ckpt_dir: Path, flat: torch.Tensor, state: dict) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / (ADAPTER_FILE + ".tmp")
    save_file({"flat": flat.detach().cpu().contiguous()}, str(tmp))
    os.replace(tmp, ckpt_dir / ADAPTER_FILE)
    _atomic_write_text(ckpt_dir / STATE_FILE, json.dumps(state, indent=2))


def load(ckpt_dir: Path, expect: dict) -> tuple[dict, torch.Tensor] | None:
    """The saved (state, flat adapter), or None if there is no complete checkpoint.

    ``expect`` holds what must match the current run (model, cut layers, layout size); a
    mismatch is an error that says which setting changed rather than a silent wrong resume.
    """
    state_path = ckpt_dir / STATE_FILE
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    for key, value in expect.items():
        if state.get(key) != value:
            raise ValueError(
                f"checkpoint {str(ckpt_dir)!r} was written with {key}={state.get(key)!r} but this run has "
                f"{value!r}: restore that setting, or use a new output_dir (or runtime.resume=false "
                "with a new output_dir) to start over"
            )
    flat = load_file(str(ckpt_dir / ADAPTER_FILE))["flat"]
    return state, flat


def export_adapter(out: Path, layout, flat: torch.Tensor, spec, model_config, model_path: Path) -> None:
    """Writes ``out/adapter`` (PEFT format) via a temporary folder, so a crash keeps the last one."""
    tmp = out / "adapter.tmp"
    export_peft_adapter(layout, flat.cpu(), spec, model_config, tmp, str(Path(model_path).resolve()))
    replace_dir(tmp, out / "adapter")


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves a fully written folder into place, keeping the old one until the new one is there."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
