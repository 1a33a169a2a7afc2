"""The wire formats (pack, quantise, straight-through gradient) and the loss path on shifted targets."""

from __future__ import annotations

import pytest
import torch

from models.datasets import IGNORE_INDEX
from models.loss import _flat, shift_targets, target_loss, target_stats, token_stats
from models.wire import decode, encode


def _hidden(shape=(2, 5, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[0, 1] *= 100  # tokens of very different magnitudes: the scale is per token
    return x


@pytest.mark.parametrize(
    "dtype, per_element, tol",
    [
        ("float32", 4, 0.0),
        ("bfloat16", 2, 2**-8),
        ("float16", 2 + 4 / 64, 2**-11),
        ("int8", 1 + 4 / 64, 0.5 / 127),
    ],
)
def test_round_trip_bytes_and_error(dtype, per_element, tol):
    x = _hidden()
    sent = encode(x, dtype)
    assert sent.numel() * sent.element_size() == pytest.approx(x.numel() * per_element)
    y = decode(sent, dtype, 64, torch.float32)
    assert y.shape == x.shape and y.dtype == torch.float32
    # error relative to each token's largest value (int8: half a quantisation step)
    err = ((y - x).abs() / x.abs().amax(-1, keepdim=True)).max()
    assert err <= tol * 1.01


def test_an_odd_hidden_size_is_padded_to_whole_slots():
    x = _hidden((1, 3, 37))
    for dtype in ("float16", "int8"):
        y = decode(encode(x, dtype), dtype, 37, torch.float32)
        torch.testing.assert_close(y, x, rtol=0, atol=float(x.abs().max()) / 100)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_the_gradient_comes_back_in_the_wire_format_and_passes_straight_through(dtype):
    x = _hidden().requires_grad_()
    sent = encode(x, dtype)
    seen = {}
    sent.register_hook(lambda g: seen.setdefault("grad", g))
    y = decode(sent, dtype, 64, torch.float32)
    w = _hidden(seed=1)
    (y * w).sum().backward()
    assert seen["grad"].dtype == sent.dtype and seen["grad"].shape == sent.shape  # what travels back
    step = {"bfloat16": 2**-8, "float16": 2**-11, "int8": 0.5 / 127}[dtype]
    err = ((x.grad - w).abs() / w.abs().amax(-1, keepdim=True)).max()
    assert 0 < err <= step * 1.01  # dy/dx = identity, up to the gradient's own quantisation


def test_targets_are_the_shifted_labels_and_the_loss_takes_logits_as_they_are():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[1, :3] = IGNORE_INDEX  # a prompt
    logits = torch.randn(3, 7, 11, generator=g)
    targets = shift_targets(labels)
    assert targets.dtype == torch.int32 and targets.shape == (3, 6)
    assert torch.equal(targets.long(), labels[:, 1:])
    flat_logits, _ = _flat(logits, targets)
    assert flat_logits.data_ptr() == logits.data_ptr()  # a view: no copy of the logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    loss, n = target_loss(logits, targets)
    torch.testing.assert_close(loss, want)
    assert int(n) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    loss_sum, n2, correct = target_stats(logits, targets)
    assert int(n2) == int(n) and 0 <= int(correct) <= int(n)
    assert torch.equal(torch.stack(token_stats(logits, labels)), torch.stack([loss_sum, n2, correct]))
