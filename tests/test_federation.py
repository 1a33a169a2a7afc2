"""More clients than workers (``split.clients`` > WORLD_SIZE - 1): a worker trains its clients one after
another, re-cut to each. What only a real torchrun can show: a worker killed mid-round under
``--max-restarts`` with client sampling on, and the restarted job ends where an uninterrupted one does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_distributed import common_args, metrics, setup  # noqa: F401  (setup is a fixture)
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
