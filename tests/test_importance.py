"""HSplitLoRA's weight selection and rank allocation: AdaLoRA sensitivity on a real stage, the budget."""

from __future__ import annotations

import json

import torch
from peft import PeftModel

from models.importance import Sensitivity, allocate_ranks, combine, module_of, uniform_params
from models.lora import (
    LoraSpec,
    build_layout,
    candidate_targets,
    inject_layers,
    lora_modules,
    lora_parameters,
    named_lora_parameters,
    peft_adapter,
    target_ranks,
    with_selection,
    write_peft_adapter,
)
from models.loss import mean_loss
from models.stages import build_stage, full_model, load_config


def test_sensitivity_scores_every_trained_weight_after_the_first_step(random_model):
    path = random_model("llama")
    config = load_config(path)
    spec = LoraSpec(r=4, alpha=8.0, r_cut=4, targets=candidate_targets(config))
    stage = build_stage(path, 0, 4)
    inject_layers(stage, spec, target_ranks(0, 4, spec, None))
    opt = torch.optim.AdamW(lora_parameters(stage.hf), lr=1e-2)
    scorer = Sensitivity()
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        ids = torch.randint(4, config.vocab_size, (2, 10), generator=g)
        loss, _ = mean_loss(stage(input_ids=ids), ids)
        loss.backward()
        scorer.update(named_lora_parameters(stage.hf))
        if step == 0:  # B starts at zero: |w * grad| is zero on B (w = 0) and on A (grad = 0)
            assert all(v == 0 for v in scorer.scores().values())
        opt.step()
        opt.zero_grad()
    scores = scorer.scores()
    assert set(scores) == set(lora_modules(stage.hf)) and len(scores) == 4 * 7  # 7 linear weights a layer
    assert all(v > 0 for v in scores.values())
    assert len(set(scores.values())) > 1
    assert module_of("model.layers.3.mlp.up_proj.lora_B.default.weight") == "model.layers.3.mlp.up_proj"


def test_allocation_respects_the_budget_the_cap_and_the_order():
    shapes = {f"w{i}": (64, 64) for i in range(6)} | {"big": (64, 256)}
    scores = {"w0": 10.0, "w1": 5.0, "w2": 5.0, "w3": 1.0, "w4": 0.1, "w5": 0.0, "big": 8.0}
    uniform = uniform_params({n: s for n, s in shapes.items() if n.startswith("w")}, 8)
    for fraction in (0.25, 0.5, 1.0):
        budget = fraction * uniform
        ranks = allocate_ranks(scores, shapes, budget, r_max=8)
        spent = sum(r * sum(shapes[n]) for n, r in ranks.items())
        assert spent <= budget
        assert budget - spent < min(sum(shapes[n]) for n in shapes if ranks[n] < 8 and scores[n] > 0)
        assert all(0 <= r <= 8 for r in ranks.values())
        assert ranks["w5"] == 0  # no score, no LoRA
        same_shape = sorted((n for n in shapes if n.startswith("w")), key=lambda n: -scores[n])
        assert [ranks[n] for n in same_shape] == sorted((ranks[n] for n in same_shape), reverse=True)
    assert allocate_ranks(scores, shapes, uniform, 8)["w0"] == 8  # the top weight is capped at r_max
    assert combine([({"a": 1.0}, 0.25), ({"a": 3.0, "b": 2.0}, 0.75)]) == {"a": 2.5, "b": 1.5}


def test_a_selection_is_a_plain_peft_adapter_with_per_weight_ranks(random_model, tmp_path):
    """Chosen weights at their ranks, through PEFT's target_modules/rank_pattern: the exported adapter
    loads with PeftModel.from_pretrained and computes what the split stages compute."""
    path = random_model("llama")
    config = load_config(path)
    base_spec = LoraSpec(r=8, alpha=16.0, r_cut=8, targets=candidate_targets(config))
    ranks = {s.name: 0 for s in build_layout(config, base_spec, []).slots}
    ranks.update(
        {
            "model.layers.0.self_attn.q_proj": 8,
            "model.layers.2.mlp.down_proj": 3,
            "model.layers.3.mlp.up_proj": 1,
        }
    )
    spec = with_selection(base_spec, ranks)
    layout = build_layout(config, spec, [2])
    assert {s.name: s.rank for s in layout.slots} == {n: r for n, r in ranks.items() if r}
    client, server = build_stage(path, 0, 2), build_stage(path, 2, 4)
    inject_layers(client, spec, target_ranks(0, 2, spec, spec.r_cut))
    inject_layers(server, spec, target_ranks(2, 4, spec, None))
    assert {n: m.r["default"] for n, m in {**lora_modules(client.hf), **lora_modules(server.hf)}.items()} == {
        n: r for n, r in ranks.items() if r
    }
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(layout.numel, generator=g) * 0.1
    out = write_peft_adapter(*peft_adapter(layout, flat, spec, config, str(path)), tmp_path / "a")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(n for n, r in ranks.items() if r)
    from models.lora import write_adapter

    write_adapter(client.hf, layout, flat)
    write_adapter(server.hf, layout, flat)
    ids = torch.randint(4, config.vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        split = server(hidden=client(input_ids=ids))
        peft = PeftModel.from_pretrained(full_model(path), str(out)).eval()
        torch.testing.assert_close(peft(input_ids=ids).logits, split, rtol=0, atol=1e-5)


def test_a_client_with_less_memory_gets_a_lower_rank_at_the_same_cut():
    from partition.planner import ClientCosts, ModelCosts, memory_need, rank_for_memory

    model = ModelCosts(
        n_layers=8,
        steps=10,
        layer_param_bytes=1e6,
        embed_param_bytes=2e6,
        lora_param_bytes=2e5,  # rank 8: LoRA state (4x) is 80% of a layer here, so the rank matters
        activation_bytes=1e5,
        payload_bytes=1e4,
        gradient_bytes=1e4,
        adapter_bytes=1e6,
    )
    client = lambda mem: ClientCosts(1e-3, 1e-3, mem, 1e9, 1e-4, "h")
    full = memory_need(model, 3) * 1.1
    assert rank_for_memory(model, client(full), 3, 8) == 8
    ranks = [rank_for_memory(model, client(full * f), 3, 8) for f in (0.95, 0.85, 0.75)]
    assert 8 > ranks[0] > ranks[1] > ranks[2] >= 1
    assert rank_for_memory(model, client(1.0), 3, 8) == 0  # not even rank 1 fits
