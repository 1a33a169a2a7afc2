"""Simulated heterogeneity (runtime.simulate) and the resource probe that measures it (runtime.probe)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from models.families import FAMILIES, run_layer
from models.lora import LoraSpec, add_lora
from models.stages import build_stage
from runtime import simulate
from runtime.probe import ResourceProfile, measure_link, probe, time_layer
from runtime.simulate import Link, Throttle

SPEC = LoraSpec(r=4, alpha=8.0, r_cut=2, targets=FAMILIES["llama"].lora_targets)
BATCH, SEQ, HIDDEN = 2, 64, 256
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy machine an OpenMP barrier waiting for a descheduled thread
    can stall a step for seconds, which drowns the timings these tests compare."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(random_model) -> Path:
    return random_model("llama", n_layers=4, hidden=HIDDEN)


@pytest.fixture
def layer_stage(llama):
    """Layer 1 of the llama with LoRA whose B is non-zero (so every LoRA weight gets a gradient)."""
    torch.manual_seed(0)
    stage = build_stage(llama, 1, 2)
    add_lora(stage, SPEC, cut_rank=False)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return stage


def fwd_bwd(stage, hidden: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Output, LoRA (and input) gradients and wall time of one forward+backward of the stage's layer."""
    stage.zero_grad(set_to_none=True)
    hidden.grad = None
    start = time.perf_counter()
    inputs = stage.family.layer_inputs_fn(stage.hf, stage.config, hidden, None)
    out = run_layer(stage.layers["1"], 1, hidden, inputs)
    out.pow(2).mean().backward()
    elapsed = time.perf_counter() - start
    grads = [p.grad.clone() for p in stage.parameters() if p.requires_grad]
    if hidden.requires_grad:
        grads.append(hidden.grad.clone())
    return out.detach(), grads, elapsed


def test_throttle_slows_time_not_math(layer_stage):
    layer = layer_stage.layers["1"]
    hidden = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    ref_out, ref_grads, _ = fwd_bwd(layer_stage, hidden)  # warm-up and reference
    throttle = Throttle(3)
    plain, slow = [], []
    for _ in range(7):  # interleaved, so machine noise hits both alike
        plain.append(fwd_bwd(layer_stage, hidden)[2])
        handles = throttle.attach(layer)
        out, grads, elapsed = fwd_bwd(layer_stage, hidden)
        Throttle.detach(handles)
        slow.append(elapsed)
        assert torch.equal(out, ref_out)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert statistics.median(slow) / statistics.median(plain) > 1.8

    # Handles removed: no hooks left, and the layer is back to its own pace.
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    after = min(fwd_bwd(layer_stage, hidden)[2] for _ in range(5))  # noise only adds time
    assert after < (statistics.median(plain) + statistics.median(slow)) / 2
    assert Throttle(1).attach(layer) == []


def test_throttle_backward_runs_when_input_needs_no_grad(layer_stage, monkeypatch):
    hidden = torch.randn(BATCH, SEQ, HIDDEN)  # as after a frozen embedding
    _, ref_grads, _ = fwd_bwd(layer_stage, hidden)
    sleeps = []
    real_sleep, me = time.sleep, threading.get_ident()  # the process's sleep: count this thread's only
    monkeypatch.setattr(
        simulate.time, "sleep", lambda s: (threading.get_ident() == me and sleeps.append(s), real_sleep(s))
    )
    handles = Throttle(2).attach(layer_stage.layers["1"])
    _, grads, _ = fwd_bwd(layer_stage, hidden)
    Throttle.detach(handles)
    assert len(sleeps) == 2 and all(s > 0 for s in sleeps)  # one after the forward, one after the backward
    assert len(grads) == len(ref_grads) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_time_layer_sees_throttle_and_activations(llama):
    # Interleaved, and the least of each: machine noise only ever adds time.
    base, slow = [], []
    for _ in range(3):
        base.append(time_layer(llama, SPEC, BATCH, SEQ, "cpu"))
        slow.append(time_layer(llama, SPEC, BATCH, SEQ, "cpu", throttle=Throttle(3)))
    assert min(s[0] for s in slow) / min(b[0] for b in base) > 1.8
    assert base[0][2] > 0 and {r[2] for r in base + slow} == {base[0][2]}
    double = time_layer(llama, SPEC, 2 * BATCH, SEQ, "cpu")[2]
    assert 1.6 <= double / base[0][2] <= 2.4


def test_a_throttle_changed_between_rounds_is_what_the_probe_and_the_steps_see(llama, layer_stage):
    """A schedule's throttle is hooked even at factor 1 (no sleep then, same math) and set between rounds."""
    throttle = Throttle(1.0, changing=True)
    handles = throttle.attach(layer_stage.layers["1"])
    assert len(handles) == 2
    hidden = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    ref_out, ref_grads, _ = fwd_bwd(layer_stage, hidden)
    base, slow, probed_base, probed_slow = [], [], [], []
    for _ in range(3):  # interleaved, the least of each: noise only ever adds time
        throttle.set(1)
        base.append(fwd_bwd(layer_stage, hidden)[2])
        probed_base.append(time_layer(llama, SPEC, BATCH, SEQ, "cpu", throttle=throttle)[0])
        throttle.set(3)
        out, grads, elapsed = fwd_bwd(layer_stage, hidden)
        slow.append(elapsed)
        probed_slow.append(time_layer(llama, SPEC, BATCH, SEQ, "cpu", throttle=throttle)[0])
        assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    Throttle.detach(handles)
    assert min(slow) / min(base) > 1.8
    assert min(probed_slow) / min(probed_base) > 1.8
    with pytest.raises(ValueError, match="simulate.slowdown must be >= 1"):
        throttle.set(0.5)


MEMORY_SCRIPT = """
import json, torch
from runtime.probe import available_memory
from runtime.simulate import apply_memory_limit, vmdata_bytes
before = available_memory("cpu")
used = vmdata_bytes()
apply_memory_limit(used / 2**30 + 0.5, torch.device("cpu"))
after = available_memory("cpu")
torch.ones(256, 256) @ torch.ones(256, 256)  # still runs under the limit
try:
    apply_memory_limit(used / 2**30 / 2, torch.device("cpu"))
    error = None
except ValueError as e:
    error = str(e)
print(json.dumps({"before": before, "after": after, "error": error}))
"""


def test_memory_limit_is_measured():
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["after"] <= 0.5 * 2**30 + 64 * 2**20
    assert result["after"] < result["before"]
    assert "simulate.memory_limit_gb" in result["error"]


def test_measure_link_sees_bandwidth():
    send = lambda t: float(t[0])  # a local stand-in for the RPC to the server
    rtt, bandwidth = measure_link(send, 10**6, Link(80), "cpu")  # 80 Mbit/s = 10 MB/s
    assert rtt >= 0 and abs(bandwidth - 10e6) / 10e6 < 0.3
    _, free = measure_link(send, 10**6, Link(None), "cpu")
    assert free > 10 * bandwidth
    assert Link(80).seconds(10**6) == pytest.approx(0.1)


def test_probe_profile(llama):
    profile = probe(llama, SPEC, BATCH, SEQ, "cpu", server=True, send=lambda t: None, payload_bytes=10**5)
    assert profile.head_time_s > 0 and profile.layer_time_s > 0 and profile.activation_bytes > 0
    assert profile.usable_cores >= 1 and profile.memory_available_bytes > 0 and profile.cuda is None
    d = json.loads(json.dumps(profile.to_dict(), allow_nan=False))
    assert ResourceProfile.from_dict(d) == profile
    client = probe(llama, SPEC, BATCH, SEQ, "cpu")
    assert client.head_time_s == 0 and math.isinf(client.bandwidth_Bps)
    assert client.to_dict()["bandwidth_Bps"] is None
