"""More clients than workers (``split.clients`` > WORLD_SIZE - 1): a worker trains its clients one after
another, re-cut to each client's cut and ranks.

Under a real torchrun: a worker killed mid-round under ``--max-restarts`` with client sampling on, and
the restarted job ends where an uninterrupted one does. With the ranks as processes of the test
(tests/ranks.py): per-client LoRA ranks, forced moves, HSplitLoRA's importance selection and the
U-shaped split give the same federation on two workers as on four.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.checkpoint import merged_weights
from runtime.config import load_config, validate_for_world
from runtime.faults import EXIT_USER_ERROR
from runtime.simulate import client_memory_message, is_out_of_memory, limit_shortfall
from tests.ranks import run_ranks
from tests.test_distributed import common_args, metrics, setup  # noqa: F401  (setup is a fixture)
from tests.test_protocol import REPO, _argv, _metrics, files  # noqa: F401  (files is a fixture)
from tests.test_recovery import launch

# 4 clients cut at 1, 2, 3, 2, 3 drawn a round, on 2 workers (torchrun --nproc_per_node=3)
FEDERATION = [
    "split.clients=4",
    "split.cut_layers=[1,2,3,2]",
    "train.clients_per_round=3",
    "train.rounds=3",
    "train.local_steps=3",
    "runtime.peer_timeout_s=20",
]


def test_per_client_ranks_and_auto_ranks_run_on_shared_workers():
    """8 clients on 4 workers: a list of 8 ranks is accepted, and so is ``auto`` (each client's rank from
    the memory of the worker whose probe it is planned on)."""
    base = ["split.clients=8", "split.cut_layers=2"]
    cfg = load_config("torchrun_configs/tiny_cpu.yaml", [*base, "lora.client_ranks=[8,4,2,4,8,4,2,4]"])
    assert validate_for_world(cfg, 5, 4) == [2] * 8
    cfg = load_config("torchrun_configs/tiny_cpu.yaml", [*base, "lora.client_ranks=auto"])
    assert validate_for_world(cfg, 5, 4) == [2] * 8


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_model(out_a: Path, out_b: Path, rule: str) -> dict[str, torch.Tensor]:
    """The two runs' models agree within 1e-5: the adapter, or under stack the merged weights of round
    3's checkpoint (what ``launch.export --merged`` writes). Returns the first run's."""
    if rule == "stack":
        wa, wb = merged_weights(out_a / "checkpoint", 3), merged_weights(out_b / "checkpoint", 3)
    else:
        wa, wb = _adapter(out_a), _adapter(out_b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
    return wa


def test_a_worker_killed_with_sampling_on_is_restarted_and_ends_equal(setup, tmp_path):
    """Worker 1 is killed after its first step of round 2 (SPLITFT_FAULT, first attempt only);
    torchrun --max-restarts=1 starts every rank again, which resume after round 1: each client's data
    position and measured time come back from the checkpoint, and so does the move split.schedule
    decided at the end of round 1 (every client's cut changes; round 2's clients move from their old
    cuts). Each round draws the same clients, and the eval losses and the adapter are the uninterrupted
    run's: exactly where the same workers trained the same clients up to that round; otherwise the eval
    losses within 1e-6 and the adapter within 1e-5
    (which worker trains which client follows the measured times, so the float32 all-reduce may add the
    same copies in another grouping; seen: 8e-8 and 2.2e-6)."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    fed = [*FEDERATION, "split.schedule={1: [2, 3, 1, 3]}"]
    code, log = launch([*common_args(setup, ref), *fed])
    assert code == 0, log[-6000:]
    code, log = launch([*common_args(setup, out), *fed], restarts=1, fault="step@1:2:1")
    assert code == 0, log[-6000:]
    assert "SPLITFT_FAULT: killing rank 1 at step, round 2" in log
    assert "resuming after round 1 " in log

    ours, theirs = metrics(out), metrics(ref)
    assert [r["round"] for r in ours] == [r["round"] for r in theirs] == [1, 2, 3]
    assert [r["cut_layers"] for r in ours] == [r["cut_layers"] for r in theirs]
    moved = {"1": 2, "2": 3, "3": 1, "4": 3}  # the scheduled cuts, for round 2's clients
    assert ours[1]["cut_layers"] == {str(c): moved[str(c)] for c in ours[1]["participants"]}
    same_grouping = True  # so far: every round's clients on the same workers as in the reference
    for a, b in zip(ours, theirs):
        assert a["participants"] == b["participants"] and len(a["participants"]) == 3
        assert set(a["workers"].values()) == {1, 2}  # both workers trained clients in every round
        same_grouping = same_grouping and a["workers"] == b["workers"]
        tolerance = 0.0 if same_grouping else 1e-6
        assert abs(a["eval_loss"] - b["eval_loss"]) <= tolerance, (a["round"], a["eval_loss"], b["eval_loss"])
    assert len({c for r in ours for c in r["participants"]}) > 3  # sampling drew different clients
    mine, reference = _adapter(out), _adapter(ref)
    assert mine.keys() == reference.keys() and mine
    for key in mine:
        torch.testing.assert_close(mine[key], reference[key], atol=0.0 if same_grouping else 1e-5, rtol=0)


@pytest.mark.parametrize("rule", ["fedavg", "stack", "svd"])
def test_per_client_ranks_give_the_same_federation_on_two_workers_as_on_four(files, tmp_path, rule):  # noqa: F811
    """Four clients with their own LoRA ranks 8, 4, 2, 4 (lora.client_ranks) and cuts 1, 2, 3, 2, three
    drawn a round, on four workers (one each) and on two (each re-cut to every client's cut and rank):
    each client trains at its own rank (the same LoRA bytes), and the eval losses and the model (the
    adapter; under stack the merged weights) are the same within 1e-5."""
    fed = [
        "split.clients=4",
        "split.cut_layers=[1,2,3,2]",
        "lora.client_ranks=[8,4,2,4]",
        "train.clients_per_round=3",
        "train.local_steps=2",
        "train.rounds=3",
        f"train.aggregation={rule}",
    ]
    runs = {}
    for m in (4, 2):
        out = tmp_path / f"m{m}"
        res = run_ranks(m + 1, _argv(files, out, *fed), tmp_path / f"logs-m{m}")
        assert res.codes == [0] * (m + 1), res.log[-6000:]
        runs[m] = _metrics(out), out
    (four, out4), (two, out2) = runs[4], runs[2]
    assert len({c for r in two for c in r["workers"].values()}) == 2
    held = {}
    for a, b in zip(four, two):
        assert a["participants"] == b["participants"] and len(a["participants"]) == 3
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5, (a["round"], a["eval_loss"], b["eval_loss"])
        for c in a["participants"]:
            assert a["clients"][str(c)]["lora_bytes"] == b["clients"][str(c)]["lora_bytes"]
            held[c] = b["clients"][str(c)]["lora_bytes"]
    assert len(set(held.values())) > 1  # the clients' stages really hold different ranks
    _assert_same_model(out4, out2, rule)


@pytest.mark.parametrize("rule", ["fedavg", "stack"])
def test_forced_moves_give_the_same_federation_on_two_workers_as_on_four(files, tmp_path, rule):  # noqa: F811
    """split.schedule moves every client after rounds 1 and 2 (up and down, through the reduced rank at
    the cut), 3 of 4 clients drawn a round: on four workers each stage moves at once; on two a worker
    moves a client from its old cut when it next trains it. Participants, cuts, eval losses and the model
    are the same within 1e-5. (A restart with a move pending: the kill test above.)"""
    fed = [
        "split.clients=4",
        "split.cut_layers=[1,2,3,2]",
        "split.schedule={1: [3, 1, 2, 3], 2: [2, 3, 1, 1]}",
        "train.clients_per_round=3",
        "train.local_steps=2",
        f"train.aggregation={rule}",
    ]
    runs = {}
    for m in (4, 2):
        out = tmp_path / f"m{m}"
        res = run_ranks(m + 1, _argv(files, out, *fed, "train.rounds=3"), tmp_path / f"logs-m{m}")
        assert res.codes == [0] * (m + 1), res.log[-6000:]
        runs[m] = _metrics(out), out
    (four, out4), (two, out2) = runs[4], runs[2]
    schedule = {2: [3, 1, 2, 3], 3: [2, 3, 1, 1]}  # every client's cut changes after rounds 1 and 2
    for a, b in zip(four, two):
        assert a["participants"] == b["participants"] and a["cut_layers"] == b["cut_layers"]
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5, (a["round"], a["eval_loss"], b["eval_loss"])
        if a["round"] in schedule:  # so every client of rounds 2 and 3 trains its first round at a new cut
            assert a["cut_layers"] == {str(c): schedule[a["round"]][c - 1] for c in a["participants"]}
    _assert_same_model(out4, out2, rule)


def _selection(out: Path, rnd: int) -> dict:
    """The importance selection in round ``rnd``'s checkpoint (what a resumed run replays)."""
    state = json.loads((out / "checkpoint" / f"round-{rnd:06d}" / "state.json").read_text())
    return state["selection"]


@pytest.mark.parametrize("rule", ["fedavg", "stack"])
def test_importance_selection_gives_the_same_federation_on_two_workers_as_on_four(files, tmp_path, rule):  # noqa: F811
    """HSplitLoRA's importance selection with four clients cut at 1, 2, 3, 2, three drawn a round: the
    warm-up's clients are round 0's draw, on four workers each on its own, on two one after another
    (re-cut to each client's cut). The selection (every weight's rank; its score within 1e-9 of the
    largest) is the same, in the metrics and in the checkpoint; then every client trains the chosen
    weights at its own cut (the same LoRA bytes, which differ between cuts), and each round's clients,
    eval losses (within 1e-5) and the model (the adapter; under stack the merged weights; within 1e-5)
    are the same. The two-worker run is stopped after round 2 and resumed: the selection comes back from
    the checkpoint, the warm-up is not redone."""
    fed = [
        "split.clients=4",
        "split.cut_layers=[1,2,3,2]",
        "train.clients_per_round=3",
        "train.local_steps=2",
        "lora.selection=importance",
        "lora.warmup_steps=3",
        f"train.aggregation={rule}",
    ]
    runs, logs = {}, {}
    for m, rounds in ((4, [3]), (2, [2, 3])):
        out = tmp_path / f"m{m}"
        for n in rounds:
            res = run_ranks(m + 1, _argv(files, out, *fed, f"train.rounds={n}"), tmp_path / f"logs-m{m}-{n}")
            assert res.codes == [0] * (m + 1), res.log[-6000:]
            logs[m, n] = res.logs[0]
        runs[m] = _metrics(out), out
    (four, out4), (two, out2) = runs[4], runs[2]
    (warmup,) = [x for x in logs[2, 2].splitlines() if "importance warm-up" in x]
    start = warmup.index("clients [") + 8
    drawn = json.loads(warmup[start : warmup.index("]", start) + 1])
    assert len(drawn) == 3 and f"of clients {drawn} " in logs[4, 3]  # round 0's draw, on any M
    said = [x for x in logs[2, 2].splitlines() if "round 0: worker" in x]
    assert len(said) == 1 and "worker 1 trains clients" in said[0] and "worker 2 trains clients" in said[0]
    assert "importance warm-up" not in logs[2, 3] and "resuming after round 2 " in logs[2, 3]

    chosen4, chosen2 = four[0]["lora_selection"], two[0]["lora_selection"]
    assert chosen4 == chosen2 and 0 < chosen4["trainable_params"] <= chosen4["budget_params"]
    assert len(set(chosen4["ranks"].values())) > 1  # weights at different ranks
    sel4, sel2 = _selection(out4, 3), _selection(out2, 3)
    assert sel4["ranks"] == sel2["ranks"] and sel4["scores"].keys() == sel2["scores"].keys()
    top = max(sel4["scores"].values())
    assert top > 0
    for name, score in sel4["scores"].items():
        assert abs(score - sel2["scores"][name]) <= 1e-9 * top, (name, score, sel2["scores"][name])

    assert [r["round"] for r in two] == [1, 2, 3]
    assert len({c for r in two for c in r["workers"].values()}) == 2
    held = {}
    for a, b in zip(four, two):
        assert a["participants"] == b["participants"] and len(a["participants"]) == 3
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5, (a["round"], a["eval_loss"], b["eval_loss"])
        for c in a["participants"]:
            assert a["clients"][str(c)]["lora_bytes"] == b["clients"][str(c)]["lora_bytes"]
            held[c] = b["clients"][str(c)]["lora_bytes"]
    assert len(set(held.values())) > 1  # the clients' stages hold the chosen weights of their own cuts
    _assert_same_model(out4, out2, rule)


@pytest.mark.parametrize(
    "rule, ranks",
    [("stack", None), ("fedavg", "lora.client_ranks=[8,4,2,4]")],  # svd shares stack's per-chain blocks
)
def test_u_shape_gives_the_same_federation_on_two_workers_as_on_four(files, tmp_path, rule, ranks):  # noqa: F811
    """U-shaped (each client keeps the top layer, the norm and the head): four clients cut at 1, 2, 1, 2,
    three drawn a round, on four workers (one each) and on two (each worker's stage re-cut, and its tail
    given the global adapter at the client's own rank, for every client it trains): the same draws, eval
    losses and model (the adapter; under stack the merged weights, the tail's among them) within 1e-5.
    Dealt round-robin, so that a worker trains clients of both cuts in one round (the first). The
    two-worker run is stopped after round 2 and resumed (under stack its workers take the merged
    weights of every layer they hold from the server)."""
    cuts = [1, 2, 1, 2]
    fed = [
        "split.mode=u_shape",
        "split.tail_layers=1",
        "split.clients=4",
        f"split.cut_layers={cuts}".replace(" ", ""),
        "split.assignment=round_robin",
        "train.clients_per_round=3",
        "train.local_steps=2",
        f"train.aggregation={rule}",
        *([ranks] if ranks else []),
    ]
    runs = {}
    for m, rounds in ((4, [3]), (2, [2, 3])):
        out = tmp_path / f"m{m}"
        for n in rounds:
            res = run_ranks(m + 1, _argv(files, out, *fed, f"train.rounds={n}"), tmp_path / f"logs-m{m}-{n}")
            assert res.codes == [0] * (m + 1), res.log[-6000:]
        runs[m] = _metrics(out), out
    (four, out4), (two, out2) = runs[4], runs[2]
    assert [r["round"] for r in four] == [r["round"] for r in two] == [1, 2, 3]
    mixed = [
        {cuts[int(c) - 1] for c, w in r["workers"].items() if w == worker}
        for r in two
        for worker in set(r["workers"].values())
    ]
    assert {1, 2} in mixed  # a worker went from a client cut at 1 to one cut at 2 within a round
    for a, b in zip(four, two):
        assert a["participants"] == b["participants"] and len(a["participants"]) == 3
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5, (a["round"], a["eval_loss"], b["eval_loss"])
        for c in a["participants"]:
            assert a["clients"][str(c)]["lora_bytes"] == b["clients"][str(c)]["lora_bytes"]
    wa = _assert_same_model(out4, out2, rule)
    assert any("layers.3." in k for k in wa)  # the clients' tail layer is part of the model compared


# ---------------------------------------------------------------------- per-client memory limits


def test_a_limit_fits_only_above_what_the_worker_uses_and_out_of_memory_is_recognised():
    gib = 2**30
    assert limit_shortfall(2.0, int(1.5 * gib)) is None
    assert "already uses 2.00 GiB, at or above the limit of 2 GiB" in limit_shortfall(2.0, 2 * gib)
    message = client_memory_message(3, 2, 0.25, "why")
    assert message.startswith("client 3 (cut at layer 2) does not fit its simulated memory")
    assert "gives it 0.25 GiB" in message and "raise client 3's simulate.memory_limit_gb" in message
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("x"))


LIMIT_SCRIPT = """
import json, resource, torch
from runtime.simulate import MemoryLimit, MemoryShortfall, vmdata_bytes
own = resource.getrlimit(resource.RLIMIT_DATA)
limit = MemoryLimit("cpu")
used = vmdata_bytes() / 2**30
limit.lower_to(used + 0.5)
lowered = resource.getrlimit(resource.RLIMIT_DATA)
torch.ones(256, 256) @ torch.ones(256, 256)  # still runs under the limit
limit.restore()
restored = resource.getrlimit(resource.RLIMIT_DATA)
limit.lower_to(used + 0.25)  # lower again after a restore: another client's limit
again = resource.getrlimit(resource.RLIMIT_DATA)
limit.restore()
try:
    limit.lower_to(used / 2)
    error = None
except MemoryShortfall as e:
    error = str(e)
print(json.dumps({"own": own, "lowered": lowered, "restored": restored, "again": again, "used": used,
                  "error": error, "after_error": resource.getrlimit(resource.RLIMIT_DATA)}))
"""


def test_a_worker_lowers_its_limit_to_each_clients_and_restores_its_own():
    """In a process of its own (RLIMIT_DATA is the process's): the soft limit goes down to a client's
    limit and back to the worker's own, and down again for the next client; a limit below what the
    process uses is refused and leaves the worker's own in force."""
    proc = subprocess.run(
        [sys.executable, "-c", LIMIT_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 2**30
    assert r["lowered"] == [int((r["used"] + 0.5) * gib), r["own"][1]]
    assert r["again"] == [int((r["used"] + 0.25) * gib), r["own"][1]]
    assert r["restored"] == r["own"] == r["after_error"]
    assert "at or above the limit" in r["error"]


def test_each_client_trains_under_its_own_memory_limit_and_one_that_does_not_fit_is_named(files, tmp_path):
    """Four clients on two workers, three a round (seed 0 draws clients 1, 2, 4 then 2, 3, 4), with
    memory limits of 3, 2.5, 0.25 and 2 GiB: round 1 trains, each client under its own limit (a worker
    uses about 0.7 GiB); in round 2 client 3's limit is below what its worker uses, and every rank stops
    with one line naming client 3, its cut and its limit (exit code 2); round 1's checkpoint is kept.
    A seeded draw of limits that fit trains to the end."""
    fed = [
        "split.clients=4",
        "split.cut_layers=[1,2,3,2]",
        "train.clients_per_round=3",
        "train.local_steps=2",
    ]
    out = tmp_path / "tight"
    argv = _argv(files, out, *fed, "train.rounds=2", "simulate.memory_limit_gb=[3,2.5,0.25,2]")
    res = run_ranks(3, argv, tmp_path / "logs-tight")
    assert res.codes == [EXIT_USER_ERROR] * 3, res.log[-6000:]
    said = [line for text in res.logs for line in text.splitlines() if "plan error" in line]
    assert len(said) == 1, res.log[-6000:]
    assert "client 3 (cut at layer 3) does not fit its simulated memory" in said[0]
    assert "gives it 0.25 GiB" in said[0] and "at or above the limit of 0.25 GiB" in said[0]
    (first,) = _metrics(out)
    assert first["participants"] == [1, 2, 4]
    workers = "\n".join(res.logs[1:])
    for c, gb in ((1, 3), (2, 2.5), (4, 2)):
        assert f"client {c} trains under its simulated memory limit of {gb:g} GiB" in workers
        assert first["clients"][str(c)]["vmdata_mb"] < gb * 1024
    assert json.loads((out / "checkpoint" / "round-000001" / "state.json").read_text())["round"] == 1

    out = tmp_path / "drawn"
    argv = _argv(files, out, *fed, "train.rounds=2", "simulate.memory_limit_gb={lognormal: 0.2, median: 3}")
    res = run_ranks(3, argv, tmp_path / "logs-drawn")
    assert res.codes == [0, 0, 0], res.log[-6000:]
    limits = json.loads((out / "run_config.json").read_text())["simulate"]["memory_limit_gb"]
    assert len(limits) == 4 and len(set(limits)) == 4
    workers = "\n".join(res.logs[1:])
    for rec in _metrics(out):
        for c in rec["participants"]:
            assert f"client {c} trains under its simulated memory limit of {limits[c - 1]:g} GiB" in workers
            assert rec["clients"][str(c)]["vmdata_mb"] < limits[c - 1] * 1024


def test_a_warmup_client_that_does_not_fit_its_memory_limit_is_named(files, tmp_path):  # noqa: F811
    """Importance selection with four clients on two workers: the warm-up's clients (round 0's draw, 1, 3
    and 4 under seed 0) warm up under their own memory limits like any round's; client 3's limit is below
    what its worker uses, and every rank stops before round 1 with one line naming client 3, its cut
    and its limit (exit code 2); no round and no selection is recorded."""
    fed = [
        "split.clients=4",
        "split.cut_layers=[1,2,3,2]",
        "train.clients_per_round=3",
        "train.local_steps=2",
        "train.rounds=1",
        "lora.selection=importance",
        "lora.warmup_steps=2",
        "simulate.memory_limit_gb=[3,2.5,0.25,2]",
    ]
    out = tmp_path / "tight"
    res = run_ranks(3, _argv(files, out, *fed), tmp_path / "logs")
    assert res.codes == [EXIT_USER_ERROR] * 3, res.log[-6000:]
    assert "importance warm-up: 2 steps of clients [1, 3, 4] " in res.logs[0]
    said = [line for text in res.logs for line in text.splitlines() if "plan error" in line]
    assert len(said) == 1, res.log[-6000:]
    assert "client 3 (cut at layer 3) does not fit its simulated memory" in said[0]
    assert "gives it 0.25 GiB" in said[0]
    assert _metrics(out) == [] and not (out / "checkpoint").exists() and not (out / "selection.json").exists()
