"""The training-progress rule (``partition.plateau``) and how the scheduler applies and records it."""

from __future__ import annotations

import json

import pytest

from partition.planner import ClientCosts, Measured, ServerCosts, max_cut, memory_need
from partition.plateau import deepen_plateaued, loss_trend
from tests.test_planner import A_CLIENT, A_MODEL, A_SERVER, round_time
from tests.test_scheduler import _profile, _scheduler


def test_loss_trend_by_hand():
    assert loss_trend([2.0, 1.0, 0.9], 2) is None  # a trend needs 2 x window rounds
    # window 1: (1.0 - 0.9) / 1.0
    assert loss_trend([2.0, 1.0, 0.9], 1) == pytest.approx(0.1)
    # window 2: before = mean(2.0, 1.0) = 1.5, last = mean(0.9, 0.6) = 0.75 -> (0.75 / 1.5) / 2
    assert loss_trend([2.0, 1.0, 0.9, 0.6], 2) == pytest.approx(0.25)
    assert loss_trend([1.0, 1.0, 1.1, 1.2], 2) < 0  # a rising loss
    with pytest.raises(ValueError):
        loss_trend([1.0], 0)


def slow(factor: float) -> ClientCosts:
    return ClientCosts(**{**A_CLIENT.__dict__, "layer_time_s": 0.1 * factor})


def test_a_plateaued_client_whose_memory_allows_gets_one_layer_more():
    clients = [A_CLIENT, A_CLIENT, A_CLIENT]
    # Clients as fast as an idle server: a deeper cut costs no predicted time.
    out = deepen_plateaued(A_MODEL, clients, A_SERVER, {}, [2, 2, 7], [0.001, 0.2, 0.0], 0.02, 0.1)
    assert out == ([3, 2, 7], [0])  # client 2 still learns fast; client 3 is at the last cut already
    assert deepen_plateaued(A_MODEL, clients, A_SERVER, {}, [2, 2, 2], [None, 0.2, 0.5], 0.02, 0.1) is None
    assert deepen_plateaued(A_MODEL, clients, A_SERVER, {}, [2, 2, 2], [0.0] * 3, 0.0, 0.1) is None  # off
    capped = ClientCosts(**{**A_CLIENT.__dict__, "memory_bytes": memory_need(A_MODEL, 2) * 1.1})
    assert max_cut(A_MODEL, capped) == 2
    out = deepen_plateaued(A_MODEL, [capped, A_CLIENT], A_SERVER, {}, [2, 2], [0.0, 0.0], 0.02, 0.1)
    assert out == ([2, 3], [1])  # the capped client keeps its cut


def test_a_deeper_cut_must_stay_within_hysteresis_of_the_round_time():
    # A server that serves every client at once; client 1 is twice as slow as it, so one more layer
    # there adds 0.1 s a step to client 1's path, which sets the round; one more on client 2 costs nothing.
    server = ServerCosts(**{**A_SERVER.__dict__, "parallel": 100.0})
    clients, cuts = [slow(2), A_CLIENT], [3, 3]
    now = round_time(A_MODEL, clients, server, {}, cuts)
    cost = round_time(A_MODEL, clients, server, {}, [4, 3]) / now - 1
    assert cost == pytest.approx(1.0 / 11.542)  # 10 steps x 0.1 s over the round
    assert round_time(A_MODEL, clients, server, {}, [3, 4]) == pytest.approx(now)
    assert deepen_plateaued(A_MODEL, clients, server, {}, cuts, [0.0, 0.5], 0.02, cost * 0.9) is None
    assert deepen_plateaued(A_MODEL, clients, server, {}, cuts, [0.0, 0.5], 0.02, cost * 1.1) == ([4, 3], [0])
    # Both plateaued: the free deepening (client 2) is made, client 1's costly one is not.
    assert deepen_plateaued(A_MODEL, clients, server, {}, cuts, [0.0, 0.0], 0.02, cost * 0.9) == ([3, 4], [1])


def _stats(loss: float, k: int, c: float = 0.1, s: float = 0.09) -> Measured:
    """A round's figures for a client at cut ``k`` of 4: client layers c s, server layers s s, head 0.01 s."""
    server = s * (4 - k) + 0.01
    return Measured(
        compute_s=c * k, step_s=c * k + server + 0.02, train_time_s=1.0, train_loss=loss, server_s=server
    )


def _adaptive(random_model):
    gpu = dict(cuda={"free_bytes": 8 << 30, "total_bytes": 16 << 30})
    server = _profile(**gpu, layer_time_s=0.09, head_time_s=0.01, head_cpu_s=0.0, host="srv")
    return _scheduler(
        random_model,
        ["split.policy=adaptive", "split.replan_every=1", "split.cut_layers=[1,1]", "split.plateau=0.05"],
        [_profile(**gpu, layer_time_s=0.1, host="a"), _profile(**gpu, layer_time_s=0.1, host="b")],
        server,
    )


def test_scheduler_deepens_a_plateaued_client_says_why_and_reverts_if_eval_loss_rises(random_model):
    s = _adaptive(random_model)
    cuts = s.initial()
    assert cuts == [1, 1]  # adaptive starts from a given list
    moves = {}
    # Client 1's loss is flat (under 1% a round); client 2's keeps falling 20% a round.
    for rnd, (l1, l2) in enumerate([(1.0, 2.0), (0.99, 1.6), (0.985, 1.28), (0.98, 1.02)], start=1):
        new = s.after_round(rnd, cuts, [_stats(l1, cuts[0]), _stats(l2, cuts[1])], eval_loss=2.0 - 0.1 * rnd)
        moves[rnd] = (new, s.reason)
        cuts = new or cuts
    # A serial (GPU) server shared by two clients: the speed rule first moves a layer to each client.
    assert moves[2][0] == [2, 2] and moves[2][1]["rule"] == "speed"
    # Round 4 (2 x trend_window rounds of history): client 1 has plateaued, one more layer costs +2%.
    new, reason = moves[4]
    assert new == [3, 2], moves
    assert reason["rule"] == "progress" and "client 1's training loss fell 0.6% a round" in reason["detail"]
    assert reason["loss_trend"][0] < 0.05 < reason["loss_trend"][1]
    times = reason["predicted_round_time_s"]
    assert times["current"] < times["proposed"] <= 1.1 * times["current"]
    state = json.loads(json.dumps(s.state_dict()))
    assert state["client_losses"][0] == [1.0, 0.99, 0.985, 0.98] and state["move"]["after"] == [3, 2]

    # Resumed from that state: the eval loss rises 5% after the move, so the next re-plan undoes it...
    again = _adaptive(random_model)
    again.load_state_dict(state)
    assert again.client_losses == s.client_losses
    back = again.after_round(5, [3, 2], [_stats(0.98, 3), _stats(0.9, 2)], eval_loss=1.6 * 1.05)
    assert back == [2, 2] and again.reason["rule"] == "revert"
    # ... and the reverted plan is never proposed again, though client 1 stays on its plateau.
    for rnd in (6, 7, 8):
        stats = [_stats(0.98, 2), _stats(0.9 * 0.8 ** (rnd - 5), 2)]
        assert again.after_round(rnd, [2, 2], stats, eval_loss=1.5) is None, again.reason


def test_fixed_policies_record_only_scheduled_moves(random_model):
    s = _scheduler(random_model, ["split.cut_layers=[1,2]", "split.schedule={2: [3, 1]}"], [_profile()] * 2)
    assert s.after_round(1, [1, 2], [_stats(1.0, 1)] * 2, 1.0) is None and s.reason is None
    assert s.after_round(2, [1, 2], [_stats(1.0, 1)] * 2, 1.0) == [3, 1]
    assert s.reason == {"rule": "schedule", "detail": "split.schedule[2] = [3, 1]"}
    assert s.state_dict() == {}
