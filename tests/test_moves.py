"""Moving a cut between rounds: layers move with their LoRA state and the model stays the same function."""

from __future__ import annotations

import copy

import pytest
import torch

from models.lora import (
    LoraSpec,
    add_lora,
    build_layout,
    initial_adapter,
    layer_rank,
    lora_modules,
    write_adapter,
)
from models.moves import restage
from models.stages import build_layers, build_stage, load_config, stage_parameter_bytes

L = 6
SPEC = LoraSpec(r=4, alpha=8.0, r_cut=2, targets=("q_proj", "v_proj"))


def _trained_flat(layout, zero_extras_layers=()):
    """A global adapter as after some training: random B, with no live component past r_cut on some layers."""
    flat = initial_adapter(layout, seed=0)
    g = torch.Generator().manual_seed(1)
    for s in layout.slots:
        _, b = layout.views(flat, s.name)
        b.copy_(torch.randn(b.shape, generator=g) * 0.5)
        if s.layer in zero_extras_layers:
            b[:, SPEC.r_cut :].zero_()
    return flat


def _pair(path, k, layout, flat):
    client = build_stage(path, 0, k)
    add_lora(client, SPEC, cut_rank=True)
    server = build_stage(path, k, L)
    add_lora(server, SPEC, cut_rank=False)
    for stage in (client, server):
        write_adapter(stage.hf, layout, flat)
    return client, server


def _logits(client, server, ids):
    with torch.no_grad():
        return server(hidden=client(input_ids=ids))


def _move(path, client, server, k_new, cut_rank, layout, flat):
    old_cut_rank = layer_rank(client, client.end - 1)
    old_k = client.end
    added_c, dropped_c = restage(
        client, SPEC, 0, k_new, cut_rank, lambda lo, hi: build_layers(path, lo, hi), layout, flat, seed=0
    )
    added_s, dropped_s = restage(
        server,
        SPEC,
        k_new,
        L,
        None,
        lambda lo, hi: build_layers(path, lo, hi),
        layout,
        flat,
        seed=0,
        arriving_ranks={old_k - 1: old_cut_rank},
    )
    return added_c, dropped_c, added_s, dropped_s


@pytest.mark.parametrize("k_old,k_new", [(2, 4), (4, 1), (1, 5), (3, 2)])
@pytest.mark.parametrize("reducible_cut", [False, True])
def test_move_keeps_the_function(random_model, k_old, k_new, reducible_cut):
    path = random_model("llama", n_layers=L)
    layout = build_layout(load_config(path), SPEC, [])  # full rank everywhere: cuts may move
    flat = _trained_flat(layout, zero_extras_layers={k_new - 1, k_old - 1} if reducible_cut else ())
    client, server = _pair(path, k_old, layout, flat)
    ids = torch.randint(0, 100, (2, 12))
    before = _logits(client, server, ids)

    cut_rank = SPEC.r_cut if reducible_cut else SPEC.r
    added_c, dropped_c, added_s, dropped_s = _move(path, client, server, k_new, cut_rank, layout, flat)

    assert (client.start, client.end, server.start, server.end) == (0, k_new, k_new, L)
    assert sorted(client.layers.keys(), key=int) == [str(j) for j in range(k_new)]
    assert sorted(added_c) == sorted(dropped_s) and sorted(added_s) == sorted(dropped_c)
    assert set(added_c) | set(added_s) == set(range(min(k_old, k_new), max(k_old, k_new)))
    assert layer_rank(client, k_new - 1) == cut_rank
    assert all(layer_rank(client, j) == SPEC.r for j in range(k_new - 1))
    torch.testing.assert_close(_logits(client, server, ids), before, atol=1e-5, rtol=1e-5)


def test_a_trained_cut_layer_cannot_shrink(random_model):
    path = random_model("llama", n_layers=L)
    layout = build_layout(load_config(path), SPEC, [])
    flat = _trained_flat(layout)
    client, _ = _pair(path, 2, layout, flat)
    with pytest.raises(ValueError, match="cannot shrink"):
        restage(client, SPEC, 0, 4, SPEC.r_cut, lambda lo, hi: build_layers(path, lo, hi), layout, flat, 0)


def test_grown_layer_learns_and_memory_follows_the_layers(random_model):
    path = random_model("llama", n_layers=L)
    layout = build_layout(load_config(path), SPEC, [])
    flat = initial_adapter(layout, seed=0)
    flat_zero_a = flat.clone()
    for s in layout.slots:  # components past r_cut all zero (what fedavg leaves on an r_cut-only layer)
        a, _ = layout.views(flat_zero_a, s.name)
        a[SPEC.r_cut :].zero_()
    client, server = _pair(path, 3, layout, flat_zero_a)
    bytes_before = stage_parameter_bytes(client)
    _move(path, client, server, 1, SPEC.r_cut, layout, flat_zero_a)
    # Layer 2 was the client's r_cut cut layer and is now on the server at rank r: new A rows are live.
    for name, m in lora_modules(server.layers["2"]).items():
        a = m.lora_A["default"].weight
        assert a.shape[0] == SPEC.r and bool(a[SPEC.r_cut :].any()), name
        assert not bool(m.lora_B["default"].weight[:, SPEC.r_cut :].any())
    assert stage_parameter_bytes(client) < bytes_before


def test_build_layers_reads_only_those_layers(random_model):
    path = random_model("llama", n_layers=L)
    layers = build_layers(path, 2, 4)
    assert sorted(layers) == [2, 3]
    reference = build_stage(path, 2, 4)
    for j in (2, 3):
        ref = dict(reference.layers[str(j)].named_parameters())
        for name, p in layers[j].named_parameters():
            torch.testing.assert_close(p, ref[name])
    with pytest.raises(ValueError, match="inner layers"):
        build_layers(path, 0, 2)


def test_stage_add_and_drop_layers_checks_contiguity(random_model):
    path = random_model("llama", n_layers=L)
    stage = build_stage(path, 2, L)
    extra = build_layers(path, 1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        copy.copy(stage).add_layers({0: extra[1]})
    stage.add_layers(extra)
    assert (stage.start, stage.end) == (1, L)
    with pytest.raises(ValueError, match="cannot drop"):
        stage.drop_layers([3])
    assert sorted(stage.drop_layers([1, 2])) == [1, 2] and stage.start == 3
