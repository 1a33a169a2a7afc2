"""The command line: bad input stops the run before any process group, with a message that names the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.tiny import generate_examples, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def launch(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
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


def test_checkpointed_output_dir_is_not_overwritten(files):
    ckpt = Path(files["out"]) / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"round": 3}))
    res = launch("launch.train", *base_args(files))
    assert res.returncode == 2
    assert "runtime.resume=true" in res.stderr
    assert json.loads((ckpt / "state.json").read_text()) == {"round": 3}
