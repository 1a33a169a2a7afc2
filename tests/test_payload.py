"""What a client sends to the server: hidden states, the padding mask and the labels, never the tokens."""

from __future__ import annotations

import pytest
import torch

from models.datasets import IGNORE_INDEX, collate, load_examples
from models.stages import build_stage
from models.tiny import build_char_tokenizer, generate_examples
from runtime.client import server_payload


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def examples(sort_jsonl, tokenizer):
    return load_examples(sort_jsonl, tokenizer, max_seq_len=128)


@pytest.fixture(scope="module")
def client(random_model):
    return build_stage(random_model("llama"), 0, 2).eval()


def _send(client, batch):
    with torch.no_grad():
        hidden = client(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return hidden, server_payload(batch, hidden)


def _contains_run(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def test_payload_is_hidden_mask_targets(client, examples, tokenizer):
    lengths = {len(e.input_ids) for e in examples[:4]}
    assert len(lengths) > 1, "the test batch must need padding"
    batch = collate(examples[:4], tokenizer.pad_token_id)
    hidden, payload = _send(client, batch)
    assert isinstance(payload, tuple) and len(payload) == 3
    sent_hidden, mask, targets = payload
    assert sent_hidden is hidden and sent_hidden.is_floating_point()
    assert mask is not None and mask.dtype == torch.bool
    assert torch.equal(mask, batch["attention_mask"].bool())
    # the targets: the labels shifted by one (what each position predicts), int32, nothing more
    assert targets.dtype == torch.int32 and targets.shape[1] == batch["labels"].shape[1] - 1
    assert torch.equal(targets.long(), batch["labels"][:, 1:])
    # U-shaped: the targets stay on the client
    assert len(server_payload(batch, hidden, u_shape=True)) == 2


def test_no_token_ids_cross_the_wire(client, examples, tokenizer):
    batch = collate(examples[:4], tokenizer.pad_token_id)
    _, payload = _send(client, batch)
    input_ids = batch["input_ids"]
    for t in payload:
        assert t is not input_ids
        if t.shape == input_ids.shape:
            assert not torch.equal(t.long(), input_ids)
    integer = [t for t in payload if not t.is_floating_point() and t.dtype != torch.bool]
    assert len(integer) == 1  # the targets, and only them


def test_prompt_tokens_are_not_sent(client, sort_jsonl, examples, tokenizer):
    records = generate_examples("sort", 16, 0)  # what the sort_jsonl fixture wrote
    batch = collate(examples[:4], tokenizer.pad_token_id)
    _, (_, _, labels) = _send(client, batch)
    for row, record in zip(labels.tolist(), records[:4], strict=True):
        prompt = [tokenizer.bos_token_id, *tokenizer.encode(record["prompt"], add_special_tokens=False)]
        response = [*tokenizer.encode(record["response"], add_special_tokens=False), tokenizer.eos_token_id]
        # The prompt positions carry no target; the targets are exactly the response and </s>
        # (shifted by one: position t holds the token at t + 1).
        assert row[: len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1)
        assert [x for x in row if x != IGNORE_INDEX] == response
        # "sort: 4 1 ... =" as a run of ids appears nowhere in what is sent.
        assert not _contains_run(row, prompt[1:])
    assert (labels == IGNORE_INDEX).any(dim=1).all()


def test_mask_is_none_without_padding(client, examples, tokenizer):
    same = [e for e in examples if len(e.input_ids) == len(examples[0].input_ids)]
    for group in ([examples[0]], same):
        batch = collate(group, tokenizer.pad_token_id)
        assert bool(batch["attention_mask"].all())
        _, (_, mask, labels) = _send(client, batch)
        assert mask is None
        assert labels.dtype == torch.int32 and labels.shape[1] == batch["input_ids"].shape[1] - 1
