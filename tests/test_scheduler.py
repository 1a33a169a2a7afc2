"""The scheduler's glue: measured profiles and the model -> planner figures; forced and adaptive moves."""

from __future__ import annotations

import math

import pytest
import torch

from models.lora import build_layout
from models.stages import build_stage, load_config, stage_parameter_bytes
from models.wire import encode
from partition.planner import Measured, PlanError, memory_need
from runtime.client import nbytes, server_payload
from runtime.config import load_config as load_run_config
from runtime.job import lora_spec
from runtime.probe import ResourceProfile
from runtime.scheduler import ACTIVATION_FACTOR, Scheduler, client_costs, model_costs


def _profile(**kw) -> ResourceProfile:
    base = dict(
        host="h",
        physical_cores=2,
        logical_cores=2,
        usable_cores=2,
        cpu_freq_mhz=2000.0,
        memory_total_bytes=8 << 30,
        memory_available_bytes=4 << 30,
        load_avg=(0.0, 0.0, 0.0),
        cuda=None,
        layer_time_s=0.1,
        layer_cpu_s=0.1,
        activation_bytes=1 << 20,
    )
    return ResourceProfile(**{**base, **kw})


def test_model_costs_match_what_the_stages_hold_and_send(random_model):
    path = random_model("llama", n_layers=4, hidden=32)
    cfg = load_run_config(None, ["train.batch_size=3", "train.local_steps=7"])
    mcfg = load_config(path)
    layout = build_layout(mcfg, lora_spec(cfg, mcfg), [])
    costs = model_costs(mcfg, cfg, layout, seq=11, activation_bytes=1000.0)
    assert costs.layer_param_bytes == stage_parameter_bytes(build_stage(path, 1, 2))
    assert costs.n_layers == 4 and costs.steps == 7
    assert costs.activation_bytes == 1000.0 * ACTIVATION_FACTOR
    # fedavg all-reduces the adapter plus one weight per component; stack/svd one block per client chain
    assert costs.adapter_bytes == (layout.numel + sum(s.rank for s in layout.slots)) * 4
    for rule in ("stack", "svd"):
        cfg.train.aggregation = rule
        assert model_costs(mcfg, cfg, layout, 11, 1000.0, n_clients=3).adapter_bytes == 3 * layout.numel * 4
    cfg.train.aggregation = "fedavg"
    hidden = torch.zeros(3, 11, 32)
    batch = {
        "attention_mask": torch.ones(3, 11, dtype=torch.long),
        "labels": torch.zeros(3, 11, dtype=torch.long),
    }
    batch["attention_mask"][0, -1] = 0  # with padding the mask travels too: the bound the planner uses
    assert costs.payload_bytes == sum(nbytes(t) for t in server_payload(batch, hidden))
    assert costs.gradient_bytes == nbytes(hidden)
    # the wire's dtype: int8 values and a float32 scale per token, hidden states only
    cfg.wire.dtype = "int8"
    int8 = model_costs(mcfg, cfg, layout, seq=11, activation_bytes=1000.0)
    assert int8.gradient_bytes == nbytes(encode(hidden, "int8")) == 3 * 11 * (32 + 4)
    # U-shaped: no targets; hidden states up and back down, a gradient each way, the head on the client
    cfg.wire.dtype, cfg.split.mode, cfg.split.tail_layers = "auto", "u_shape", 1
    u = model_costs(mcfg, cfg, layout, seq=11, activation_bytes=1000.0)
    sent = server_payload(batch, hidden, u_shape=True)
    assert u.payload_bytes == sum(nbytes(t) for t in sent) + nbytes(hidden)
    assert u.gradient_bytes == 2 * nbytes(hidden)
    assert u.n_layers == 3 and u.tail_layers == 1 and u.head_on_client and u.head_param_bytes > 0


def test_a_gpu_client_is_limited_by_gpu_memory_and_loads_no_host_cores():
    gpu = _profile(cuda={"free_bytes": 2 << 30, "total_bytes": 16 << 30}, layer_cpu_s=0.05)
    c = client_costs(gpu)
    assert c.memory_bytes == 2 << 30 and c.layer_cpu_s == 0.0
    cpu = client_costs(_profile(bandwidth_Bps=math.inf))
    assert cpu.memory_bytes == 4 << 30 and cpu.layer_cpu_s == 0.1


def _scheduler(random_model, overrides, clients, server=None):
    path = random_model("llama", n_layers=4, hidden=32)
    cfg = load_run_config(None, overrides)
    mcfg = load_config(path)
    costs = model_costs(mcfg, cfg, build_layout(mcfg, lora_spec(cfg, mcfg), []), 16, 1 << 20)
    server = server or _profile(head_time_s=0.01, head_cpu_s=0.01)
    return Scheduler(cfg, costs, clients, server, 1)


def test_schedule_forces_moves_at_its_rounds_and_is_checked_against_memory(random_model):
    s = _scheduler(random_model, ["split.cut_layers=[1,2]", "split.schedule={2: [3, 1]}"], [_profile()] * 2)
    assert s.initial() == [1, 2]
    stats = [Measured(compute_s=0.1, step_s=0.3, train_time_s=3.0, train_loss=1.0)] * 2
    assert s.after_round(1, [1, 2], stats, 1.0) is None
    assert s.after_round(2, [1, 2], stats, 0.9) == [3, 1]
    assert s.predict([3, 1]).round_time_s > 0
    tight = _profile(memory_available_bytes=int(s.model.embed_param_bytes + 2.5 * s.model.activation_bytes))
    with pytest.raises(PlanError, match="client 1"):
        _scheduler(
            random_model, ["split.cut_layers=[1,2]", "split.schedule={2: [3, 1]}"], [tight, _profile()]
        ).initial()


def test_adaptive_gives_a_client_that_turned_slow_fewer_layers(random_model):
    slow_server = _profile(layer_time_s=0.5, layer_cpu_s=0.5, head_time_s=0.01, head_cpu_s=0.01, host="s")
    clients = [_profile(host="a"), _profile(host="b")]
    s = _scheduler(random_model, ["split.policy=adaptive", "split.replan_every=1"], clients, slow_server)
    cuts = s.initial()
    assert cuts == [3, 3]  # clients faster than the server take every layer they can
    # The server's own time for a client at cut 3 is its last layer and head: 0.51 s a step.
    fast = Measured(compute_s=0.3, server_s=0.51, step_s=0.85, train_time_s=5.0, train_loss=1.0)
    slow = Measured(compute_s=9.0, server_s=0.51, step_s=9.6, train_time_s=50.0, train_loss=1.0)
    new = None
    for rnd in range(1, 4):
        new = s.after_round(rnd, cuts, [fast, slow], 1.0 - 0.1 * rnd) or new
    assert new is not None and new[1] < cuts[1] and new[0] == 3
    assert s.state_dict()["client_layer_time_s"][1] > s.state_dict()["client_layer_time_s"][0]


def test_clients_sharing_workers_are_planned_each_for_its_own_time(random_model):
    """Six clients on two workers under ``resource``: two train at a time, so the slow server is shared by
    two, not six; clients with their worker's probe get their worker's cut, the faster the deeper; a
    client whose memory holds fewer layers gets fewer instead of failing the plan."""
    slow_server = _profile(layer_time_s=0.05, layer_cpu_s=0.05, head_time_s=0.01, head_cpu_s=0.01, host="s")
    fast, slow = _profile(layer_time_s=0.02, layer_cpu_s=0.02, host="a"), _profile(host="b")
    probes = [fast, slow] * 3  # client c on worker (c - 1) % 2 + 1
    path = random_model("llama", n_layers=4, hidden=32)
    cfg = load_run_config(None, ["split.policy=resource"])
    mcfg = load_config(path)
    costs = model_costs(mcfg, cfg, build_layout(mcfg, lora_spec(cfg, mcfg), []), 16, 1 << 20)
    shared = Scheduler(cfg, costs, probes, slow_server, 1, workers=2)
    cuts = shared.initial()
    assert shared.slots == 2 and cuts[::2] == [cuts[0]] * 3 and cuts[1::2] == [cuts[1]] * 3
    assert cuts[0] > cuts[1]  # the fast client keeps more layers
    assert Scheduler(cfg, costs, probes, slow_server, 1).initial() != cuts  # six at a time plan otherwise
    pred = shared.predict(cuts)
    assert pred.round_time_s == pytest.approx(sum(pred.client_time_s) / 6 * 6 / 2)  # 6 a round, 2 at a time
    held = int(memory_need(costs, cuts[0] - 1) * 1.1 + 1)  # cut k - 1 with the default headroom, not k
    tight = _profile(layer_time_s=0.02, layer_cpu_s=0.02, host="a", memory_available_bytes=held)
    limited = Scheduler(cfg, costs, [fast, slow, tight, slow], slow_server, 1, workers=2).initial()
    assert limited[2] == cuts[0] - 1 and limited[0] == cuts[0]
