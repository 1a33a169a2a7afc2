"""Control messages travel as JSON (runtime.codec): every message of the protocol comes back equal,
tensors bit for bit, and nothing but the registered types can be built from a peer's bytes."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch

from partition.planner import Measured
from runtime import codec
from runtime.codec import CodecError
from runtime.messages import (
    ClientReport,
    CommBytes,
    Decision,
    Divergence,
    RoundStats,
    RunState,
    ServerReport,
    Settled,
    UserError,
)
from runtime.placement import RankReport
from tests.test_scheduler import _profile


def _stats() -> RoundStats:
    return RoundStats(3, 1.25, 40.0, 52.0, 1.5, 0.5, 0.25, [1.5, 1.25, 1.0], 300.0, 400.0, 2.5, 4096, 0.9)


MESSAGES = [
    None,
    7,
    "a4f0",
    [1, 2.5, "x"],
    UserError("PlanError", "client 1 has 1 MB"),
    Settled(stopping=False, diverged=Divergence(step=2, loss=float("inf"))),
    Settled(stopping=True),
    ClientReport(_stats(), CommBytes(activations_up=10, gradients_down=9), {"epoch": 1, "order": [3, 1, 2]}),
    ServerReport(peak_rss_mb=512.0, server_s={1: 0.5, 2: None}),
    {1: (2, 4), 2: (1, 8)},  # a plan: int keys, tuple values
    _profile(load_avg=(0.5, 0.25, 0.0)),
    Measured(0.1, 0.3, 3.0, 1.0, None),
    RankReport(rank=1, node="n0", gpus=0),
    {"ranks": {"model.layers.0.self_attn.q_proj": 8}, "scores": {"model.layers.0.self_attn.q_proj": 0.25}},
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_protocol_message_comes_back_equal(message):
    assert codec.decode(codec.encode(message)) == message


def test_a_decision_with_a_resume_state_and_an_adapter_comes_back_bit_for_bit():
    flat = torch.randn(1000, dtype=torch.float32)
    state = RunState(
        round=2,
        elapsed_s=12.5,
        fingerprint={"seed": 0, "lora.r": 8},
        plan={1: (2, 4), 2: (1, 8)},
        next_plan=None,
        scheduler={"client_layer_time_s": [0.1, 0.2]},
        data_positions={1: {"epoch": 0}, 2: {"epoch": 1}},
        selection=None,
        client_ranks={},
        metrics=[{"round": 1, "eval_loss": float("nan")}],
    )
    back = codec.decode(codec.encode(Decision({1: (2, 4), 2: (1, 8)}, {1: None, 2: 4}, state, flat)))
    assert back.plan == {1: (2, 4), 2: (1, 8)} and back.caps == {1: None, 2: 4}
    assert torch.equal(back.flat, flat) and back.flat.dtype == torch.float32
    assert math.isnan(back.resume.metrics[0]["eval_loss"])
    assert dataclasses.replace(back.resume, metrics=[]) == dataclasses.replace(state, metrics=[])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_tensors_keep_dtype_shape_and_bits(dtype):
    t = (torch.randn(3, 4) * 100).to(dtype)
    back = codec.decode(codec.encode(t))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    assert codec.decode(codec.encode(torch.zeros(0, 3))).shape == (0, 3)


def test_a_payload_of_unknown_type_is_refused_not_imported():
    with pytest.raises(CodecError, match="unknown message type 'Popen'"):
        codec.decode(b'{"$type": "Popen", "fields": {"args": ["true"]}}')
    with pytest.raises(ValueError):  # a pickle is not JSON: it is never unpickled
        codec.decode(pickle.dumps(Settled(True)))


def test_what_a_control_message_may_not_hold_is_named_when_sent():
    @dataclasses.dataclass
    class Mine:
        x: int

    with pytest.raises(CodecError, match="Mine is not a registered control message type"):
        codec.encode(Mine(1))
    with pytest.raises(CodecError, match="a set cannot be sent"):
        codec.encode({1, 2})
