"""Server replicas in-process: shared frozen base, separate LoRA state per client."""

from __future__ import annotations

import torch

from models.lora import lora_modules
from runtime.config import load_config
from runtime.job import lora_spec, model_config
from runtime.server import Server


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
