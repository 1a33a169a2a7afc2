"""The aggregation rules' arithmetic on real stages with PEFT LoRA: stack, fedavg and svd."""

from __future__ import annotations

import torch

from models.aggregation import (
    StackLayout,
    dense_delta,
    fedavg_result,
    fedavg_vector,
    merge_delta,
    stack_restart,
    stack_vector,
    svd_factors,
    svd_result,
)
from models.lora import (
    ADAPTER,
    LoraSpec,
    build_layout,
    chain_ranks,
    inject_layers,
    lora_modules,
    lora_parameters,
    target_ranks,
)
from models.stages import build_stage, load_config

L = 4
SPEC = LoraSpec(r=16, alpha=32.0, r_cut=8, targets=("q_proj", "v_proj", "up_proj"))
# Four clients of ranks 2, 4, 8, 16 cut at different layers; weights p_i sum to 1.
CUTS, CAPS, WEIGHTS = [1, 2, 3, 2], [2, 4, 8, 16], [0.1, 0.2, 0.3, 0.4]


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _chains(path):
    """Each client's stage and its server replica, with random LoRA of the chain's ranks."""
    holders = []
    for i, (k, cap, w) in enumerate(zip(CUTS, CAPS, WEIGHTS), start=1):
        client, server = build_stage(path, 0, k), build_stage(path, k, L)
        inject_layers(client, SPEC, target_ranks(0, k, SPEC, SPEC.r_cut, cap))
        inject_layers(server, SPEC, target_ranks(k, L, SPEC, None))
        _randomise(client.hf, 10 * i)
        _randomise(server.hf, 10 * i + 1)
        holders += [(i, client.hf, w), (i, server.hf, w)]
    return holders


def _stacked(path):
    """The four chains' layout, ranks, holders and stack layout, and the all-reduce's sum: every rank's
    vector summed (each holder here is its own "rank")."""
    layout = build_layout(load_config(path), SPEC, CUTS, CAPS)
    chains = {i: chain_ranks(layout, SPEC, k, SPEC.r_cut, c) for i, (k, c) in enumerate(zip(CUTS, CAPS), 1)}
    holders = _chains(path)
    stack = StackLayout(layout, chains)
    return layout, chains, holders, stack, sum(stack_vector([h], stack) for h in holders)


def test_stack_is_the_exact_weighted_sum_of_products(random_model):
    path = random_model("llama")
    layout, chains, holders, stack, summed = _stacked(path)
    ranks_seen = set()
    for s in layout.slots:
        want = torch.zeros(s.out_features, s.in_features, dtype=torch.float64)
        for _, model, w in holders:
            m = lora_modules(model).get(s.name)
            if m is not None:
                a, b = m.lora_A[ADAPTER].weight.double(), m.lora_B[ADAPTER].weight.double()
                ranks_seen.add(a.shape[0])
                want += w * m.scaling[ADAPTER] * b @ a
        a_s, b_s = stack.factors(summed, s.name)
        got = dense_delta(a_s, b_s)
        assert (got - want).norm() / want.norm() < 1e-6
        assert a_s.shape[0] == sum(chains[i][s.name] for i in chains)
    assert {2, 4, 8, 16} <= ranks_seen


def test_stack_restarts_from_zero_b_and_the_averaged_a(random_model):
    path = random_model("llama")
    layout, chains, holders, stack, summed = _stacked(path)
    flat = stack_restart(summed, stack, dict(enumerate(WEIGHTS, start=1)))
    for s in layout.slots:
        a, b = layout.views(flat, s.name)
        assert not b.any()  # the merged weights hold the copies' products: B = 0 keeps the model
        want = torch.zeros(s.rank, s.in_features)
        mass = torch.zeros(s.rank)
        for _, model, w in holders:
            m = lora_modules(model).get(s.name)
            if m is not None:
                la = m.lora_A[ADAPTER].weight
                want[: la.shape[0]] += w * la
                mass[: la.shape[0]] += w
        torch.testing.assert_close(a, want / mass[:, None])


def test_merging_the_stack_is_the_sum_of_the_copies_deltas(random_model):
    """A base weight plus the stacked delta computes what the copies' weighted LoRA updates add."""
    path = random_model("llama")
    layout, chains, holders, stack, summed = _stacked(path)
    name = "model.layers.1.self_attn.q_proj"
    x = torch.randn(3, layout.by_name[name].in_features, generator=torch.Generator().manual_seed(0))
    copies = [(w, lora_modules(m)[name]) for _, m, w in holders if name in lora_modules(m)]
    base = copies[0][1].get_base_layer()
    merged = base.weight.detach().clone()
    merge_delta(merged, *stack.factors(summed, name), fan_in_fan_out=False)
    with torch.no_grad():
        want = base(x) + sum(w * (m(x) - base(x)) for w, m in copies)
        torch.testing.assert_close(torch.nn.functional.linear(x, merged, base.bias), want)
    assert len(copies) == 4 and (want - base(x)).abs().max() > 1e-3


def test_dense_delta_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, 257, generator=g), torch.randn(129, 30, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dense_delta(a, b)
        torch.set_num_threads(max(2, threads))
        many = dense_delta(a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    torch.testing.assert_close(one, b.double() @ a.double())


def test_fedavg_equal_ranks_is_the_plain_average(random_model):
    path = random_model("llama")
    spec = LoraSpec(r=8, alpha=16.0, r_cut=8, targets=("q_proj", "v_proj"))
    layout = build_layout(load_config(path), spec, [2, 2])
    stages = []
    for i, w in enumerate([0.25, 0.75]):
        st = build_stage(path, 0, 2)
        inject_layers(st, spec, target_ranks(0, 2, spec, spec.r_cut))
        _randomise(st.hf, i)
        stages.append((st.hf, w))
    summed = sum(fedavg_vector([h], layout) for h in stages)
    flat = fedavg_result(summed, layout, torch.zeros(layout.numel))
    for name, m0 in lora_modules(stages[0][0]).items():
        m1 = lora_modules(stages[1][0])[name]
        a, b = layout.views(flat, name)
        torch.testing.assert_close(a, 0.25 * m0.lora_A[ADAPTER].weight + 0.75 * m1.lora_A[ADAPTER].weight)
        torch.testing.assert_close(b, 0.25 * m0.lora_B[ADAPTER].weight + 0.75 * m1.lora_B[ADAPTER].weight)


def test_fedavg_does_not_dilute_a_component_only_one_client_holds(random_model):
    """Two clients of equal weight: one holds layer 1 at rank 8, the other at rank 2 (its cut layer).
    Components 2..7 exist in one copy only, so they keep that copy's value (not half of it)."""
    path = random_model("llama")
    spec = LoraSpec(r=8, alpha=16.0, r_cut=2, targets=("q_proj", "v_proj"))
    layout = build_layout(load_config(path), spec, [2, 3])
    big, small = build_stage(path, 0, 3), build_stage(path, 0, 2)
    inject_layers(big, spec, target_ranks(0, 3, spec, spec.r_cut))  # layer 1 at rank 8
    inject_layers(small, spec, target_ranks(0, 2, spec, spec.r_cut))  # layer 1 at rank 2
    _randomise(big.hf, 1)
    _randomise(small.hf, 2)
    summed = fedavg_vector([(big.hf, 0.5)], layout) + fedavg_vector([(small.hf, 0.5)], layout)
    flat = fedavg_result(summed, layout, torch.zeros(layout.numel))
    name = "model.layers.1.self_attn.q_proj"
    mb, ms = lora_modules(big.hf)[name], lora_modules(small.hf)[name]
    a, b = layout.views(flat, name)
    torch.testing.assert_close(a[2:], mb.lora_A[ADAPTER].weight[2:])
    torch.testing.assert_close(b[:, 2:], mb.lora_B[ADAPTER].weight[:, 2:])
    torch.testing.assert_close(a[:2], 0.5 * (mb.lora_A[ADAPTER].weight[:2] + ms.lora_A[ADAPTER].weight))


def test_svd_at_full_rank_is_exact_and_truncation_is_the_best_approximation():
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.randn(12, 40, generator=g, dtype=torch.float64),
        torch.randn(30, 12, generator=g, dtype=torch.float64),
    )
    want = b @ a
    fa, fb = svd_factors(a, b, 16, scale=2.0)  # rank 16 >= 12: exact
    assert ((2.0 * fb @ fa - want).norm() / want.norm()) < 1e-12
    # The leading 4 components are the best rank-4 approximation (Eckart-Young).
    u, sv, vh = torch.linalg.svd(want)
    best = u[:, :4] * sv[:4] @ vh[:4]
    torch.testing.assert_close(2.0 * fb[:, :4] @ fa[:4], best)


def test_svd_result_reproduces_the_weighted_products_at_full_rank(random_model):
    path = random_model("llama")
    spec = LoraSpec(r=16, alpha=32.0, r_cut=16, targets=("q_proj",))
    layout = build_layout(load_config(path), spec, [2, 2])
    chains = {i: chain_ranks(layout, spec, 2, spec.r_cut, c) for i, c in [(1, 4), (2, 8)]}
    holders = []
    for i, cap in [(1, 4), (2, 8)]:
        st = build_stage(path, 0, 2)
        inject_layers(st, spec, target_ranks(0, 2, spec, spec.r_cut, cap))
        _randomise(st.hf, i)
        holders.append((i, st.hf, 0.5))
    stack = StackLayout(layout, chains)
    summed = sum(stack_vector([h], stack) for h in holders)
    flat = svd_result(summed, stack, spec.scale)
    name = "model.layers.0.self_attn.q_proj"
    want = sum(
        0.5 * m.scaling[ADAPTER] * m.lora_B[ADAPTER].weight @ m.lora_A[ADAPTER].weight
        for m in (lora_modules(h[1])[name] for h in holders)
    )
    a, b = layout.views(flat, name)
    assert a.shape[0] == 16  # 4 + 8 = 12 components fit in the global rank
    torch.testing.assert_close(spec.scale * b @ a, want, rtol=1e-5, atol=1e-6)
