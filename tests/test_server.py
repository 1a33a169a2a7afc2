"""Server replicas in-process: shared frozen base, separate LoRA state per client."""

from __future__ import annotations

import threading

import torch

from models.lora import build_layout, lora_modules
from runtime import simulate
from runtime.config import load_config
from runtime.job import lora_spec, model_config
from runtime.server import Server
from runtime.simulate import Throttle


def test_replicas_share_the_base_and_keep_their_own_lora(random_model):
    path = random_model("llama")
    cfg = load_config(None, [f"model.path={path}"])
    spec = lora_spec(cfg, model_config(path))
    server = Server(path, {1: 1, 2: 3}, spec, torch.device("cpu"), cfg)
    a, b = server.replicas[1].stage, server.replicas[2].stage
    assert (a.start, b.start) == (1, 3)
    assert sorted(a.layers.keys()) == ["1", "2", "3"] and sorted(b.layers.keys()) == ["3"]

    # Layer 3's frozen weights are one tensor in memory, its LoRA weights are two.
    qa = a.layers["3"].self_attn.q_proj
    qb = b.layers["3"].self_attn.q_proj
    assert qa.base_layer.weight.data_ptr() == qb.base_layer.weight.data_ptr()
    assert qa.lora_B["default"].weight.data_ptr() != qb.lora_B["default"].weight.data_ptr()
    assert not qa.base_layer.weight.requires_grad

    # One client's step leaves the other's adapter and the shared base as they were.
    before_b = {n: m.lora_B["default"].weight.clone() for n, m in lora_modules(b.hf).items()}
    base_before = qa.base_layer.weight.clone()
    hidden = torch.randn(2, 6, 32)
    logits = a(hidden=hidden)
    logits.float().pow(2).mean().backward()
    torch.optim.SGD(server.replicas[1].params, lr=0.1).step()
    assert qa.lora_B["default"].weight.abs().sum() > 0
    for name, m in lora_modules(b.hf).items():
        torch.testing.assert_close(m.lora_B["default"].weight, before_b[name], rtol=0, atol=0)
    torch.testing.assert_close(qa.base_layer.weight, base_before, rtol=0, atol=0)


def test_the_server_slowdown_stretches_every_replica_layer_and_follows_a_move(random_model, monkeypatch):
    """``simulate.server_slowdown`` hooks each replica's decoder layers (a sleep after the forward and one
    after the backward of each), leaves the math alone, changes between rounds, and covers a layer that
    arrives in a move."""
    path = random_model("llama")
    cfg = load_config(None, [f"model.path={path}", "simulate.server_slowdown={1: 1, 2: 3}"])
    mcfg = model_config(path)
    spec = lora_spec(cfg, mcfg)
    throttle = Throttle(cfg.simulate.for_server(1), changing=cfg.simulate.changes)
    server = Server(path, {1: 2}, spec, torch.device("cpu"), cfg, throttle=throttle)
    replica = server.replicas[1]
    sleeps: list[float] = []
    # time.sleep is the process's: count this thread's calls only, and let any other thread sleep
    me, real_sleep = threading.get_ident(), simulate.time.sleep
    monkeypatch.setattr(
        simulate.time, "sleep", lambda s: sleeps.append(s) if threading.get_ident() == me else real_sleep(s)
    )
    hidden = torch.randn(2, 6, 32, requires_grad=True)

    def fwd_bwd():
        logits = replica.stage(hidden=hidden)
        logits.float().pow(2).mean().backward()
        grad = hidden.grad.clone()
        hidden.grad = None
        return logits.detach(), grad

    ref = fwd_bwd()
    assert sleeps == []  # round 1: factor 1
    throttle.set(cfg.simulate.for_server(2))
    slow = fwd_bwd()
    assert len(sleeps) == 2 * (mcfg.num_hidden_layers - 2) and all(s > 0 for s in sleeps)
    assert torch.equal(slow[0], ref[0]) and torch.equal(slow[1], ref[1])

    layout = build_layout(mcfg, spec, [1])
    server.move({1: 1}, {1: (2, spec.r_cut)}, layout, torch.zeros(layout.numel))
    sleeps.clear()
    fwd_bwd()
    assert len(sleeps) == 2 * (mcfg.num_hidden_layers - 1)  # the arriving layer 1 is slowed too


def test_the_optimizer_is_fused_adamw_and_steps_as_the_per_tensor_loop_does(random_model):
    """``make_optimizer`` (clients, replicas, the unsplit trainer) takes torch's fused AdamW kernel on
    CPU; its steps on a replica's LoRA parameters match the default per-tensor AdamW to float rounding."""
    path = random_model("llama")
    cfg = load_config(None, [f"model.path={path}", "train.lr=0.01", "train.weight_decay=0.1"])
    spec = lora_spec(cfg, model_config(path))
    fused = Server(path, {1: 1}, spec, torch.device("cpu"), cfg).replicas[1]
    loop = Server(path, {1: 1}, spec, torch.device("cpu"), cfg).replicas[1]
    assert fused.optimizer.defaults["fused"] is True
    reference = torch.optim.AdamW(loop.params, lr=0.01, weight_decay=0.1)
    for p, q in zip(fused.params, loop.params):
        with torch.no_grad():
            q.copy_(p)
    start = [p.detach().clone() for p in fused.params]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for p, q in zip(fused.params, loop.params):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        fused.optimizer.step()
        reference.step()
    assert all((p - p0).abs().mean().item() > 1e-3 for p, p0 in zip(fused.params, start))  # each moved
    for p, q in zip(fused.params, loop.params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
