"""LoRA on stages: ranks and names, the global layout, zero-padded aggregation and PEFT export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from torch import nn

from models.families import FAMILIES
from models.lora import (
    ADAPTER,
    LoraSpec,
    add_lora,
    build_layout,
    initial_adapter,
    lora_modules,
    lora_parameters,
    module_layer,
    peft_adapter,
    read_adapter,
    write_adapter,
    write_peft_adapter,
)
from models.stages import build_stage, full_model, load_config

L = 4  # the random_model fixture's default depth
R, R_CUT, ALPHA = 8, 2, 16.0


def _spec(family: str, r: int = R, r_cut: int = R_CUT) -> LoraSpec:
    return LoraSpec(r=r, alpha=ALPHA * r / R, r_cut=r_cut, targets=FAMILIES[family].lora_targets)


def _ranks(model: nn.Module) -> dict[str, int]:
    return {name: m.lora_A[ADAPTER].weight.shape[0] for name, m in lora_modules(model).items()}


def _randomise(model: nn.Module, seed: int) -> None:
    """Non-zero A and B everywhere, so every LoRA module changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _target_names(path, family: str, layers: range) -> set[str]:
    """The full model's names of the LoRA target modules in ``layers``."""
    fam = FAMILIES[family]
    names = set()
    for name, _ in full_model(path).named_modules():
        if name.startswith(fam.layers + ".") and name.rsplit(".", 1)[-1] in fam.lora_targets:
            if module_layer(name, fam) in layers:
                names.add(name)
    return names


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_add_lora_ranks_names_and_trainable_params(random_model, family):
    path = random_model(family)
    k = 2
    client, server = build_stage(path, 0, k), build_stage(path, k, L)
    add_lora(client, _spec(family), cut_rank=True)
    add_lora(server, _spec(family), cut_rank=False)
    fam = FAMILIES[family]

    for stage, layers in ((client, range(0, k)), (server, range(k, L))):
        trainable = [n for n, p in stage.hf.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n for n in trainable)
        assert len(trainable) == len(lora_parameters(stage.hf)) == 2 * len(lora_modules(stage.hf))
        assert set(lora_modules(stage.hf)) == _target_names(path, family, layers)
        # The optimizer sees exactly the LoRA weights; the base stays frozen.
        assert not any(p.requires_grad for n, p in stage.hf.named_parameters() if ".lora_" not in n)

    client_ranks = _ranks(client.hf)
    assert {n: r for n, r in client_ranks.items() if module_layer(n, fam) == k - 1}
    for name, r in client_ranks.items():
        assert r == (R_CUT if module_layer(name, fam) == k - 1 else R), name
    assert set(_ranks(server.hf).values()) == {R}
    # alpha/r is the same for every rank (so zero-padding a small-rank copy is exact).
    for stage in (client, server):
        for name, m in lora_modules(stage.hf).items():
            assert m.scaling[ADAPTER] == pytest.approx(ALPHA / R), name
    if family == "llama":
        assert "model.layers.0.self_attn.q_proj" in client_ranks
        assert "model.layers.1.mlp.down_proj" in client_ranks


def test_add_lora_without_matching_targets_fails(random_model):
    stage = build_stage(random_model("llama"), 0, 2)
    with pytest.raises(ValueError, match=r"lora.targets=\['nonexistent'\].*q_proj"):
        add_lora(stage, LoraSpec(R, ALPHA, R_CUT, ("nonexistent",)), cut_rank=True)


def _layer_ranks(layout) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for s in layout.slots:
        out.setdefault(s.layer, set()).add(s.rank)
    return out


def test_layout_rank_is_the_largest_holder_rank(random_model):
    path = random_model("llama")
    config, spec = load_config(path), _spec("llama")
    full = full_model(path)
    shapes = {
        n: (m.in_features, m.out_features)
        for n, m in full.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("model.layers.")
    }

    # k=1 holds layer 0 at r_cut, but k=3 holds it at r; layer 2 is k=3's cut but k=1's server copy is at r.
    assert _layer_ranks(build_layout(config, spec, [1, 3])) == {j: {R} for j in range(L)}
    # Every holder of layer 1 is a client at its cut: r_cut.
    assert _layer_ranks(build_layout(config, spec, [2, 2])) == {0: {R}, 1: {R_CUT}, 2: {R}, 3: {R}}
    assert _layer_ranks(build_layout(config, spec, [1])) == {0: {R_CUT}, 1: {R}, 2: {R}, 3: {R}}
    assert _layer_ranks(build_layout(config, spec, [])) == {j: {R} for j in range(L)}

    layout = build_layout(config, spec, [2, 2])
    assert set(layout.by_name) == _target_names(path, "llama", range(L))
    expected_numel = 0
    for s in layout.slots:
        assert (s.in_features, s.out_features) == shapes[s.name]
        rank = R_CUT if s.layer == 1 else R
        expected_numel += rank * sum(shapes[s.name])
    assert layout.numel == expected_numel
    # Slots tile the flat vector without gaps or overlaps.
    ends = sorted((layout.offsets[s.name], layout.offsets[s.name] + s.numel) for s in layout.slots)
    assert ends[0][0] == 0 and ends[-1][1] == layout.numel
    assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(ends, ends[1:], strict=False))
    a, b = layout.views(torch.zeros(layout.numel), "model.layers.1.self_attn.k_proj")
    assert a.shape == (R_CUT, shapes["model.layers.1.self_attn.k_proj"][0])
    assert b.shape == (shapes["model.layers.1.self_attn.k_proj"][1], R_CUT)


def test_initial_adapter_is_seeded_kaiming_a_and_zero_b(random_model):
    config = load_config(random_model("llama"))
    layout = build_layout(config, _spec("llama"), [2])
    first, again, other = initial_adapter(layout, 0), initial_adapter(layout, 0), initial_adapter(layout, 1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    for s in layout.slots:
        a, b = layout.views(first, s.name)
        bound = 1.0 / math.sqrt(s.in_features)
        assert torch.all(b == 0), s.name
        assert a.abs().max() <= bound, s.name
        assert a.abs().max() > bound / 2 and a.std() > bound / 4, s.name  # really drawn, not near zero
        a_other, _ = layout.views(other, s.name)
        assert not torch.equal(a, a_other), s.name
    # Modules get different draws (keyed by name), not one repeated block.
    a0, _ = layout.views(first, "model.layers.0.self_attn.q_proj")
    a1, _ = layout.views(first, "model.layers.1.self_attn.q_proj")
    assert not torch.equal(a0, a1)


def test_initial_adapter_loads_into_every_holder(random_model):
    path = random_model("llama")
    spec = _spec("llama")
    layout = build_layout(load_config(path), spec, [2])
    flat = initial_adapter(layout, 3)
    client = build_stage(path, 0, 2)
    add_lora(client, spec, cut_rank=True)
    write_adapter(client.hf, layout, flat)
    for name, m in lora_modules(client.hf).items():
        a, b = layout.views(flat, name)
        assert torch.equal(m.lora_A[ADAPTER].weight, a[: m.lora_A[ADAPTER].weight.shape[0]])
        assert torch.equal(m.lora_B[ADAPTER].weight, b)


def local_contribution(holders, layout, device):
    """The weighted, zero-padded sum of the holders' copies (read_adapter into one vector)."""
    flat = torch.zeros(layout.numel, device=device)
    for model, weight in holders:
        read_adapter(model, layout, flat, weight)
    return flat


def test_zero_padded_weighted_sum_of_different_ranks(random_model):
    path = random_model("llama")
    spec = _spec("llama")
    fam = FAMILIES["llama"]
    # Client cut at 2 holds layer 1 at r_cut; client cut at 3 holds layer 1 at r and layer 2 at r_cut.
    m1, m2 = build_stage(path, 0, 2), build_stage(path, 0, 3)
    add_lora(m1, spec, cut_rank=True)
    add_lora(m2, spec, cut_rank=True)
    _randomise(m1.hf, 1)
    _randomise(m2.hf, 2)
    layout = build_layout(load_config(path), spec, [2, 3])
    flat = local_contribution([(m1.hf, 0.25), (m2.hf, 0.75)], layout, torch.device("cpu"))
    assert flat.dtype == torch.float32 and flat.shape == (layout.numel,)

    mods1, mods2 = lora_modules(m1.hf), lora_modules(m2.hf)
    assert _ranks(m1.hf)["model.layers.1.self_attn.q_proj"] == R_CUT
    assert _ranks(m2.hf)["model.layers.1.self_attn.q_proj"] == R
    for s in layout.slots:
        want_a = torch.zeros(s.rank, s.in_features)
        want_b = torch.zeros(s.out_features, s.rank)
        for mods, w in ((mods1, 0.25), (mods2, 0.75)):
            if s.name in mods:
                la, lb = mods[s.name].lora_A[ADAPTER].weight, mods[s.name].lora_B[ADAPTER].weight
                want_a[: la.shape[0]] += w * la
                want_b[:, : lb.shape[1]] += w * lb
        a, b = layout.views(flat, s.name)
        torch.testing.assert_close(a, want_a, rtol=0, atol=1e-7)
        torch.testing.assert_close(b, want_b, rtol=0, atol=1e-7)
        if s.layer == 3:  # held by neither client
            assert not flat[layout.offsets[s.name] : layout.offsets[s.name] + s.numel].any()
    # Rows beyond r_cut of a layer-1 module come from m2 only.
    a, _ = layout.views(flat, "model.layers.1.mlp.up_proj")
    la2 = mods2["model.layers.1.mlp.up_proj"].lora_A[ADAPTER].weight
    torch.testing.assert_close(a[R_CUT:], 0.75 * la2[R_CUT:], rtol=0, atol=1e-7)
    assert module_layer("model.layers.1.mlp.up_proj", fam) == 1


def test_zero_padding_keeps_the_delta(random_model):
    """A rank-r_cut copy written into a rank-r holder (zero-padded) computes the same update."""
    path = random_model("llama")
    spec = _spec("llama")
    small, big = build_stage(path, 0, 2), build_stage(path, 0, 3)  # layer 1 at r_cut / at r
    add_lora(small, spec, cut_rank=True)
    add_lora(big, spec, cut_rank=True)
    _randomise(small.hf, 5)
    _randomise(big.hf, 6)  # junk that the write below must fully overwrite
    layout = build_layout(load_config(path), spec, [2, 3])
    flat = local_contribution([(small.hf, 1.0)], layout, torch.device("cpu"))
    write_adapter(big.hf, layout, flat)

    name = "model.layers.1.self_attn.q_proj"
    ms, mb = lora_modules(small.hf)[name], lora_modules(big.hf)[name]
    a, b = ms.lora_A[ADAPTER].weight, ms.lora_B[ADAPTER].weight
    pa, pb = mb.lora_A[ADAPTER].weight, mb.lora_B[ADAPTER].weight
    assert pa.shape[0] == R > a.shape[0] == R_CUT
    assert not pa[R_CUT:].any() and not pb[:, R_CUT:].any()
    delta = spec.scale * b @ a
    assert delta.abs().max() > 0
    torch.testing.assert_close(mb.scaling[ADAPTER] * pb @ pa, delta, rtol=0, atol=1e-7)
    # And the modules themselves (base + scaled LoRA) agree on an input.
    x = torch.randn(3, 5, a.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mb(x), ms(x), rtol=0, atol=1e-6)
        assert (ms(x) - ms.base_layer(x)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_exported_adapter_matches_split_stages(random_model, tmp_path, family):
    path = random_model(family)
    spec = _spec(family)
    k = 2
    client, server = build_stage(path, 0, k), build_stage(path, k, L)
    add_lora(client, spec, cut_rank=True)
    add_lora(server, spec, cut_rank=False)
    _randomise(client.hf, 10)
    _randomise(server.hf, 11)
    client.eval()
    server.eval()
    config = load_config(path)
    layout = build_layout(config, spec, [k])
    flat = torch.zeros(layout.numel)
    read_adapter(client.hf, layout, flat, 1.0)
    read_adapter(server.hf, layout, flat, 1.0)
    out = write_peft_adapter(*peft_adapter(layout, flat, spec, config, str(path)), tmp_path / "adapter")

    base = full_model(path).eval()
    ids = torch.randint(4, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
        split = server(hidden=client(input_ids=ids, attention_mask=mask), attention_mask=mask)
        peft_model = PeftModel.from_pretrained(base, out).eval()
        exported = peft_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(exported[real], split[real], rtol=0, atol=1e-5)
    assert (exported - base_logits)[real].abs().max() > 1e-3  # the adapter really was applied

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA
    assert cfg["base_model_name_or_path"] == str(path)
    layers = FAMILIES[family].layers.replace(".", r"\.")
    cut_key = rf"{layers}\.{k - 1}\..*"
    assert cfg["rank_pattern"] == {cut_key: R_CUT}
    assert cfg["alpha_pattern"] == {cut_key: pytest.approx(ALPHA / R * R_CUT)}


def test_export_has_no_rank_pattern_when_cuts_differ(random_model, tmp_path):
    path = random_model("llama")
    spec, config = _spec("llama"), load_config(random_model("llama"))
    layout = build_layout(config, spec, [1, 3])  # every layer has a holder at full rank
    flat = initial_adapter(layout, 0)
    out = write_peft_adapter(*peft_adapter(layout, flat, spec, config, str(path)), tmp_path)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
