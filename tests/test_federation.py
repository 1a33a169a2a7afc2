"""More clients than workers (``split.clients`` > WORLD_SIZE - 1): a worker trains its clients one after
another, re-cut to each client's cut and ranks.

Under a real torchrun: a worker killed mid-round under ``--max-restarts`` with client sampling on, and
the restarted job ends where an uninterrupted one does. With the ranks as processes of the test
(tests/ranks.py): per-client LoRA ranks give the same federation on two workers as on four.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.checkpoint import merged_weights
from runtime.config import ConfigError, load_config, validate_for_world
from tests.ranks import run_ranks
from tests.test_distributed import common_args, metrics, setup  # noqa: F401  (setup is a fixture)
from tests.test_protocol import _argv, _metrics, files  # noqa: F401  (files is a fixture)
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


def test_per_client_ranks_run_on_shared_workers_but_auto_ranks_are_refused_by_name():
    """8 clients on 4 workers: a list of 8 ranks is accepted; ``auto`` (a rank from each client's memory,
    which the planner does not know when clients share workers) is named with the fix."""
    base = ["split.clients=8", "split.cut_layers=2"]
    cfg = load_config("torchrun_configs/tiny_cpu.yaml", [*base, "lora.client_ranks=[8,4,2,4,8,4,2,4]"])
    assert validate_for_world(cfg, 5, 4) == [2] * 8
    cfg = load_config("torchrun_configs/tiny_cpu.yaml", [*base, "lora.client_ranks=auto"])
    with pytest.raises(ConfigError) as e:
        validate_for_world(cfg, 5, 4)
    assert "lora.client_ranks=auto" in str(e.value) and "a list of one rank per client" in str(e.value)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_a_worker_killed_with_sampling_on_is_restarted_and_ends_equal(setup, tmp_path):
    """Worker 1 is killed after its first step of round 2 (SPLITFT_FAULT, first attempt only);
    torchrun --max-restarts=1 starts every rank again, which resume after round 1: each client's data
    position and measured time come back from the checkpoint. Each round draws the same clients, and the
    eval losses and the adapter are the uninterrupted run's: exactly where the same workers trained the
    same clients, else within 1e-6 (which worker trains which client follows the measured times, so
    the all-reduce may add the same copies in another grouping)."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    code, log = launch([*common_args(setup, ref), *FEDERATION])
    assert code == 0, log[-6000:]
    code, log = launch([*common_args(setup, out), *FEDERATION], restarts=1, fault="step@1:2:1")
    assert code == 0, log[-6000:]
    assert "SPLITFT_FAULT: killing rank 1 at step, round 2" in log
    assert "resuming after round 1 " in log

    ours, theirs = metrics(out), metrics(ref)
    assert [r["round"] for r in ours] == [r["round"] for r in theirs] == [1, 2, 3]
    same_grouping = all(a["workers"] == b["workers"] for a, b in zip(ours, theirs))
    for a, b in zip(ours, theirs):
        assert a["participants"] == b["participants"] and len(a["participants"]) == 3
        assert set(a["workers"].values()) == {1, 2}  # both workers trained clients in every round
        tolerance = 0.0 if same_grouping else 1e-6
        assert abs(a["eval_loss"] - b["eval_loss"]) <= tolerance, (a["round"], a["eval_loss"], b["eval_loss"])
    assert len({c for r in ours for c in r["participants"]}) > 3  # sampling drew different clients
    mine, reference = _adapter(out), _adapter(ref)
    assert mine.keys() == reference.keys() and mine
    for key in mine:
        torch.testing.assert_close(mine[key], reference[key], atol=0.0 if same_grouping else 1e-6, rtol=0)


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
    if rule == "stack":  # the model is the merged weights (launch.export --merged)
        wa, wb = merged_weights(out4 / "checkpoint", 3), merged_weights(out2 / "checkpoint", 3)
    else:
        wa = load_file(str(out4 / "adapter" / "adapter_model.safetensors"))
        wb = load_file(str(out2 / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)
