"""Speeds that change during a run: a ``simulate`` schedule, what the probe and the step timings see, and
``adaptive`` moving layers when a client turns slow (one multi-process run, resumed once)."""

from __future__ import annotations

import json

from tests.ranks import launch
from tests.test_distributed import common_args, metrics, setup  # noqa: F401  (fixture)


def test_a_client_that_turns_slow_is_given_fewer_layers_within_replan_every(setup, tmp_path):
    """Client 2 runs 40x slower from round 2 on. The step timings show it from round 2, `adaptive`
    (re-planning every 2 rounds) moves its layers to the server after round 2, says why, and a launch
    resumed at round 4 probes client 2 at its round-4 speed."""
    out = tmp_path / "run"
    args = [
        *common_args(setup, out),
        "split.policy=adaptive",
        "split.cut_layers=[1,3]",  # adaptive's start: client 2 holds three layers
        "split.replan_every=2",
        "train.local_steps=4",
        "simulate.slowdown={1: 1, 2: [1, 40]}",
    ]
    res = launch(3, [*args, "train.rounds=3"])
    assert res.returncode == 0, res.stdout[-4000:]
    records = metrics(out)
    first_probe = json.loads((out / "profiles.json").read_text())

    compute = [r["clients"]["2"]["compute_s"] for r in records]
    assert compute[1] > 5 * compute[0], compute  # the step timings see the change at round 2 (~30x)
    assert [r["simulated"]["2"]["slowdown"] for r in records] == [1, 40, 40]
    assert records[0]["plan"]["next_cut_layers"] is None  # round 1 is not a re-plan round
    plan = records[1]["plan"]
    assert plan["next_cut_layers"]["2"] == 1, plan
    assert plan["replan"]["rule"] == "speed" and "faster" in plan["replan"]["detail"]
    times = plan["replan"]["predicted_round_time_s"]
    assert times["best"] < 0.9 * times["current"]
    assert plan["replan"]["client_layer_time_s"][1] > 5 * plan["replan"]["client_layer_time_s"][0]
    assert records[2]["cut_layers"]["2"] == 1
    assert records[2]["clients"]["2"]["compute_s"] < 0.85 * compute[1]  # one slow layer, not three (~0.35x)

    # The probe measures the speed of the round a launch starts with: round 1 (factor 1) at first,
    # round 4 (factor 40) after a resume.
    res = launch(3, [*args, "train.rounds=4", "runtime.resume=true"])
    assert res.returncode == 0, res.stdout[-4000:]
    assert "resuming after round 3" in res.stdout
    probe = json.loads((out / "profiles.json").read_text())
    before = first_probe["2"]["layer_time_s"] / first_probe["1"]["layer_time_s"]
    after = probe["2"]["layer_time_s"] / probe["1"]["layer_time_s"]
    # 1x against 1x, then 40x against 1x, each from two processes probing in turn: apart by the
    # geometric middle, so that one probe may be 6x off on a loaded host
    assert before < 6 < after, (before, after)
    assert [r["round"] for r in metrics(out)] == [1, 2, 3, 4]
    assert metrics(out)[:3] == records
