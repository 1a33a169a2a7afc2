"""The command line: bad input stops the run before any process group, with a message that names the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.tiny import generate_examples, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def launch(module: str, *args: str) -> subprocess.CompletedProcess:
    """One process as torchrun's rank 0 of a server and one client would be (the checks come first)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "2"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def files(tmp_path, random_model) -> dict[str, str]:
    write_jsonl(generate_examples("sort", 32, 0), tmp_path / "train.jsonl")
    return {
        "model": str(random_model("llama")),
        "train": str(tmp_path / "train.jsonl"),
        "out": str(tmp_path / "out"),
    }


def base_args(files: dict[str, str]) -> list[str]:
    return [
        "torchrun_configs/tiny_cpu.yaml",
        f"model.path={files['model']}",
        f"data.train_path={files['train']}",
        f"data.eval_path={files['train']}",
        f"output_dir={files['out']}",
    ]


def test_unknown_key_is_refused_with_the_valid_keys(files):
    res = launch("launch.train", *base_args(files), "train.roundz=3")
    assert res.returncode == 2
    assert "unknown config key train.roundz" in res.stderr and "rounds" in res.stderr


def test_missing_model_folder_names_the_field(files, tmp_path):
    res = launch("launch.train", *base_args(files), f"model.path={tmp_path / 'nowhere'}")
    assert res.returncode == 2
    assert "model.path=" in res.stderr and "config.json" in res.stderr


def test_malformed_data_line_names_file_and_line(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 3}\n')
    res = launch("launch.train_local", *base_args(files), f"data.train_path={bad}")
    assert res.returncode == 2
    assert "bad.jsonl:2" in res.stderr and "response" in res.stderr


def test_more_cut_layers_than_clients(files):
    env_args = [*base_args(files), "split.cut_layers=[1,2,3]"]
    res = subprocess.run(
        [sys.executable, "-m", "launch.train", *env_args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "3"},
    )
    assert res.returncode == 2
    assert "3 entries for 2 clients" in res.stderr


def _checkpoint(out: str, state: dict) -> Path:
    import torch

    from runtime import checkpoint

    return checkpoint.save(Path(out) / "checkpoint", 3, torch.zeros(4), state, keep=2)


def test_checkpointed_output_dir_is_not_overwritten_with_resume_false(files):
    saved = _checkpoint(files["out"], {"round": 3})
    before = (saved / "state.json").read_bytes()
    res = launch("launch.train", *base_args(files), "runtime.resume=false")
    assert res.returncode == 2
    assert "round 3" in res.stderr and "runtime.resume=auto" in res.stderr
    assert "Traceback" not in res.stderr
    assert (saved / "state.json").read_bytes() == before


def test_resume_true_without_checkpoint_is_refused(files):
    res = launch("launch.train", *base_args(files), "runtime.resume=true")
    assert res.returncode == 2
    assert "holds no complete checkpoint" in res.stderr and "runtime.resume=auto" in res.stderr


def test_changed_batch_size_on_resume_is_refused_naming_the_field(files):
    from runtime.config import fingerprint, load_config

    cfg = load_config(base_args(files)[0], base_args(files)[1:])
    saved = _checkpoint(files["out"], {"round": 3, "fingerprint": fingerprint(cfg, 1)})
    before = (saved / "state.json").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "2"}
    res = subprocess.run(
        [sys.executable, "-m", "launch.train", *base_args(files), "train.batch_size=4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 2, res.stderr
    assert "train.batch_size=8" in res.stderr and "train.batch_size=4" in res.stderr
    assert "Traceback" not in res.stderr
    assert (saved / "state.json").read_bytes() == before
