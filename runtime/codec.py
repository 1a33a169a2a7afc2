"""Control messages as JSON, not pickle: what the round's gathers and broadcasts carry.

``torch.distributed``'s object collectives pickle what they send, so every rank would unpickle what
every peer sends (and unpickling runs code). The protocol's messages are plain data: numbers,
strings, lists, dicts, tensors and the dataclasses of ``runtime.messages`` (and the probe's
``ResourceProfile``), so they travel as UTF-8 JSON in a byte tensor. Decoding builds only those
types; an unknown type tag is an error, not an import.

What JSON lacks is tagged: a tuple, a dict whose keys are not all strings, a tensor (dtype, shape
and its raw bytes in base64, so it comes back bit for bit), a registered dataclass. NaN and
infinities use Python's JSON extension (``NaN``, ``Infinity``), read back as the same floats.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import torch

from partition.planner import Measured
from runtime import messages
from runtime.placement import RankReport
from runtime.probe import ResourceProfile


class CodecError(ValueError):
    """A message that this codec cannot carry or did not write."""


# The dataclasses a message may hold, by name: decoding builds nothing else.
TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        messages.UserError,
        messages.RunState,
        messages.Decision,
        messages.Divergence,
        messages.RoundStats,
        messages.SatOut,
        messages.CommBytes,
        messages.Settled,
        messages.ClientReport,
        messages.ServerReport,
        messages.Assignment,
        messages.WarmupScores,
        ResourceProfile,
        Measured,
        RankReport,
    )
}

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


def _to_json(obj: object) -> object:
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise CodecError(f"a tensor of dtype {t.dtype} cannot be sent as a control message")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"$tensor": name, "shape": list(t.shape), "data": base64.b64encode(raw).decode("ascii")}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        if TYPES.get(name) is not type(obj):
            raise CodecError(f"{name} is not a registered control message type (runtime.codec.TYPES)")
        fields = {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"$type": name, "fields": fields}
    if isinstance(obj, tuple):
        return {"$tuple": [_to_json(x) for x in obj]}
    if isinstance(obj, list):
        return [_to_json(x) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("$") for k in obj):
            return {k: _to_json(v) for k, v in obj.items()}
        return {"$items": [[_to_json(k), _to_json(v)] for k, v in obj.items()]}
    raise CodecError(f"a {type(obj).__name__} cannot be sent as a control message")


def _from_json(obj: object) -> object:
    if isinstance(obj, list):
        return [_from_json(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        dtype = _DTYPES.get(obj["$tensor"])
        if dtype is None:
            raise CodecError(f"unknown tensor dtype {obj['$tensor']!r}")
        raw = bytearray(base64.b64decode(obj["data"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(obj["shape"]).clone()
    if "$type" in obj:
        cls = TYPES.get(obj["$type"])
        if cls is None:
            raise CodecError(f"unknown message type {obj['$type']!r}")
        return cls(**{k: _from_json(v) for k, v in obj["fields"].items()})
    if "$tuple" in obj:
        return tuple(_from_json(x) for x in obj["$tuple"])
    if "$items" in obj:
        return {_hashable(_from_json(k)): _from_json(v) for k, v in obj["$items"]}
    return {k: _from_json(v) for k, v in obj.items()}


def _hashable(key: object) -> object:
    if isinstance(key, list | dict) or isinstance(key, torch.Tensor):
        raise CodecError(f"a {type(key).__name__} cannot be a dict key of a control message")
    return key


def encode(obj: object) -> bytes:
    """``obj`` as UTF-8 JSON (raises CodecError for a type a control message may not hold)."""
    return json.dumps(_to_json(obj), separators=(",", ":")).encode("utf-8")


def decode(data: bytes) -> object:
    """The message :func:`encode` wrote."""
    return _from_json(json.loads(data.decode("utf-8")))
