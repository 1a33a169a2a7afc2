"""Greedy decoding of eval prompts and its scores (exact match, ROUGE-L), with no knowledge of processes.

``greedy_decode`` takes a ``next_tokens(input_ids, attention_mask, last)`` function that returns the
argmax token after position ``last[i]`` of every row: the split run passes one that runs the client's
layers and the server's over the wire, the unsplit reference one that runs the whole model, so both
decode the same way.

Decoding recomputes the whole prefix at every new token (no KV cache): the stages run their layers
through ``models.families.run_layer`` with the mask and positions built for the whole sequence, and a
cache would need per-family plumbing on both sides of the cut (each replica keeping one cache per
request). Rows are right-padded, so a row's real tokens keep positions ``0..n-1`` whatever the batch,
and causal attention keeps the padding after a row's end out of its logits: a row decodes the same
alone or in a batch.

ROUGE-L is the F-measure of the longest common subsequence of words, tokenised as the
``rouge-score`` package does without stemming (lower case, runs of ``[a-z0-9]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from models.datasets import IGNORE_INDEX, Example

NextTokens = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def has_response(example: Example) -> bool:
    """Whether the example is a prompt with a response (its first position carries no loss)."""
    return example.labels[0] == IGNORE_INDEX and any(t != IGNORE_INDEX for t in example.labels)


def prompt_and_reference(example: Example, eos_id: int | None) -> tuple[list[int], list[int]]:
    """(prompt token ids with bos, reference response token ids without the closing eos)."""
    start = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    reference = list(example.input_ids[start:])
    if reference and reference[-1] == eos_id:
        reference.pop()
    return list(example.input_ids[:start]), reference


def greedy_decode(
    next_tokens: NextTokens,
    prompts: Sequence[Sequence[int]],
    eos_id: int | None,
    pad_id: int,
    max_new_tokens: int,
    max_len: int,
) -> list[list[int]]:
    """The greedy continuation of every prompt (one batch), up to eos (not included), ``max_new_tokens``
    tokens, or a total length of ``max_len``."""
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    budget = min(max_new_tokens, max(0, max_len - int(lengths.min())))
    width = int(lengths.max()) + budget
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    out: list[list[int]] = [[] for _ in range(n)]
    active = lengths < max_len
    for _ in range(budget):
        if not bool(active.any()):
            break
        w = int(lengths[active].max())
        mask = (torch.arange(w)[None, :] < lengths[:, None]).long()
        rows = active.nonzero().flatten()
        token = next_tokens(ids[rows, :w], mask[rows], lengths[rows] - 1).cpu()
        for row, t in zip(rows.tolist(), token.tolist()):
            if t == eos_id:
                active[row] = False
                continue
            out[row].append(t)
            ids[row, lengths[row]] = t
            lengths[row] += 1
            if len(out[row]) >= max_new_tokens or lengths[row] >= max_len:
                active[row] = False
    return out


def rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``reference`` (0 when either has no words)."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    """The same text once surrounding whitespace is stripped."""
    return prediction.strip() == reference.strip()


def score_responses(
    next_tokens: NextTokens,
    examples: Sequence[Example],
    tokenizer,
    pad_id: int,
    batch_size: int,
    max_new_tokens: int,
    max_len: int,
) -> torch.Tensor:
    """[exact matches, ROUGE-L sum, samples]: ``examples``' prompts decoded greedily, ``batch_size`` at a
    time, against their reference responses (both as the tokenizer writes them out)."""
    totals = torch.zeros(3, dtype=torch.float64)
    eos = tokenizer.eos_token_id
    for start in range(0, len(examples), batch_size):
        pairs = [prompt_and_reference(x, eos) for x in examples[start : start + batch_size]]
        outs = greedy_decode(next_tokens, [p for p, _ in pairs], eos, pad_id, max_new_tokens, max_len)
        for out, (_, ref) in zip(outs, pairs):
            said = tokenizer.decode(out, skip_special_tokens=True)
            wanted = tokenizer.decode(ref, skip_special_tokens=True)
            totals += torch.tensor(
                [exact_match(said, wanted), rouge_l(said, wanted), 1.0], dtype=torch.float64
            )
    return totals
