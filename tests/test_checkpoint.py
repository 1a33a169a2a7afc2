"""Round checkpoints: atomic, pruned, skipped when unreadable; a kill mid-write keeps the previous one;
the fingerprint names the setting that changed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from runtime import checkpoint
from runtime.config import fingerprint, load_config

REPO = Path(__file__).resolve().parent.parent


def test_save_is_a_whole_round_directory_and_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoint"
    for rnd in range(1, 5):
        checkpoint.save(root, rnd, torch.full((3,), float(rnd)), {"round": rnd}, keep=2)
    assert [p.name for p in checkpoint.rounds(root)] == ["round-000003", "round-000004"]
    state, flat = checkpoint.latest(root)
    assert state["round"] == 4 and flat.tolist() == [4.0, 4.0, 4.0]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    root = tmp_path / "checkpoint"
    for rnd in (1, 2):
        checkpoint.save(root, rnd, torch.full((2,), float(rnd)), {"round": rnd}, keep=3)
    (checkpoint.round_dir(root, 2) / checkpoint.ADAPTER_FILE).write_bytes(b"garbage")
    state, flat = checkpoint.latest(root)
    assert state["round"] == 1 and flat.tolist() == [1.0, 1.0]
    assert checkpoint.latest(root, adapter=False) == (state, None)  # the launch check picks the same one
    assert checkpoint.latest(tmp_path / "nothing") is None


def test_the_saver_writes_in_the_background_what_was_handed_over(tmp_path):
    root = tmp_path / "checkpoint"
    saver = checkpoint.Saver(root, keep=2)
    caller = threading.get_ident()
    exported = []
    for rnd in range(1, 4):
        state, flat = {"round": rnd, "metrics": [rnd]}, torch.full((3,), float(rnd))
        saver.submit(rnd, flat, state, export=lambda: exported.append(threading.get_ident()))
        state["metrics"].append(-1)  # the caller goes on with its objects: the snapshot is not touched
        flat.fill_(-1.0)
    saver.wait()
    assert [p.name for p in checkpoint.rounds(root)] == ["round-000002", "round-000003"]  # in order
    state, flat = checkpoint.latest(root)
    assert state == {"round": 3, "metrics": [3]} and flat.tolist() == [3.0, 3.0, 3.0]
    assert len(exported) == 3 and caller not in exported  # the export ran on the writing thread


def test_a_failed_background_write_is_raised_with_its_round_and_the_rounds_before_it_are_kept(tmp_path):
    root = tmp_path / "checkpoint"
    saver = checkpoint.Saver(root, keep=3)
    saver.submit(1, torch.zeros(2), {"round": 1})
    saver.wait()
    (root / ".round-000002.tmp").write_text("not a folder")  # the write of round 2 cannot clear it
    saver.submit(2, torch.ones(2), {"round": 2})
    said = r"checkpoint of round 2 under .*checkpoint.* failed.*the rounds before it are kept"
    with pytest.raises(OSError, match=said):
        saver.wait()
    saver.wait()  # raised once, not again
    assert checkpoint.latest(root)[0]["round"] == 1


KILL_MID_WRITE = """
import os, signal, sys, torch
from safetensors import torch as st
from runtime import checkpoint
real = st.save_file
def save_then_die(*a, **k):
    real(*a, **k)          # the adapter is on disk ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before the state is written
checkpoint.save_file = save_then_die
checkpoint.save(checkpoint.Path(sys.argv[1]), 2, torch.ones(3), {"round": 2}, keep=2)
"""


def test_a_kill_between_the_adapter_and_the_state_write_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoint"
    checkpoint.save(root, 1, torch.zeros(3), {"round": 1}, keep=2)
    res = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE, str(root)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert res.returncode == -9
    assert (root / ".round-000002.tmp" / checkpoint.ADAPTER_FILE).is_file()  # it really died mid-write
    state, flat = checkpoint.latest(root)
    assert state["round"] == 1 and flat.tolist() == [0.0, 0.0, 0.0]
    # The next save of that round clears the leftover and lands whole.
    checkpoint.save(root, 2, torch.ones(3), {"round": 2}, keep=2)
    assert checkpoint.latest(root)[0]["round"] == 2


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.batch_size=4", "train.batch_size"),
        ("lora.alpha=8", "lora.alpha"),
        ("lora.dropout=0.1", "lora.dropout"),
        ("lora.targets=[q_proj]", "lora.targets"),
        ("data.max_seq_len=64", "data.max_seq_len"),
        ("data.train_path=/other.jsonl", "data.train_path"),
        ("train.lr=0.1", "train.lr"),
    ],
)
def test_a_changed_setting_is_named(tmp_path, override, field):
    cfg = load_config("torchrun_configs/tiny_cpu.yaml")
    state = {"round": 1, "fingerprint": fingerprint(cfg, 4)}
    changed = load_config("torchrun_configs/tiny_cpu.yaml", [override])
    with pytest.raises(checkpoint.CheckpointMismatch, match=rf"{field}=.*this run has {field}="):
        checkpoint.check_fingerprint(tmp_path, state, fingerprint(changed, 4))
    with pytest.raises(checkpoint.CheckpointMismatch, match="clients=4"):
        checkpoint.check_fingerprint(tmp_path, state, fingerprint(cfg, 3))


def test_settings_that_do_not_change_the_run_are_not_in_the_fingerprint(tmp_path):
    cfg = load_config("torchrun_configs/tiny_cpu.yaml")
    other = load_config(
        "torchrun_configs/tiny_cpu.yaml",
        ["train.rounds=50", "output_dir=/elsewhere", "runtime.peer_timeout_s=5", "simulate.slowdown=3"],
    )
    checkpoint.check_fingerprint(tmp_path, {"fingerprint": fingerprint(cfg, 4)}, fingerprint(other, 4))


def test_what_is_not_a_round_folder_is_named_once_and_left_alone(tmp_path, caplog):
    root = tmp_path / "checkpoint"
    checkpoint.save(root, 1, torch.ones(2), {"round": 1}, keep=2)
    (root / "round-old").mkdir()
    (root / "notes.txt").write_text("mine")
    (root / ".round-000002.tmp").mkdir()  # a write in progress: not stray
    with caplog.at_level("WARNING", logger="splitft"):
        state, _ = checkpoint.latest(root)
        checkpoint.save(root, 2, torch.ones(2), {"round": 2}, keep=2)
    assert state["round"] == 1
    said = [r.getMessage() for r in caplog.records if "not a round checkpoint" in r.getMessage()]
    assert len(said) == 1 and "notes.txt, round-old" in said[0] and ".round-000002.tmp" not in said[0]
    assert (root / "round-old").is_dir() and (root / "notes.txt").read_text() == "mine"
    assert [p.name for p in checkpoint.rounds(root)] == ["round-000001", "round-000002"]


def test_unreadable_rounds_are_never_counted_as_kept(tmp_path):
    """Rounds 8 and 9 of something else, unreadable: the new run's rounds 1.. are kept as if they were not
    there (keep=2), and the unreadable ones are not deleted either."""
    root = tmp_path / "checkpoint"
    for rnd in (8, 9):
        (checkpoint.round_dir(root, rnd)).mkdir(parents=True)
        (checkpoint.round_dir(root, rnd) / "state.json").write_text("{torn")
    checkpoint.save(root, 1, torch.ones(2), {"round": 1}, keep=2)
    assert checkpoint.round_dir(root, 1).is_dir()
    for rnd in (2, 3):
        checkpoint.save(root, rnd, torch.full((2,), float(rnd)), {"round": rnd}, keep=2)
    assert [p.name for p in checkpoint.rounds(root)] == [
        "round-000002",
        "round-000003",
        "round-000008",
        "round-000009",
    ]
    state, flat = checkpoint.latest(root)  # the unreadable newer ones are skipped
    assert state["round"] == 3 and flat.tolist() == [3.0, 3.0]
