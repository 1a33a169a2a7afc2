"""The round protocol: its typed messages, and whole runs with the ranks as processes of the test on a
``TCPStore(port=0)`` (tests/ranks.py), no torchrun.

The runs are real (RPC, distributed autograd, gloo, the tiny Llama through ``from_pretrained``); they
check what the protocol's phases decide across ranks: the plan or a user error from rank 0 at start,
and a resume that continues exactly where the checkpoint was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.tiny import generate_examples, write_jsonl
from partition.planner import PlanError
from partition.sampling import sample_clients
from runtime.config import load_config
from runtime.faults import EXIT_USER_ERROR
from runtime.messages import (
    CommBytes,
    Divergence,
    RoundStats,
    RunState,
    Settled,
    UserError,
    first_divergence,
)
from tests.random_models import save_random_model
from tests.ranks import run_ranks

REPO = Path(__file__).resolve().parent.parent


def _stats(loss: float = 1.0) -> RoundStats:
    return RoundStats(
        steps=2,
        train_loss=loss,
        train_tokens=10.0,
        input_tokens=12.0,
        train_time_s=1.0,
        step_time_s=0.5,
        compute_s=0.2,
        step_losses=[loss, loss],
        peak_rss_mb=1.0,
        vmdata_mb=1.0,
        stage_param_mb=1.0,
        lora_bytes=64,
    )


def test_the_first_diverged_rank_is_named_and_stops_count_only_without_one():
    settled = [Settled(False), Settled(True), Settled(False, Divergence(3, float("nan"))), Settled(False)]
    rank, d = first_divergence(settled)
    assert (rank, d.step) == (2, 3)
    assert first_divergence([Settled(True), Settled(False)]) is None


def test_a_user_error_is_raised_as_its_own_class_on_every_rank():
    e = UserError.of(PlanError("client 1 has 1 MB"))
    raised = e.exception()
    assert type(raised) is PlanError and str(raised) == "client 1 has 1 MB"


def test_the_recorded_figures_are_the_contract_and_the_scheduler_gets_the_server_time():
    s = _stats(0.7)
    assert set(s.recorded()) == set(RoundStats.RECORDED) and "train_tokens" not in s.recorded()
    m = s.measured(server_s=0.3)
    assert (m.compute_s, m.step_s, m.train_loss, m.server_s) == (0.2, 0.5, 0.7, 0.3)
    comm = CommBytes(activations_up=5, eval_activations_up=7)
    assert comm.contract() == {
        "activations_up": 5,
        "gradients_down": 0,
        "activations_down": 0,
        "gradients_up": 0,
        "adapters_up": 0,
        "adapters_down": 0,
    }


def test_a_run_state_survives_its_json_with_client_keys_and_tuples():
    state = RunState(
        round=3,
        elapsed_s=1.5,
        fingerprint={"seed": 0},
        plan={1: (2, 4), 2: (1, 8)},
        next_plan={1: (3, 4), 2: (1, 8)},
        scheduler={},
        data_positions={1: {"epoch": 0, "pos": 4}, 2: {"epoch": 1, "pos": 0}},
        selection=None,
        client_ranks={2: 4},
        metrics=[{"round": 1}],
    )
    text = json.dumps(state.to_json())
    assert RunState.from_json(json.loads(text)) == state
    assert json.loads(text)["plan"] == {"1": [2, 4], "2": [1, 8]}  # the checkpoint file's format


# ---------------------------------------------------------------------- whole runs, ranks in the test


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("protocol")
    model = save_random_model("llama", root / "model", n_layers=4, hidden=64)
    write_jsonl(generate_examples("sort", 160, 0), root / "train.jsonl")
    write_jsonl(generate_examples("sort", 32, 1), root / "eval.jsonl")
    return {"model": str(model), "train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl")}


def _argv(files: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        str(REPO / "torchrun_configs/tiny_cpu.yaml"),
        f"model.path={files['model']}",
        f"data.train_path={files['train']}",
        f"data.eval_path={files['eval']}",
        f"output_dir={out}",
        "data.min_samples=8",
        "data.max_eval_samples=32",
        "train.eval_batch_size=16",
        "train.local_steps=3",
        "split.cut_layers=[1,2]",
        "runtime.rpc_timeout_s=120",
        *extra,
    ]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _sample_counts(server_log: str) -> dict[int, int]:
    """Each client's training samples, from rank 0's start-up line."""
    (line,) = [x for x in server_log.splitlines() if "training samples" in x]
    counts = json.loads(line[line.rindex("[") : line.rindex("]") + 1])
    return {c: n for c, n in enumerate(counts, start=1)}


def _layer_key(name: str) -> str:
    """A LoRA tensor's name from ``layers.`` on, the same in the PEFT export and the debug copies."""
    return (
        name[name.index("layers.") :].replace(".weight", "").replace(".lora_A", ".A").replace(".lora_B", ".B")
    )


def test_a_sampled_run_trains_the_drawn_clients_and_resumes_exactly(files, tmp_path):
    """Two clients, one drawn per round. Each round records the drawn client only; after the last round
    the global adapter is that client's trained copy (fedavg of one). Then two rounds and a relaunch to
    three against three in one go: the same draws, losses and adapter. The resume goes through every
    typed message: the run state, the plan decision, each client's data position."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    # a seed whose uniform draws (which need only the client ids) take both clients in three rounds
    seed = next(
        x for x in range(100) if len({tuple(sample_clients(x, r, {1: 1, 2: 1}, 1)) for r in (1, 2, 3)}) == 2
    )
    sampled = ["train.clients_per_round=1", "train.rounds=3", f"seed={seed}"]
    first = run_ranks(3, _argv(files, whole, *sampled, "runtime.debug=true"), tmp_path / "logs-whole")
    assert first.codes == [0, 0, 0], first.log[-6000:]
    counts = _sample_counts(first.logs[0])
    a = _metrics(whole)
    drawn = [sample_clients(seed, r, counts, 1) for r in (1, 2, 3)]
    assert [r["participants"] for r in a] == drawn and len({tuple(d) for d in drawn}) == 2
    for rec, (p,) in zip(a, drawn):
        other = 3 - p
        assert list(rec["clients"]) == [str(p)] and rec["clients"][str(p)]["weight"] == 1.0
        assert rec["train_loss"] == pytest.approx(rec["clients"][str(p)]["train_loss"])
        assert rec["comm_bytes"][str(other)]["activations_up"] == 0  # it sat out: no step, no upload
        assert rec["comm_bytes"][str(other)]["adapters_up"] == 0
    (p,) = drawn[-1]
    copies = {}
    for name in (f"client{p}", f"server_for{p}"):
        copies.update(
            {
                _layer_key(k): v
                for k, v in load_file(str(whole / "debug/round3" / f"{name}.safetensors")).items()
            }
        )
    exported = {
        _layer_key(k): v for k, v in load_file(str(whole / "adapter/adapter_model.safetensors")).items()
    }
    same_shape = [k for k, v in copies.items() if exported[k].shape == v.shape]
    assert len(same_shape) > len(copies) // 2  # all but the cut layer's reduced-rank modules
    assert all(torch.equal(exported[k], copies[k]) for k in same_shape)

    part = run_ranks(
        3,
        _argv(files, split, "train.clients_per_round=1", "train.rounds=2", f"seed={seed}"),
        tmp_path / "logs-part",
    )
    assert part.codes == [0, 0, 0], part.log[-6000:]
    rest = run_ranks(3, _argv(files, split, *sampled), tmp_path / "logs-rest")
    assert rest.codes == [0, 0, 0], rest.log[-6000:]
    assert "resuming after round 2" in rest.logs[0]
    b = _metrics(split)
    assert [r["round"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["participants"] == rb["participants"]
        assert ra["eval_loss"] == rb["eval_loss"]
        for c in ra["clients"]:
            assert ra["clients"][c]["step_losses"] == rb["clients"][c]["step_losses"]
        assert ra["comm_bytes"] == rb["comm_bytes"]
    wa = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(split / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_sampled_run_refuses_more_clients_than_it_has(files, tmp_path):
    res = run_ranks(
        3, _argv(files, tmp_path / "k", "train.clients_per_round=3"), tmp_path / "logs-k", timeout_s=120
    )
    assert res.codes == [EXIT_USER_ERROR] * 3, res.log[-4000:]
    assert "train.clients_per_round=3 but the run has 2 clients: use at most 2" in res.log


@pytest.mark.parametrize("rule", ["fedavg", "stack"])
def test_adaptive_cuts_follow_each_client_measured_when_clients_share_workers(files, tmp_path, rule):
    """Four clients on two workers, two a round, under ``split.policy=adaptive``, the server 3x slow and
    client 4 12x slow (never shown to the scheduler). Every client starts at cut 2 (a given start: a
    plan from the two workers' probes would depend on how loaded the host was while each probed); the
    re-plan after the first round, which trains clients 3 and 4, gives client 4 fewer layers than it
    had and the fewest of all; client 4 keeps its new cut through the rounds it sits out and trains at
    it when next drawn; the checkpoint's scheduler state remembers it as the slowest. Under stack each
    client's blocks follow its new cut."""
    fed = [
        "split.clients=4",
        "split.policy=adaptive",
        "split.cut_layers=[2,2,2,2]",
        "split.replan_every=1",
        "train.clients_per_round=2",
        "train.rounds=4",
        "simulate.slowdown=[1,1,1,12]",
        "simulate.server_slowdown=3",
        "seed=1",  # draws client 4 in rounds 1 and 4 (round 1: clients 3 and 4)
        f"train.aggregation={rule}",
    ]
    out = tmp_path / "adaptive"
    res = run_ranks(
        3, [a for a in _argv(files, out, *fed) if a != "split.cut_layers=[1,2]"], tmp_path / "logs"
    )
    assert res.codes == [0, 0, 0], res.log[-6000:]
    records = _metrics(out)
    assert [4 in r["participants"] for r in records] == [True, False, False, True]
    first = records[0]
    assert first["cut_layers"] == {"3": 2, "4": 2}
    moved = first["plan"]["next_cut_layers"]
    assert moved["4"] < 2 and moved["4"] == min(moved.values())
    assert first["plan"]["replan"]["rule"] == "speed" and "client 4 cut" in first["plan"]["replan"]["detail"]
    assert records[3]["cut_layers"]["4"] == moved["4"]  # kept while it sat out, trained at it
    times = records[-1]["plan"]["replan"]["client_layer_time_s"]
    assert times[3] == max(times) and times[3] > 2 * min(times)
    assert "re-plan after round 1: move cuts" in res.logs[0]


def test_a_plan_that_cannot_fit_is_decided_by_rank_0_and_raised_on_every_rank(files, tmp_path):
    out = tmp_path / "mem"
    res = run_ranks(
        3, _argv(files, out, "split.policy=resource", "split.memory_headroom=1000000.0"), tmp_path / "logs"
    )
    assert res.codes == [EXIT_USER_ERROR] * 3, res.log[-6000:]
    said = [line for text in res.logs for line in text.splitlines() if "plan error" in line]
    assert len(said) == 1 and "client 1 has" in said[0] and "one layer needs" in said[0]
    assert not (out / "metrics.jsonl").exists()


def test_the_federation_is_the_same_on_one_two_or_four_workers(files, tmp_path):
    """Four clients (cuts 1, 2, 3, 2), three drawn a round, on four workers (one each), on two and on
    one (each worker trains its clients one after another, re-cut to each client's cut): the same
    draws, the same step losses, eval losses and adapter within 1e-5 (the all-reduce sums in another
    grouping). The two-worker run is also stopped after round 2 and resumed: each client's data
    position comes back from the checkpoint."""
    fed = [
        "split.clients=4",
        "split.cut_layers=[1,2,3,2]",
        "train.clients_per_round=3",
        "train.local_steps=2",
    ]
    runs = {}
    for m, rounds in ((4, [3]), (1, [3]), (2, [2, 3])):
        out = tmp_path / f"m{m}"
        for n in rounds:
            res = run_ranks(m + 1, _argv(files, out, *fed, f"train.rounds={n}"), tmp_path / f"logs-m{m}-{n}")
            assert res.codes == [0] * (m + 1), res.log[-6000:]
        if m < 4:
            assert "trains clients" in res.logs[0]  # rank 0 says which worker trains which clients
        runs[m] = _metrics(out), load_file(str(out / "adapter" / "adapter_model.safetensors"))
    (ref, ref_adapter) = runs[4]
    assert [r["round"] for r in runs[2][0]] == [1, 2, 3]
    for m in (1, 2):
        records, adapter = runs[m]
        assert len({c for r in records for c in r["workers"].values()}) == m  # every worker trained
        for a, b in zip(ref, records):
            assert a["participants"] == b["participants"] and len(a["participants"]) == 3
            assert a["cut_layers"] == b["cut_layers"]
            assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5
            for c in a["participants"]:
                sa, sb = a["clients"][str(c)]["step_losses"], b["clients"][str(c)]["step_losses"]
                assert max(abs(x - y) for x, y in zip(sa, sb)) < 1e-5
                assert a["comm_bytes"][str(c)]["activations_up"] == b["comm_bytes"][str(c)]["activations_up"]
        assert adapter.keys() == ref_adapter.keys()
        for k in adapter:
            torch.testing.assert_close(adapter[k], ref_adapter[k], atol=1e-5, rtol=0)


def test_a_worker_that_runs_out_takes_the_clients_queued_behind_a_slow_one(files, tmp_path):
    """split.assignment=dynamic, 4 clients on 2 workers, all 4 a round, client 2 forty times slower than
    the rest (a simulated slowdown the planner does not read): in round 1 nothing is measured, so the
    lists are balanced on the cost model alone and client 2 holds up a client queued behind it; the
    other worker takes that one (the log says so). The federation is still the one-worker-per-client
    run's: eval losses and adapter within 1e-5."""
    fed = ["split.clients=4", "split.cut_layers=[1,2,3,2]", "train.local_steps=2", "train.rounds=2"]
    ref_out, out = tmp_path / "m4", tmp_path / "dynamic"
    res = run_ranks(5, _argv(files, ref_out, *fed), tmp_path / "logs-m4")
    assert res.codes == [0] * 5, res.log[-6000:]
    slow = ["split.assignment=dynamic", "simulate.slowdown=[1,40,1,1]"]
    res = run_ranks(3, _argv(files, out, *fed, *slow), tmp_path / "logs-dynamic")
    assert res.codes == [0] * 3, res.log[-6000:]
    took = [line for line in res.logs[0].splitlines() if "takes client" in line]
    assert took, res.logs[0][-4000:]
    first = _metrics(out)[0]
    w2 = first["workers"]["2"]
    assert [c for c, w in first["workers"].items() if w == w2] == ["2"]  # client 2's worker trained it alone
    for a, b in zip(_metrics(ref_out), _metrics(out)):
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5
    ref_adapter = load_file(str(ref_out / "adapter" / "adapter_model.safetensors"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in adapter:
        torch.testing.assert_close(adapter[k], ref_adapter[k], atol=1e-5, rtol=0)


def test_clients_sharing_workers_are_planned_by_resource_with_a_drawn_slowdown(files, tmp_path):
    """Five clients on two workers, three a round, under ``split.policy=resource`` and a seeded lognormal
    slowdown: rank 0 plans the two workers' probes and gives every client its worker's cut (clients 1, 3
    and 5 on worker 1, clients 2 and 4 on worker 2); the drawn slowdowns are the ones every rank draws
    from the seed and are saved in run_config.json; each drawn client trains at its planned cut."""
    out = tmp_path / "resource"
    fed = [
        "split.clients=5",
        "split.policy=resource",
        "train.clients_per_round=3",
        "train.local_steps=2",
        "train.rounds=2",
        "simulate.slowdown={lognormal: 0.7}",
    ]
    res = run_ranks(3, _argv(files, out, *fed), tmp_path / "logs")
    assert res.codes == [0, 0, 0], res.log[-6000:]
    saved = json.loads((out / "run_config.json").read_text())
    expected = load_config(None, ["simulate.slowdown={lognormal: 0.7}"]).simulate.drawn(5, 0).slowdown
    assert saved["simulate"]["slowdown"] == expected and min(expected) == 1.0 and len(set(expected)) == 5
    (line,) = [x for x in res.logs[0].splitlines() if "plan (resource): cuts [" in x]
    planned = json.loads(line[line.index("cuts [") + 5 : line.index("]", line.index("cuts [")) + 1])
    cuts = dict(enumerate(planned, start=1))
    assert len(cuts) == 5 and cuts[1] == cuts[3] == cuts[5] and cuts[2] == cuts[4]
    assert all(1 <= k <= 3 for k in cuts.values())
    for rec in _metrics(out):
        assert len(rec["participants"]) == 3
        assert {int(c): k for c, k in rec["cut_layers"].items()} == {c: cuts[c] for c in rec["participants"]}
