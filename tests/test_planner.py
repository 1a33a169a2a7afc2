"""Properties of the cut-layer planner in ``partition.planner`` (pure cost model, no timing)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from partition import planner
from partition.planner import (
    AdaptivePlanner,
    ClientCosts,
    Measured,
    ModelCosts,
    PlanError,
    ServerCosts,
    check_memory,
    max_cut,
    memory_need,
    plan,
    plan_resource,
    predict,
)

HEADROOM = 0.1


def random_instance(rng: np.random.Generator, n: int, L: int):
    """A random model, clients drawn from a few memory/link/host profiles (so groups repeat), a server."""
    model = ModelCosts(
        n_layers=L,
        steps=int(rng.integers(1, 20)),
        layer_param_bytes=rng.uniform(1e8, 5e8),
        embed_param_bytes=rng.uniform(1e8, 1e9),
        lora_param_bytes=rng.uniform(1e5, 1e7),
        activation_bytes=rng.uniform(1e7, 3e8),
        payload_bytes=rng.uniform(1e5, 1e7),
        gradient_bytes=rng.uniform(1e5, 1e7),
        adapter_bytes=rng.uniform(1e6, 1e8),
    )
    fits = lambda k: memory_need(model, k) * (1 + HEADROOM) * rng.uniform(1, 1.2)
    memories = [fits(int(rng.integers(1, L))) for _ in "ab"]
    threads = {"a": rng.uniform(1, 8), "b": rng.uniform(1, 8), "gpu": 0.0}
    clients = []
    for _ in range(n):
        host = str(rng.choice(["a", "b", "gpu"]))
        time = rng.uniform(0.01, 1.0)
        clients.append(
            ClientCosts(
                layer_time_s=time,
                layer_cpu_s=time * threads[host],  # CPU work grows with wall time on one host
                memory_bytes=float(rng.choice(memories)),
                bandwidth_Bps=float(rng.choice([1e7, 1e9, math.inf])),
                rtt_s=0.005,
                host=host,
            )
        )
    s = rng.uniform(0.005, 0.5)
    server_host = str(rng.choice(["a", "srv"]))
    server = ServerCosts(
        layer_time_s=s,
        layer_cpu_s=s * threads.get(server_host, 0.0),
        head_time_s=rng.uniform(0.0, 1.0) * s,
        head_cpu_s=0.0,
        host=server_host,
        parallel=float(rng.integers(1, 4)),
    )
    cores = {"a": float(rng.uniform(1, 16)), "b": float(rng.uniform(1, 16))}
    return model, clients, server, cores


def instances(seed: int, count: int = 200):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield random_instance(rng, int(rng.integers(1, 7)), int(rng.integers(2, 13)))


def round_time(model, clients, server, cores, cuts) -> float:
    return predict(model, clients, server, cores, cuts).round_time_s


@pytest.fixture(params=["exhaustive", "heuristic"])
def search(request, monkeypatch):
    """Run the property tests on both search paths (limit 0 forces candidates + coordinate descent)."""
    if request.param == "heuristic":
        monkeypatch.setattr(planner, "EXHAUSTIVE_LIMIT", 0)
    return request.param


def test_plan_fits_memory_and_beats_every_fixed_cut(search):
    for model, clients, server, cores in instances(seed=1):
        cuts = plan_resource(model, clients, server, cores, HEADROOM)
        assert len(cuts) == len(clients)
        for k, client in zip(cuts, clients):
            assert 1 <= k <= model.n_layers - 1
            assert memory_need(model, k) * (1 + HEADROOM) <= client.memory_bytes
        best = round_time(model, clients, server, cores, cuts)
        for k in range(1, model.n_layers):
            if all(memory_need(model, k) * (1 + HEADROOM) <= c.memory_bytes for c in clients):
                assert best <= round_time(model, clients, server, cores, [k] * len(clients)) * (1 + 1e-9)


def test_faster_client_never_gets_a_shallower_cut(search):
    pairs = 0
    for model, clients, server, cores in instances(seed=2):
        cuts = plan_resource(model, clients, server, cores, HEADROOM)
        for i, a in enumerate(clients):
            for j, b in enumerate(clients):
                same = (a.memory_bytes, a.bandwidth_Bps, a.rtt_s, a.host) == (
                    b.memory_bytes,
                    b.bandwidth_Bps,
                    b.rtt_s,
                    b.host,
                )
                if same and a.layer_time_s < b.layer_time_s:
                    pairs += 1
                    assert cuts[i] >= cuts[j], (cuts, i, j)
    assert pairs > 50  # the instances really exercise the property


def test_lone_client_gets_the_brute_force_optimum(search):
    rng = np.random.default_rng(3)
    for _ in range(200):
        model, clients, server, cores = random_instance(rng, 1, int(rng.integers(2, 13)))
        clients = [ClientCosts(**{**clients[0].__dict__, "memory_bytes": math.inf})]
        (k,) = plan_resource(model, clients, server, cores, HEADROOM)
        times = [round_time(model, clients, server, cores, [j]) for j in range(1, model.n_layers)]
        assert round_time(model, clients, server, cores, [k]) <= min(times) * (1 + 1e-9)


def test_big_instance_uses_the_heuristic_and_beats_fixed_cuts():
    rng = np.random.default_rng(4)
    model, clients, server, cores = random_instance(rng, 10, 32)
    kmax = [max_cut(model, c, HEADROOM) for c in clients]
    assert math.prod(kmax) > planner.EXHAUSTIVE_LIMIT
    cuts = plan_resource(model, clients, server, cores, HEADROOM)
    check_memory(model, clients, cuts, HEADROOM)
    best = round_time(model, clients, server, cores, cuts)
    fixed = [
        round_time(model, clients, server, cores, [min(k, m) for m in kmax]) for k in range(1, model.n_layers)
    ]
    assert best <= min(fixed) * (1 + 1e-9)
    # Coordinate descent ends in a local optimum: no single client's cut lowers the round time.
    for i, m in enumerate(kmax):
        for k in range(1, m + 1):
            trial = cuts[:i] + [k] + cuts[i + 1 :]
            assert round_time(model, clients, server, cores, trial) >= best * (1 - 1e-9)


# ---------------------------------------------------------------- hand-computed cost model

MODEL = ModelCosts(
    n_layers=4,
    steps=10,
    layer_param_bytes=2e8,
    embed_param_bytes=1e9,
    lora_param_bytes=1e6,
    activation_bytes=5e7,
    payload_bytes=1e6,
    gradient_bytes=1e6,
    adapter_bytes=5e6,
)
CLIENT = ClientCosts(
    layer_time_s=0.2,
    layer_cpu_s=0.5,
    memory_bytes=8e9,
    bandwidth_Bps=1e8,
    rtt_s=0.01,
    host="c",
    overhead_s=0.05,
)
SERVER = ServerCosts(layer_time_s=0.1, layer_cpu_s=0.05, head_time_s=0.3, head_cpu_s=0.1, host="s")


def test_memory_need_and_max_cut_by_hand():
    per_layer = 2e8 + 4 * 1e6 + 5e7
    assert memory_need(MODEL, 3) == pytest.approx(1e9 + 3 * per_layer + 2e6)
    assert max_cut(MODEL, CLIENT) == 3
    one_and_a_bit = ClientCosts(**{**CLIENT.__dict__, "memory_bytes": memory_need(MODEL, 2) * 1.1})
    assert max_cut(MODEL, one_and_a_bit) == 2
    assert max_cut(MODEL, one_and_a_bit, headroom=0.2) == 1


def test_predict_one_client_by_hand():
    link = 1e6 / 1e8 + 1e6 / 1e8 + 2 * 0.01
    crit = 10 * (3 * 0.2 + link + 1 * 0.1 + 0.3 + 0.05) + 2 * 5e6 / 1e8
    assert crit == pytest.approx(11.0)
    p = predict(MODEL, [CLIENT], SERVER, {"c": 4, "s": 1}, [3])
    assert p.round_time_s == pytest.approx(crit, rel=1e-12)
    assert p.client_time_s == pytest.approx((crit,), rel=1e-12)
    assert p.memory_bytes == (memory_need(MODEL, 3),)
    assert p.bottleneck == "client 1"
    # Client host: 10 * 3 * 0.5 CPU s on 0.1 cores = 150 s; server host: 10 * (1 * 0.05 + 0.1) / 0.01 = 150 s.
    p = predict(MODEL, [CLIENT], SERVER, {"c": 0.1}, [3])
    assert p.round_time_s == pytest.approx(150.0)
    assert p.bottleneck == "host c"
    p = predict(MODEL, [CLIENT], SERVER, {"s": 0.01}, [3])
    assert p.round_time_s == pytest.approx(150.0)
    assert p.bottleneck == "host s"


def test_bottleneck_switches_to_server_and_host():
    clients = [ClientCosts(**{**CLIENT.__dict__, "layer_time_s": 0.01, "layer_cpu_s": 0.0})] * 4
    fast = ServerCosts(layer_time_s=0.01, layer_cpu_s=0.0, head_time_s=0.01, head_cpu_s=0.0, host="s")
    assert predict(MODEL, clients, fast, {}, [2] * 4).bottleneck.startswith("client")
    slow = ServerCosts(layer_time_s=1.0, layer_cpu_s=0.0, head_time_s=0.5, head_cpu_s=0.0, host="s")
    p = predict(MODEL, clients, slow, {}, [2] * 4)
    assert p.bottleneck == "server"
    assert p.round_time_s == pytest.approx(10 * 4 * (2 * 1.0 + 0.5))
    cpu_heavy = [ClientCosts(**{**CLIENT.__dict__, "layer_time_s": 0.5, "layer_cpu_s": 1.0, "host": "h"})] * 6
    gpu = ServerCosts(**{**fast.__dict__, "host": "g"})
    p = predict(MODEL, cpu_heavy, gpu, {"h": 2}, [2] * 6)
    assert p.bottleneck == "host h"
    assert p.round_time_s == pytest.approx(10 * 6 * 2 * 1.0 / 2)
    assert predict(MODEL, cpu_heavy, gpu, {}, [2] * 6).bottleneck.startswith("client")


# ---------------------------------------------------------------- errors and policies


def test_one_layer_does_not_fit_names_client_and_gb():
    tiny = ClientCosts(**{**CLIENT.__dict__, "memory_bytes": 1e9})
    expected = r"client 2 has 1\.00 GB available; one layer needs 1\.\d\d GB"
    with pytest.raises(PlanError, match=expected) as err:
        plan_resource(MODEL, [CLIENT, tiny], SERVER, {})
    assert "memory" in str(err.value)
    with pytest.raises(PlanError, match="client 2"):
        plan("fixed", MODEL, [CLIENT, tiny], SERVER, {}, cut_layers=1)


def test_fixed_and_manual_check_memory():
    small = ClientCosts(**{**CLIENT.__dict__, "memory_bytes": memory_need(MODEL, 1) * 1.1})
    clients = [CLIENT, CLIENT, small]
    assert plan("fixed", MODEL, clients, SERVER, {}, cut_layers=1) == [1, 1, 1]
    with pytest.raises(PlanError, match=r"client 3 has 1\.\d\d GB available; cut 2 needs .* GB") as err:
        plan("fixed", MODEL, clients, SERVER, {}, cut_layers=2)
    message = str(err.value)
    assert "largest cut that fits is 1" in message and "resource" in message and "adaptive" in message
    assert plan("manual", MODEL, clients, SERVER, {}, cut_layers=[3, 2, 1]) == [3, 2, 1]
    with pytest.raises(PlanError, match="client 3"):
        plan("manual", MODEL, clients, SERVER, {}, cut_layers=[1, 1, 3])
    with pytest.raises(PlanError, match="client 1: cut 4 is outside 1..3"):
        plan("manual", MODEL, clients, SERVER, {}, cut_layers=[4, 1, 1])
    with pytest.raises(ValueError, match="one cut per client"):
        plan("manual", MODEL, clients, SERVER, {}, cut_layers=[1, 1])
    with pytest.raises(ValueError, match="one int"):
        plan("fixed", MODEL, clients, SERVER, {}, cut_layers=[1, 1, 1])
    with pytest.raises(ValueError, match="unknown cut policy"):
        plan("greedy", MODEL, clients, SERVER, {})
    expected = plan_resource(MODEL, clients, SERVER, {})
    assert plan("resource", MODEL, clients, SERVER, {}) == expected
    assert plan("adaptive", MODEL, clients, SERVER, {}) == expected


# ---------------------------------------------------------------- adaptive planner

A_MODEL = ModelCosts(
    n_layers=8,
    steps=10,
    layer_param_bytes=1e8,
    embed_param_bytes=1e8,
    lora_param_bytes=1e6,
    activation_bytes=1e7,
    payload_bytes=1e6,
    gradient_bytes=1e6,
    adapter_bytes=1e6,
)
A_CLIENT = ClientCosts(
    layer_time_s=0.1, layer_cpu_s=0.0, memory_bytes=1e10, bandwidth_Bps=1e9, rtt_s=0.001, host="gpu"
)
A_SERVER = ServerCosts(layer_time_s=0.1, layer_cpu_s=0.0, head_time_s=0.05, head_cpu_s=0.0, host="srv")


def measure(true_clients, cuts) -> list[Measured]:
    """Step medians an idle server would produce for the true client costs."""
    out = []
    for c, k in zip(true_clients, cuts):
        compute = k * c.layer_time_s
        link = 2e6 / c.bandwidth_Bps + 2 * c.rtt_s
        step = compute + link + (A_MODEL.n_layers - k) * A_SERVER.layer_time_s + A_SERVER.head_time_s
        out.append(Measured(compute_s=compute, step_s=step, train_time_s=10 * step, train_loss=1.0))
    return out


def slowed(factor: float) -> list[ClientCosts]:
    return [ClientCosts(**{**A_CLIENT.__dict__, "layer_time_s": 0.1 * factor}), A_CLIENT]


def make_planner(**kwargs) -> AdaptivePlanner:
    return AdaptivePlanner(A_MODEL, [A_CLIENT, A_CLIENT], A_SERVER, {}, **kwargs)


def test_slower_client_gets_a_shallower_cut():
    p = make_planner()
    cuts = p.initial()
    assert cuts == [7, 7]
    p.observe(cuts, measure(slowed(4), cuts), eval_loss=2.0)
    assert p.clients[0].layer_time_s == pytest.approx(0.4)  # a 4x change replaces the estimate (level shift)
    assert p.server.layer_time_s == pytest.approx(0.1)  # the remote part matches the probe server
    new = p.propose(2, cuts)
    assert new is not None and new[0] < cuts[0] and new[1] == 7


def test_no_proposal_when_gain_is_below_hysteresis():
    p = make_planner()
    cuts = p.initial()
    p.observe(cuts, measure(slowed(1), cuts), eval_loss=2.0)
    assert p.propose(2, cuts) is None  # nothing changed
    p.observe(cuts, measure(slowed(4), cuts), eval_loss=1.9)
    best = plan_resource(A_MODEL, p.clients, p.server, {})
    gain = 1 - round_time(A_MODEL, p.clients, p.server, {}, best) / round_time(
        A_MODEL, p.clients, p.server, {}, cuts
    )
    assert 0.02 < gain < 0.98
    for hysteresis, expected in ((gain + 0.01, None), (gain - 0.01, best)):
        q = make_planner(hysteresis=hysteresis)
        q.load_state_dict(p.state_dict())
        assert q.propose(2, cuts) == expected


def test_proposals_only_every_n_rounds():
    p = make_planner(every=3)
    cuts = p.initial()
    p.observe(cuts, measure(slowed(4), cuts), eval_loss=2.0)
    assert p.propose(1, cuts) is None
    assert p.propose(2, cuts) is None
    assert p.propose(4, cuts) is None
    assert p.propose(3, cuts) is not None


def test_move_followed_by_loss_rise_is_reverted_and_not_reproposed():
    p = make_planner(smoothing=1.0)
    truth = slowed(4)
    cuts = p.initial()
    p.observe(cuts, measure(truth, cuts), eval_loss=2.0)
    moved = p.propose(2, cuts)
    assert moved is not None
    p.observe(moved, measure(truth, moved), eval_loss=2.1)  # +5% after the move
    assert p.propose(4, moved) == cuts
    for round_ in (6, 8, 10):
        p.observe(cuts, measure(truth, cuts), eval_loss=1.9)
        assert p.propose(round_, cuts) is None
    assert p.state_dict()["forbidden"] == [moved]


def test_move_followed_by_falling_loss_is_kept():
    p = make_planner(smoothing=1.0)
    truth = slowed(4)
    cuts = p.initial()
    p.observe(cuts, measure(truth, cuts), eval_loss=2.0)
    moved = p.propose(2, cuts)
    p.observe(moved, measure(truth, moved), eval_loss=2.01)  # within 1%
    assert p.propose(4, moved) is None
    assert p.state_dict()["move"] is None and p.state_dict()["forbidden"] == []


def test_memory_caps_hold_when_a_client_gets_faster():
    capped = ClientCosts(**{**A_CLIENT.__dict__, "memory_bytes": memory_need(A_MODEL, 3) * 1.1})
    p = AdaptivePlanner(A_MODEL, [capped, A_CLIENT], A_SERVER, {}, every=1, smoothing=1.0)
    cuts = p.initial()
    assert cuts[0] <= 3
    fast = [ClientCosts(**{**capped.__dict__, "layer_time_s": 0.001}), ClientCosts(**A_CLIENT.__dict__)]
    for round_ in range(1, 4):
        p.observe(cuts, measure(fast, cuts), eval_loss=2.0 - 0.1 * round_)
        cuts = p.propose(round_, cuts) or cuts
        assert cuts[0] <= 3


def test_state_dict_round_trips_through_json():
    p = make_planner(smoothing=1.0)
    truth = slowed(4)
    cuts = p.initial()
    p.observe(cuts, measure(truth, cuts), eval_loss=2.0)
    moved = p.propose(2, cuts)
    p.observe(moved, measure(truth, moved), eval_loss=2.5)
    state = json.loads(json.dumps(p.state_dict()))
    q = make_planner(smoothing=1.0)
    q.load_state_dict(state)
    assert q.state_dict() == p.state_dict()
    assert q.clients == p.clients and q.server == p.server
    assert q.propose(4, moved) == p.propose(4, moved) == cuts
    assert q.state_dict() == p.state_dict()


def test_small_changes_are_smoothed_and_a_level_shift_is_taken_whole():
    p = make_planner(smoothing=0.5)
    cuts = p.initial()
    p.observe(cuts, measure(slowed(1.2), cuts), eval_loss=2.0)  # noise-sized: averaged in
    assert p.clients[0].layer_time_s == pytest.approx(0.5 * 0.1 + 0.5 * 0.12)
    p.observe(cuts, measure(slowed(0.3), cuts), eval_loss=1.9)  # 3.7x faster than the estimate: replaced
    assert p.clients[0].layer_time_s == pytest.approx(0.03)
    assert p.clients[1].layer_time_s == pytest.approx(0.1)


def test_propose_says_why():
    p = make_planner(smoothing=1.0)
    cuts = p.initial()
    p.observe(cuts, measure(slowed(4), cuts), eval_loss=2.0)
    moved = p.propose(2, cuts)
    assert p.reason["rule"] == "speed" and str(moved) in p.reason["detail"]
    times = p.reason["predicted_round_time_s"]
    assert times["best"] < (1 - p.hysteresis) * times["current"]
    assert p.pending
    p.observe(moved, measure(slowed(4), moved), eval_loss=2.5)
    assert p.propose(4, moved) == cuts and p.reason["rule"] == "revert" and "+25.0%" in p.reason["detail"]
    p.observe(cuts, measure(slowed(4), cuts), eval_loss=1.9)
    assert p.propose(6, cuts) is None and p.reason["rule"] is None and p.forbidden(moved)


def test_a_server_that_turns_slow_hands_its_layers_to_the_clients():
    """simulate.server_slowdown's case: slow clients start shallow; when the measured server time per step
    shows the server 16x slower (another job on its node), the refit takes the shift whole and the next
    plan moves layers to the clients."""
    slow = ClientCosts(**{**A_CLIENT.__dict__, "layer_time_s": 0.4})
    p = AdaptivePlanner(A_MODEL, [slow, slow], A_SERVER, {}, every=1)
    cuts = p.initial()
    assert max(cuts) <= 2  # of 8 layers: the server is 4x faster than the clients
    measured = []
    for k in cuts:
        server_s = (A_MODEL.n_layers - k) * 16 * A_SERVER.layer_time_s + A_SERVER.head_time_s
        compute = k * slow.layer_time_s
        step = compute + server_s + 2e6 / slow.bandwidth_Bps + 2 * slow.rtt_s
        measured.append(Measured(compute, step, 10 * step, 1.0, server_s=server_s))
    p.observe(cuts, measured, eval_loss=2.0)
    assert p.server.layer_time_s > 10 * A_SERVER.layer_time_s  # a level shift, taken whole
    new = p.propose(1, cuts)
    assert new is not None and min(new) > max(cuts), new
    assert p.reason["rule"] == "speed"


# ---------------------------------------------------------------------- clients sharing workers


def test_a_shared_plan_gives_each_client_the_cut_that_minimises_its_own_time():
    """Every client's cut is the best of all its cuts with the typical client beside it (brute force), the
    faster of two clients never gets the shallower cut, equal clients get equal cuts, and memory holds."""
    checked = 0
    for model, clients, server, cores in instances(3, 60):
        clients = clients * 3  # more clients than train at a time, with repeats
        for slots in (1, 2):
            cuts = planner.plan_shared(model, clients, server, cores, slots, HEADROOM)
            check_memory(model, clients, cuts, HEADROOM)
            times = planner.shared_times(model, clients, server, cores, slots, cuts)
            beside = planner._beside(clients, cuts)
            for i, cl in enumerate(clients):
                for k in range(1, max_cut(model, cl, HEADROOM) + 1):
                    t = planner._alone_times(model, cl, server, cores, slots, [k], beside)[0]
                    assert times[i] <= t * (1 + 1e-9)
            for i, j in ((i, j) for i in range(len(clients)) for j in range(len(clients))):
                if clients[i] == clients[j]:
                    assert cuts[i] == cuts[j]
            checked += 1
    assert checked == 120


def test_a_shared_plan_is_not_the_plan_of_everyone_at_once():
    """Six clients of which two train at a time: a busy server is shared by two, not by six, so the
    clients keep more layers on the server than a plan of six concurrent clients would leave there."""
    server = ServerCosts(layer_time_s=0.05, layer_cpu_s=0.0, head_time_s=0.01, head_cpu_s=0.0, host="srv")
    clients = [A_CLIENT] * 6
    shared = planner.plan_shared(A_MODEL, clients, server, {}, 2, HEADROOM)
    everyone = plan_resource(A_MODEL, clients, server, {}, HEADROOM)
    assert sum(shared) < sum(everyone)
    assert shared == planner.plan_shared(A_MODEL, clients[:2], server, {}, 2, HEADROOM) * 3


def test_adaptive_with_shared_workers_moves_only_the_client_it_measured_slow():
    """Four clients, two at a time: round 1 measures clients 1 and 3 only; client 3 turned 4x slower, so
    it alone gets a shallower cut; clients 2 and 4 keep their probe figures (None: they sat out), and a
    later round that measures client 3 at its old speed again gives its layers back."""
    p = AdaptivePlanner(A_MODEL, [A_CLIENT] * 4, A_SERVER, {}, every=1, hysteresis=0.05, slots=2)
    cuts = p.initial()
    assert len(set(cuts)) == 1
    true = [A_CLIENT, A_CLIENT, slowed(4)[0], A_CLIENT]
    m = measure(true, cuts)
    p.observe(cuts, [m[0], None, m[2], None], eval_loss=2.0)
    assert p.clients[2].layer_time_s == pytest.approx(0.4, rel=0.05)
    assert p.clients[1] == p.clients[3] == A_CLIENT  # not measured: the probe's figures stay
    new = p.propose(1, cuts)
    assert (
        new is not None and new[2] < cuts[2] and [new[i] for i in (0, 1, 3)] == [cuts[i] for i in (0, 1, 3)]
    )
    assert p.reason["rule"] == "speed" and "client 3 cut" in p.reason["detail"]
    p.observe(new, [None, None, measure([A_CLIENT] * 4, new)[2], None], eval_loss=1.9)
    assert p.propose(2, new) == cuts  # its speed is back: so is its cut
    with pytest.raises(ValueError, match="every client must be measured"):
        make_planner().observe(cuts[:2], [m[0], None], eval_loss=2.0)
