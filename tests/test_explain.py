"""The plan in words: each client's cut, what limits it, the bottleneck, and what each re-plan did."""

from __future__ import annotations

from runtime.explain import describe_plan, describe_replan
from tests.test_scheduler import _profile, _scheduler


def test_plan_lines_name_cut_speed_memory_limit_and_bottleneck(random_model):
    server = _profile(layer_time_s=0.02, layer_cpu_s=0.02, head_time_s=0.01, head_cpu_s=0.01, host="s")
    probe = _scheduler(random_model, ["split.policy=resource"], [_profile(host="a")], server)
    # client 2 has room for exactly 2 layers (10% headroom), client 3's layers are 4x slower
    need = lambda k: (
        probe.model.embed_param_bytes
        + k
        * (probe.model.layer_param_bytes + 4 * probe.model.lora_param_bytes + probe.model.activation_bytes)
        + probe.model.payload_bytes
        + probe.model.gradient_bytes
    )
    clients = [
        _profile(host="a"),
        _profile(host="b", memory_available_bytes=int(1.1 * need(2)) + 1),
        _profile(host="c", layer_time_s=0.4, layer_cpu_s=0.4),
    ]
    s = _scheduler(random_model, ["split.policy=adaptive"], clients, server)
    cuts = s.initial()
    lines = describe_plan(s, cuts)
    assert lines[0].startswith(f"plan (adaptive): cuts {cuts}, predicted training ")
    assert f"bound by {s.predict(cuts).bottleneck}" in lines[0]
    assert len(lines) == 4
    assert lines[2].startswith(f"  client 2: cut {cuts[1]} ") and "memory for up to 2 layers" in lines[2]
    assert "4.0x the fastest client" in lines[3]
    if cuts[1] == 2:
        assert "holds at most 2" in lines[2]
    bottleneck = s.predict(cuts).bottleneck
    if bottleneck.startswith("client "):
        assert (
            "[" in lines[int(bottleneck.split()[1])] and "the bottleneck" in lines[int(bottleneck.split()[1])]
        )


def test_replan_lines_say_move_or_keep_and_why(random_model):
    s = _scheduler(
        random_model, ["split.policy=adaptive", "split.replan_every=2", "train.rounds=6"], [_profile()] * 2
    )
    cuts = s.initial()
    assert describe_replan(s, 1, cuts, None) is None  # not a re-plan round
    assert describe_replan(s, 2, cuts, None) == (
        f"re-plan after round 2: keep cuts {cuts} (still the best plan under the measured times)"
    )
    other = [1, 1] if cuts != [1, 1] else [2, 2]
    said = describe_replan(s, 2, cuts, other)
    assert said.startswith(f"re-plan after round 2: move cuts {cuts} -> {other} (predicted training ")
    keep = describe_replan(s, 4, other, None)
    assert keep.startswith(f"re-plan after round 4: keep cuts {other} (best alternative {cuts} predicted ")
    assert describe_replan(s, 6, cuts, None) is None  # the last round: nothing to plan for
    fixed = _scheduler(random_model, ["split.cut_layers=2"], [_profile()] * 2)
    assert describe_replan(fixed, 2, [2, 2], None) is None
