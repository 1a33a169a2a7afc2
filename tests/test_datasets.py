"""Tests for models.datasets, using an in-process char-level tokenizer (no network)."""

from __future__ import annotations

import json
import string
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from models.datasets import (
    IGNORE_INDEX,
    BatchStream,
    Example,
    batch_order,
    collate,
    detect_format,
    eval_batches,
    load_examples,
)

PAD, BOS, EOS, UNK = 0, 1, 2, 3
CHARS = string.ascii_lowercase + " .,!?:"


def _char_tokenizer(with_bos_eos: bool = True) -> PreTrainedTokenizerFast:
    """Char-level WordLevel tokenizer: every character is one token, so token counts are predictable."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    specials = {"bos_token": "<s>", "eos_token": "</s>"} if with_bos_eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", **specials)


def _ids(text: str) -> list[int]:
    return [4 + CHARS.index(c) for c in text]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _char_tokenizer()


def _write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def _jsonl(tmp_path: Path, records: list[dict], name: str = "data.jsonl") -> Path:
    return _write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------------------- format detection / loading


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format(_write(tmp_path, "a.txt", "hi\n")) == "text"
    assert detect_format(_write(tmp_path, "a.md", "hi\n")) == "text"
    assert detect_format(_jsonl(tmp_path, [{"text": "hi"}], "b.jsonl")) == "jsonl_text"
    assert detect_format(_jsonl(tmp_path, [{"prompt": "q", "response": "a"}], "c.json")) == "jsonl_prompt"
    with pytest.raises(ValueError, match=r"d\.jsonl:1: cannot detect.*accepted formats"):
        detect_format(_jsonl(tmp_path, [{"prompt": "q"}], "d.jsonl"))


def test_load_plain_text(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _write(tmp_path, "data.txt", "ab\n\n   \ncd e\n")
    examples = load_examples(path, tok, max_seq_len=32)
    assert [e.input_ids for e in examples] == [(BOS, *_ids("ab"), EOS), (BOS, *_ids("cd e"), EOS)]
    assert all(e.labels == e.input_ids for e in examples)


def test_load_jsonl_text_skips_blank_lines(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _write(tmp_path, "data.jsonl", '{"text": "hello"}\n\n{"text": "ok!"}\n')
    examples = load_examples(path, tok, max_seq_len=32)
    assert [e.input_ids for e in examples] == [(BOS, *_ids("hello"), EOS), (BOS, *_ids("ok!"), EOS)]
    assert all(e.labels == e.input_ids for e in examples)


def test_explicit_format_overrides_suffix(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _write(tmp_path, "data.txt", '{"text": "ab"}\n')
    assert load_examples(path, tok, 32, fmt="jsonl_text")[0].input_ids == (BOS, *_ids("ab"), EOS)
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        load_examples(path, tok, 32, fmt="csv")


def test_no_bos_eos_when_tokenizer_has_none(tmp_path: Path) -> None:
    path = _write(tmp_path, "data.txt", "abc\n")
    (example,) = load_examples(path, _char_tokenizer(with_bos_eos=False), max_seq_len=32)
    assert example.input_ids == tuple(_ids("abc"))


def test_prompt_response_masks_bos_and_prompt(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _jsonl(tmp_path, [{"prompt": "q: ab", "response": "cd"}, {"prompt": "", "response": "x"}])
    first, second = load_examples(path, tok, max_seq_len=32)
    assert first.input_ids == (BOS, *_ids("q: ab"), *_ids("cd"), EOS)
    assert first.labels == (IGNORE_INDEX,) * (1 + 5) + (*_ids("cd"), EOS)
    assert second.input_ids == (BOS, *_ids("x"), EOS)
    assert second.labels == (IGNORE_INDEX, *_ids("x"), EOS)


def test_long_text_is_chunked(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    # 1 bos + 9 chars + 1 eos = 11 tokens -> chunks of 4, 4, 3; a 1-token tail would be dropped.
    path = _write(tmp_path, "data.txt", "abcdefghi\nabcdefg\n")
    examples = load_examples(path, tok, max_seq_len=4)
    full = (BOS, *_ids("abcdefghi"), EOS)
    assert [e.input_ids for e in examples[:3]] == [full[0:4], full[4:8], full[8:11]]
    # second line: 9 tokens -> 4, 4 and a dropped single token.
    assert [len(e.input_ids) for e in examples[3:]] == [4, 4]
    assert all(e.labels == e.input_ids and len(e.input_ids) <= 4 for e in examples)


def test_prompt_response_truncation_and_drop_warning(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    records = [
        {"prompt": "ab", "response": "cdef"},  # 1 + 2 + 4 + 1 = 8 tokens -> truncated to 5, kept
        {"prompt": "abcdefgh", "response": "x"},  # prompt alone fills the window -> dropped
        {"prompt": "abc", "response": "x"},  # bos + prompt = 4, one response token fits -> kept
    ]
    path = _jsonl(tmp_path, records)
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 .*max_seq_len=5.*raise max_seq_len"):
        examples = load_examples(path, tok, max_seq_len=5)
    assert len(examples) == 2
    assert examples[0].input_ids == (BOS, *_ids("ab"), *_ids("cd"))
    assert examples[0].labels == (IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, *_ids("cd"))
    assert examples[1].labels == (IGNORE_INDEX,) * 4 + tuple(_ids("x"))


def test_no_warning_when_nothing_dropped(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _jsonl(tmp_path, [{"prompt": "ab", "response": "cd"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_examples(path, tok, max_seq_len=32)


def test_all_prompt_samples_dropped(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _jsonl(tmp_path, [{"prompt": "abcdef", "response": "x"}] * 2)
    with pytest.raises(ValueError, match=r"all 2 .*dropped.*raise max_seq_len"):
        load_examples(path, tok, max_seq_len=4)


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(missing, tok, 16)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_examples(tmp_path / "nope.txt", tok, 16, fmt="text")


def test_invalid_json_names_line(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _write(tmp_path, "data.jsonl", '{"text": "ab"}\n\n{"text": "ab"\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:3: invalid JSON \("):
        load_examples(path, tok, 16)


def test_non_object_record(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _write(tmp_path, "data.jsonl", '{"text": "ab"}\n["ab"]\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: expected a JSON object"):
        load_examples(path, tok, 16)


def test_missing_field_names_line_and_field(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"}])
    with pytest.raises(
        ValueError, match=r"data\.jsonl:2: 'response' is missing; expected a string 'response' field"
    ):
        load_examples(path, tok, 16)


def test_non_string_field(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 3}])
    with pytest.raises(
        ValueError, match=r"data\.jsonl:2: 'response' is a int; expected a string 'response' field"
    ):
        load_examples(path, tok, 16)
    path = _jsonl(tmp_path, [{"text": "a"}, {"text": None}], "t.jsonl")
    with pytest.raises(ValueError, match=r"t\.jsonl:2: .*expected a string 'text' field"):
        load_examples(path, tok, 16)


def test_mixed_formats(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _jsonl(tmp_path, [{"text": "a"}, {"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match=r"data\.jsonl:2: mixed formats.*expected a string 'text' field"):
        load_examples(path, tok, 16)
    path = _jsonl(tmp_path, [{"prompt": "a", "response": "b"}, {"text": "a"}], "p.jsonl")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: mixed formats.*expected a string 'prompt' field"):
        load_examples(path, tok, 16)


@pytest.mark.parametrize("name, content", [("e.txt", "\n  \n"), ("e.jsonl", ""), ("e.jsonl", "\n\n")])
def test_empty_dataset(tmp_path: Path, tok: PreTrainedTokenizerFast, name: str, content: str) -> None:
    with pytest.raises(ValueError, match="empty dataset"):
        load_examples(_write(tmp_path, name, content), tok, 16)


def test_max_seq_len_too_small(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="max_seq_len must be at least 2"):
        load_examples(_write(tmp_path, "a.txt", "ab\n"), tok, 1)


def test_example_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="aligned"):
        Example((1, 2), (1,))


# --------------------------------------------------------------------------- collation and ordering


def test_collate_pads_right() -> None:
    batch = collate([Example((5, 6, 7), (IGNORE_INDEX, 6, 7)), Example((8,), (8,))], pad_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="empty batch"):
        collate([], PAD)


def test_batch_order_deterministic_permutation() -> None:
    indices = [3, 7, 11, 20, 21, 40, 41]
    first = batch_order(indices, batch_size=3, seed=5, epoch=0)
    assert first == batch_order(indices, batch_size=3, seed=5, epoch=0)
    assert [len(b) for b in first] == [3, 3, 1]
    for epoch in range(4):
        flat = [i for batch in batch_order(indices, 3, seed=5, epoch=epoch) for i in batch]
        assert sorted(flat) == indices
    orders = {tuple(i for b in batch_order(list(range(50)), 50, 5, epoch) for i in b) for epoch in range(3)}
    assert len(orders) == 3  # epochs are reshuffled
    assert batch_order(list(range(50)), 50, 6, 0) != batch_order(list(range(50)), 50, 5, 0)
    assert batch_order([], 4, 0, 0) == []
    with pytest.raises(ValueError, match="batch_size"):
        batch_order(indices, 0, 0, 0)


def _examples(n: int) -> list[Example]:
    return [Example(tuple(range(4, 4 + 1 + i % 3)), tuple(range(4, 4 + 1 + i % 3))) for i in range(n)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_stream_follows_batch_order_across_epochs() -> None:
    examples = _examples(10)
    indices = [1, 2, 3, 5, 8]
    stream = BatchStream(examples, indices, batch_size=2, seed=9, pad_id=PAD)
    assert stream.batches_per_epoch == 3
    for epoch in range(3):
        for batch_indices in batch_order(indices, 2, seed=9, epoch=epoch):
            assert _same(stream.next(), collate([examples[i] for i in batch_indices], PAD))
    assert stream.state_dict() == {"epoch": 3, "position": 0}


def test_batch_stream_resume_and_skip() -> None:
    examples = _examples(12)
    indices = list(range(12))
    reference = BatchStream(examples, indices, batch_size=5, seed=1, pad_id=PAD)
    for _ in range(4):  # crosses an epoch boundary (3 batches per epoch)
        reference.next()
    state = reference.state_dict()
    assert state == {"epoch": 1, "position": 1}

    resumed = BatchStream(examples, indices, batch_size=5, seed=1, pad_id=PAD)
    resumed.load_state_dict(state)
    skipped = BatchStream(examples, indices, batch_size=5, seed=1, pad_id=PAD)
    skipped.skip(4)
    assert skipped.state_dict() == state
    for _ in range(5):
        expected = reference.next()
        assert _same(resumed.next(), expected)
        assert _same(skipped.next(), expected)

    with pytest.raises(ValueError, match="out of range"):
        resumed.load_state_dict({"epoch": 0, "position": 3})


def test_batch_stream_rejects_bad_shard() -> None:
    with pytest.raises(ValueError, match="empty"):
        BatchStream(_examples(3), [], 2, 0, PAD)
    with pytest.raises(ValueError, match="outside the dataset"):
        BatchStream(_examples(3), [0, 3], 2, 0, PAD)


def test_eval_batches_fixed_order() -> None:
    examples = _examples(6)
    batches = eval_batches(examples, [5, 0, 3], batch_size=2, pad_id=PAD)
    assert len(batches) == 2
    assert _same(batches[0], collate([examples[5], examples[0]], PAD))
    assert _same(batches[1], collate([examples[3]], PAD))
