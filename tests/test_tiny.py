"""Tests for the built-in tiny model, tokenizer and task data (fast: no real pretraining)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.tiny import (
    FINETUNE_TASK,
    MAX_TEXT_TOKENS,
    PRETRAIN_TASKS,
    TASK_FUNCTIONS,
    TASKS,
    build_char_tokenizer,
    build_demo_data,
    build_tiny_model,
    generate_examples,
    make_example,
    write_jsonl,
)

# Enough to exercise the whole pipeline; the real default takes a minute.
FAST_STEPS = 3
SAMPLES = [
    "sort: 8 3 5 1 = 1 3 5 8",
    "".join(c for c in string.printable if c not in "\x0b\x0c\r"),
    "  leading and trailing spaces . , !  ",
    "tabs\tand\nnewlines\n",
]


def _digits(prompt: str) -> list[int]:
    """Parse "task: d d d =" back into its digits."""
    body = prompt.split(":", 1)[1].removesuffix("=")
    return [int(d) for d in body.split()]


def test_tokenizer_round_trip_is_lossless_and_adds_no_specials() -> None:
    tok = build_char_tokenizer()
    assert (tok.pad_token_id, tok.pad_token) == (0, "<pad>")
    assert {tok.bos_token, tok.eos_token, tok.unk_token} == {"<s>", "</s>", "<unk>"}
    for text in SAMPLES:
        ids = tok.encode(text)
        assert len(ids) == len(text)  # one token per character, nothing added
        assert tok.decode(ids) == text
    assert tok.encode("é") == [tok.unk_token_id]
    assert tok.encode("<s>ab</s>") == [tok.bos_token_id, *tok.encode("ab"), tok.eos_token_id]


def test_tokenizer_reloads_offline_with_identical_ids(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(tok)
    for text in SAMPLES:
        assert reloaded.encode(text) == tok.encode(text)
        assert reloaded.decode(tok.encode(text)) == text
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(reloaded, attr) == getattr(tok, attr)


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_and_correct(task: str) -> None:
    records = generate_examples(task, 50, seed=7)
    assert records == generate_examples(task, 50, seed=7)
    assert records != generate_examples(task, 50, seed=8)
    for record in records:
        digits = _digits(record["prompt"])
        assert record["prompt"].startswith(f"{task}: ")
        assert record["response"] == "".join(f" {d}" for d in TASK_FUNCTIONS[task](digits))


def test_finetune_task_is_sort_and_not_pretrained() -> None:
    assert FINETUNE_TASK not in PRETRAIN_TASKS
    for record in generate_examples(FINETUNE_TASK, 100, seed=0):
        answer = [int(d) for d in record["response"].split()]
        assert answer == sorted(_digits(record["prompt"]))
    assert make_example("sort", [8, 3, 5, 1]) == {"prompt": "sort: 8 3 5 1 =", "response": " 1 3 5 8"}


def test_unknown_task_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        generate_examples("nope", 1, seed=0)


@pytest.mark.parametrize("task", [*TASKS, "pretrain"])
def test_lengths_vary_widely_and_fit_the_context(task: str) -> None:
    tok = build_char_tokenizer()
    lengths = [len(r["prompt"]) + len(r["response"]) for r in generate_examples(task, 200, seed=1)]
    assert max(lengths) > 3 * min(lengths)
    # +2 for the <s> and </s> the data loader adds.
    assert max(lengths) + 2 <= MAX_TEXT_TOKENS
    record = generate_examples(task, 1, seed=1)[0]
    assert len(tok.encode(record["prompt"] + record["response"])) == len(
        record["prompt"] + record["response"]
    )


def test_write_jsonl_round_trips(tmp_path: Path) -> None:
    records = generate_examples(FINETUNE_TASK, 5, seed=3)
    path = tmp_path / "x.jsonl"
    write_jsonl(records, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]  # no temp file left


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", pretrain_steps=FAST_STEPS)


def test_build_writes_a_loadable_llama(built: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(built)
    tok = AutoTokenizer.from_pretrained(built)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers >= 4
    assert not model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert (built / "model.safetensors").is_file()
    ids = torch.tensor([[tok.bos_token_id, *tok.encode("sort: 3 1 =")]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    info = json.loads((built / "build_info.json").read_text())
    assert info["params"]["pretrain_steps"] == FAST_STEPS


def test_build_is_cached_for_identical_parameters(built: Path) -> None:
    marker = built / "build_info.json"
    before = marker.stat().st_mtime_ns
    assert build_tiny_model(built, pretrain_steps=FAST_STEPS) == built
    assert marker.stat().st_mtime_ns == before


def test_build_is_redone_for_other_parameters_or_force(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "m", pretrain_steps=1)
    marker = out / "build_info.json"
    first = marker.stat().st_mtime_ns
    build_tiny_model(out, pretrain_steps=1, seed=1)
    second = marker.stat().st_mtime_ns
    assert second != first
    assert json.loads(marker.read_text())["params"]["seed"] == 1
    build_tiny_model(out, pretrain_steps=1, seed=1, force=True)
    assert marker.stat().st_mtime_ns != second


def test_partial_folder_without_marker_is_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{half written")
    stale_temp = tmp_path / ".m.tmp-killed"  # what a killed build leaves behind
    stale_temp.mkdir()
    build_tiny_model(out, pretrain_steps=1)
    assert (out / "build_info.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers >= 4
    assert not stale_temp.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m.tmp-")) == []


def test_demo_data_is_held_out_and_cached(tmp_path: Path) -> None:
    train_path, eval_path = build_demo_data(tmp_path, seed=0, n_train=300, n_eval=40)
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    evaluation = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert (len(train), len(evaluation)) == (300, 40)
    assert all(r["prompt"].startswith(f"{FINETUNE_TASK}: ") for r in train + evaluation)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    mtime = train_path.stat().st_mtime_ns
    assert build_demo_data(tmp_path, seed=0, n_train=300, n_eval=40) == (train_path, eval_path)
    assert train_path.stat().st_mtime_ns == mtime
    build_demo_data(tmp_path, seed=0, n_train=301, n_eval=40)
    assert len(train_path.read_text().splitlines()) == 301
