"""A stage: a contiguous slice of a HF causal LM that materialises only the modules it owns.

``build_stage(model_dir, start, end)`` builds the model class on the meta device (no memory),
drops every module outside ``[start, end)`` and loads just the owned tensors from the
checkpoint's safetensors. Module names stay those of the full model (layer ``j`` is still
``model.layers.j``), so LoRA weights on any stage carry the full model's PEFT names.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from models.families import Family, family_of, get_module, run_layer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_config(model_dir: str | Path) -> PretrainedConfig:
    """The HF config of a local checkpoint folder, with an error that says what is missing."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {str(path)!r} has no config.json: set model.path to a local Hugging Face "
            "checkpoint folder (one written by save_pretrained)."
        )
    return AutoConfig.from_pretrained(path)


class CheckpointReader:
    """Reads single tensors from a local checkpoint (safetensors, sharded or not) without loading the rest."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.dir / v for k, v in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {str(self.dir)!r}: save the "
                "checkpoint with save_pretrained(..., safe_serialization=True) (or convert its .bin weights)."
            )
        self._open: dict[Path, object] = {}

    def keys(self) -> set[str]:
        return set(self.files)

    def _file(self, key: str):
        file = self.files[key]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file]

    def get(self, key: str) -> torch.Tensor:
        return self._file(key).get_tensor(key)  # type: ignore[attr-defined]

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from its file's header (nothing is read)."""
        return tuple(self._file(key).get_slice(key).get_shape())  # type: ignore[attr-defined]


def checkpoint_mismatches(model_dir: str | Path) -> list[str]:
    """Where a checkpoint's weights disagree with its config.json: each parameter the config implies
    that no weights file holds, or holds at another shape (e.g. a config.json of another size copied
    beside the weights). Reads the files' headers only."""
    config = load_config(model_dir)
    with init_empty_weights(include_buffers=False):
        hf = AutoModelForCausalLM.from_config(config)
    reader = CheckpointReader(model_dir)
    keys = reader.keys()
    tied = dict(getattr(hf, "_tied_weights_keys", None) or {})
    prefix = getattr(hf, "base_model_prefix", "")
    found = []
    for name, param in hf.named_parameters(remove_duplicate=False):
        key = _checkpoint_key(name, keys, prefix, tied)
        if key is None:
            found.append(f"no weights file holds {name}")
        elif (shape := reader.shape(key)) != tuple(param.shape):
            found.append(f"{key} is {list(shape)} in the weights, {list(param.shape)} by config.json")
    return found


def _checkpoint_key(name: str, keys: set[str], prefix: str, tied: dict[str, str]) -> str | None:
    """A parameter's key in the checkpoint (handles prefixless GPT-2 files and tied heads)."""
    for candidate in (name, name.removeprefix(prefix + ".")):
        if candidate in keys:
            return candidate
    if name in tied:
        return _checkpoint_key(tied[name], keys, prefix, {})
    return None


class Stage(nn.Module):
    """Layers ``[start, end)`` of a causal LM; the embeddings if ``start == 0``, the head if ``end == L``.

    ``forward`` takes ``input_ids`` on a first stage and hidden states otherwise; it returns
    hidden states, or logits on a last stage. ``self.hf`` is the pruned HF model: its
    parameter names are the full model's names.
    """

    def __init__(
        self, hf: nn.Module, family: Family, config: PretrainedConfig, start: int, end: int, head: bool = True
    ):
        super().__init__()
        self.hf = hf
        self.family = family
        self.config = config
        self.start, self.end = start, end
        self.head = head  # False: a stage ending at the top layer without the norm and head (U-shaped)
        self.lora_ranks: dict[int, int] = {}  # layer -> the LoRA rank this stage holds it at (models.lora)
        self.checkpointing = False  # recompute each decoder layer's activations in the backward

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.head and self.end == self.config.num_hidden_layers

    @property
    def layers(self) -> nn.ModuleDict:
        return get_module(self.hf, self.family.layers)

    def add_layers(self, layers: dict[int, nn.Module]) -> None:
        """Adds a block of decoder layers adjacent to the stage (below ``start`` or from ``end`` up)."""
        if not layers:
            return
        lo, hi = min(layers), max(layers) + 1
        if sorted(layers) != list(range(lo, hi)) or not (hi == self.start or lo == self.end):
            raise ValueError(
                f"layers {sorted(layers)} are not a contiguous block next to [{self.start}, {self.end})"
            )
        if lo == 0 and self.start > 0 or hi == self.config.num_hidden_layers and self.end < hi:
            raise ValueError("a stage cannot gain the embeddings or the head by adding layers")
        for index, module in layers.items():
            self.layers[str(index)] = module
        self.start, self.end = min(self.start, lo), max(self.end, hi)

    def drop_layers(self, indices: list[int]) -> dict[int, nn.Module]:
        """Removes a block of layers at either end of the stage and returns them."""
        if not indices:
            return {}
        lo, hi = min(indices), max(indices) + 1
        if (
            sorted(indices) != list(range(lo, hi))
            or not (lo == self.start or hi == self.end)
            or hi - lo >= len(self.layers)
        ):
            raise ValueError(
                f"cannot drop layers {sorted(indices)} from [{self.start}, {self.end}): "
                "drop a block at one end and keep at least one layer"
            )
        dropped = {j: self.layers[str(j)] for j in indices}
        for j in indices:
            del self.layers[str(j)]
            self.lora_ranks.pop(j, None)
        if lo == self.start:
            self.start = hi
        else:
            self.end = lo
        return dropped

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.is_first:
            if input_ids is None:
                raise ValueError("the first stage takes input_ids")
            hidden = self.family.embed_fn(self.hf, input_ids, attention_mask)
        elif hidden is None:
            raise ValueError(f"a stage starting at layer {self.start} takes hidden states")
        if self.end > self.start:
            inputs = self.family.layer_inputs_fn(self.hf, self.config, hidden, attention_mask)
            for index in range(self.start, self.end):
                if self.checkpointing:
                    hidden = recomputed(run_layer, self.layers[str(index)], index, hidden, inputs)
                else:
                    hidden = run_layer(self.layers[str(index)], index, hidden, inputs)
        if self.is_last:
            return self.family.head_fn(self.hf, hidden)
        return hidden


def recomputed(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` under activation checkpointing when autograd records: only the inputs are
    kept, and the forward runs again in the backward, with the random state (dropout's masks) and the
    autocast state it had. Non-reentrant, so it nests in any backward (a local one inside distributed
    autograd's) and leaves parameter gradients on ``.grad`` as usual."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def checkpoint_layers(layers: Iterable[nn.Module]) -> None:
    """Activation checkpointing of an ordinary HF model's decoder layers (the unsplit reference): each
    layer's ``forward`` is wrapped, so its hooks run once, at the forward, and not again in the
    recomputation."""
    for layer in layers:
        layer.forward = functools.partial(recomputed, layer.forward)


def validate_split(config: PretrainedConfig, start: int, end: int) -> None:
    n = config.num_hidden_layers
    if not 0 <= start <= end <= n:
        raise ValueError(f"stage layers [{start}, {end}) are outside the model's {n} layers (0..{n})")


def _set_path(model: nn.Module, path: str, value: nn.Module | None) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_module(model, parent) if parent else model, leaf, value)


def build_stage(
    model_dir: str | Path,
    start: int,
    end: int,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    attn_implementation: str | None = None,
    head: bool = True,
) -> Stage:
    """Builds layers ``[start, end)`` of the checkpoint in ``model_dir``, loading only their tensors
    (with the final norm and head when ``end`` is the top, unless ``head=False``)."""
    config = load_config(model_dir)
    family = family_of(config)
    validate_split(config, start, end)
    torch_dtype = DTYPES[dtype]
    # Parameters on meta (free); buffers real, so non-persistent ones such as rotary inv_freq are right.
    # attn_implementation None lets transformers pick as from_pretrained does (sdpa where supported).
    with init_empty_weights(include_buffers=False):
        hf = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype, attn_implementation=attn_implementation
        )
    config = hf.config
    layers = get_module(hf, family.layers)
    owned = nn.ModuleDict({str(i): layers[i] for i in range(start, end)})
    _set_path(hf, family.layers, owned)
    for path in family.embed if start > 0 else ():
        _set_path(hf, path, None)
    with_head = head and end == config.num_hidden_layers
    for path in family.head if not with_head else ():
        _set_path(hf, path, None)
    # lm_head may be tied to the input embedding: untie so each stage holds its own copy.
    if with_head and start > 0:
        hf.lm_head.weight = nn.Parameter(torch.empty_like(hf.lm_head.weight, device="meta"))
    _load_owned(hf, model_dir, device, torch_dtype)
    # Each stage holds its own copy of a tied head (loaded above); tell PEFT nothing is tied.
    hf.config.tie_word_embeddings = False
    hf.requires_grad_(False)
    hf.train()
    return Stage(hf, family, config, start, end, head)


def _load_owned(hf: nn.Module, model_dir: str | Path, device: str | torch.device, dtype: torch.dtype) -> None:
    reader = CheckpointReader(model_dir)
    keys = reader.keys()
    tied = dict(getattr(hf, "_tied_weights_keys", None) or {})
    prefix = getattr(hf, "base_model_prefix", "")
    for name, _ in list(hf.named_parameters(remove_duplicate=False)):
        key = _checkpoint_key(name, keys, prefix, tied)
        if key is None:
            raise KeyError(
                f"checkpoint {str(model_dir)!r} has no tensor for parameter {name!r}: the folder does not "
                "match its config.json (re-save it with save_pretrained)."
            )
        set_module_tensor_to_device(hf, name, device, value=reader.get(key), dtype=dtype)
    for name, buf in list(hf.named_buffers()):
        if buf.device != torch.device(device):
            set_module_tensor_to_device(hf, name, device, value=buf)


def read_tensors(
    model_dir: str | Path, modules: list[str], dtype: str = "float32", device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The ``weight`` of each named module (full-model names), read alone from the checkpoint."""
    reader = CheckpointReader(model_dir)
    keys = reader.keys()
    out = {}
    for name in modules:
        param = f"{name}.weight"
        key = _checkpoint_key(param, keys, param.split(".", 1)[0], {})
        if key is None:
            raise KeyError(f"checkpoint {str(model_dir)!r} has no tensor for {param!r}")
        out[name] = reader.get(key).to(device=device, dtype=DTYPES[dtype])
    return out


def build_layers(
    model_dir: str | Path,
    start: int,
    end: int,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> dict[int, nn.Module]:
    """Decoder layers ``[start, end)`` alone (only their tensors are read), for ``Stage.add_layers``."""
    n = load_config(model_dir).num_hidden_layers
    if not 0 < start < end < n:
        raise ValueError(f"build_layers needs inner layers 0 < start < end < {n}, got [{start}, {end})")
    stage = build_stage(
        model_dir, start, end, device=device, dtype=dtype, attn_implementation=attn_implementation
    )
    return {j: stage.layers[str(j)] for j in range(start, end)}


def stage_parameter_bytes(stage: Stage) -> int:
    return sum(p.numel() * p.element_size() for p in stage.parameters())


def full_model(
    model_dir: str | Path, dtype: str = "float32", attn_implementation: str | None = None
) -> nn.Module:
    """The unsplit HF model, loaded the ordinary way (the parity reference and the no-cut baseline)."""
    load_config(model_dir)
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )
