"""Shared fixtures: tiny random checkpoints of every family (saved once per session) and a small dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILY_NAMES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neo", "opt")
N_LAYERS = 4
HIDDEN = 32


@pytest.fixture(scope="session")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``random_model(family, n_layers=4, hidden=32)``: a random checkpoint folder, saved once per session."""
    from tests.random_models import save_random_model

    root = tmp_path_factory.mktemp("random_models")
    cache: dict[tuple[str, int, int], Path] = {}

    def get(family: str, n_layers: int = N_LAYERS, hidden: int = HIDDEN) -> Path:
        key = (family, n_layers, hidden)
        if key not in cache:
            cache[key] = save_random_model(
                family, root / f"{family}-L{n_layers}-h{hidden}", n_layers=n_layers, hidden=hidden
            )
        return cache[key]

    return get


@pytest.fixture(scope="session")
def sort_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prompt/response JSONL file of the ``sort`` task (16 records, seed 0)."""
    from models.tiny import generate_examples, write_jsonl

    path = tmp_path_factory.mktemp("data") / "sort.jsonl"
    write_jsonl(generate_examples("sort", 16, 0), path)
    return path
