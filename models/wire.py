"""The hidden states that cross the split, and their gradients, in the wire's dtype (no processes).

``encode`` is applied where a tensor is sent and ``decode`` where it arrives; both are autograd
functions, so distributed autograd carries the gradient back across the same wire in the same
format:

- ``auto`` (the default): as computed, in the model's dtype.
- ``float32``: float32.
- ``bfloat16``: a cast; the gradient that travels back is bfloat16 too (autograd casts it).
- ``float16`` and ``int8``: per-token absmax scaling (each token's values divided by their
  largest magnitude; ``int8`` then rounds to 127 levels), the values' bytes packed into a
  float32 tensor with the token's scale as its last element, so the scale travels with the data
  and the gradient comes back packed the same way. The gradient through the quantiser is
  straight-through: the arriving packed gradient is dequantised and passed on unchanged.

Per element on the wire: 4, 2, 2 + 4/H and 1 + 4/H bytes (H: the hidden size).
"""

from __future__ import annotations

import torch

WIRE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
_TORCH = {"float16": torch.float16, "int8": torch.int8}
_LEVELS = 127.0


def wire_bytes_per_element(dtype: str, hidden: int, model_itemsize: int) -> float:
    """Bytes one hidden-state element takes on the wire (the scale shared by a token's ``hidden``)."""
    return {
        "auto": float(model_itemsize),
        "float32": 4.0,
        "bfloat16": 2.0,
        "float16": 4.0 * (_body_width(hidden, "float16") + 1) / hidden,
        "int8": 4.0 * (_body_width(hidden, "int8") + 1) / hidden,
    }[dtype]


def _body_width(hidden: int, dtype: str) -> int:
    """float32 slots the packed values of one token take (padded to whole 4-byte slots)."""
    return -(-hidden * _TORCH[dtype].itemsize // 4)


def pack(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``(..., H)`` floats -> ``(..., body + 1)`` float32: scaled ``dtype`` values, then the scale."""
    scale = x.detach().abs().amax(-1, keepdim=True).float().clamp(min=torch.finfo(torch.float32).tiny)
    unit = x.detach().float() / scale
    q = torch.round(unit * _LEVELS).to(torch.int8) if dtype == "int8" else unit.to(torch.float16)
    pad = _body_width(x.shape[-1], dtype) * 4 // q.element_size() - x.shape[-1]
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    body = q.contiguous().view(torch.float32)
    return torch.cat([body, scale], -1)


def unpack(p: torch.Tensor, dtype: str, hidden: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`pack` (up to the rounding): ``(..., H)`` in ``out_dtype``."""
    body, scale = p[..., :-1].contiguous(), p[..., -1:]
    q = body.view(_TORCH[dtype])[..., :hidden].float()
    if dtype == "int8":
        q = q / _LEVELS
    return (q * scale).to(out_dtype)


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: str) -> torch.Tensor:
        ctx.dtype, ctx.hidden, ctx.out_dtype = dtype, x.shape[-1], x.dtype
        return pack(x, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return unpack(grad, ctx.dtype, ctx.hidden, ctx.out_dtype), None


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor, dtype: str, hidden: int, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.dtype = dtype
        return unpack(p, dtype, hidden, out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return pack(grad, ctx.dtype), None, None, None


def encode(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """What is sent for the hidden states ``x`` (differentiable)."""
    if dtype == "auto":
        return x
    if dtype in ("float32", "bfloat16"):
        return x.to(getattr(torch, dtype))
    return _Encode.apply(x, dtype)


def decode(t: torch.Tensor, dtype: str, hidden: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The hidden states from what arrived (differentiable), in the model's dtype ``out_dtype``."""
    if dtype in ("auto", "float32", "bfloat16"):
        return t.to(out_dtype)
    return _Decode.apply(t, dtype, hidden, out_dtype)
