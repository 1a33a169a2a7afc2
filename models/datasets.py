"""Dataset reading, tokenisation and batching.

Three on-disk formats are accepted:

* ``text``: plain text, one sample per non-empty line (any file not ending in ``.jsonl``/``.json``);
* ``jsonl_text``: JSONL, one sample per record's string ``"text"`` field;
* ``jsonl_prompt``: JSONL with string ``"prompt"`` and ``"response"`` fields (instruction tuning: the
  loss covers only the response and the closing eos).

Labels follow the Hugging Face causal-LM convention: ``labels`` is aligned with ``input_ids`` and the
model shifts it internally, so the label at position 0 is never a prediction target.  ``-100``
marks positions without loss.

Batch order is a pure function of ``(seed, epoch, position)``, so every client (and every resumed
run) reproduces exactly the same batches without storing any sampler state beyond two integers.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
FORMATS = ("text", "jsonl_text", "jsonl_prompt")

_JSONL_SUFFIXES = (".jsonl", ".json")
_FORMAT_FIELDS = {"jsonl_text": ("text",), "jsonl_prompt": ("prompt", "response")}
_ACCEPTED = (
    "accepted formats: plain text (one sample per line, any file not ending in .jsonl/.json), "
    'JSONL with a string "text" field per record, '
    'JSONL with string "prompt" and "response" fields per record'
)
# Fast tokenizers parallelise inside one batched call; slicing bounds the peak memory of the
# intermediate Encoding objects on very large files while keeping calls few.
_TOKENIZE_BATCH = 8192


@dataclass(frozen=True)
class Example:
    """One training sequence; ``labels`` is ``IGNORE_INDEX`` wherever no loss is taken."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"Example: input_ids has {len(self.input_ids)} tokens but labels has {len(self.labels)}; "
                "they must be aligned position by position"
            )


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} (check the dataset path in the config)")


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line)``, turning a decoding failure into an actionable error."""
    try:
        with path.open(encoding="utf-8") as handle:
            yield from enumerate(handle, start=1)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 text ({err}); re-encode the file as UTF-8") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, record)`` for every non-blank line of a JSONL file."""
    for lineno, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno}); "
                "each non-blank line must hold exactly one JSON object (JSONL)"
            ) from None
        if not isinstance(record, dict):
            # Bad file content, not a bad argument: keep ValueError like every other data error.
            raise ValueError(  # noqa: TRY004
                f"{path}:{lineno}: expected a JSON object per line, got a JSON {type(record).__name__}; "
                f"{_ACCEPTED}"
            )
        yield lineno, record


def detect_format(path: str | Path) -> str:
    """Return ``"text"``, ``"jsonl_text"`` or ``"jsonl_prompt"`` for ``path``.

    Only the file suffix and the first JSONL record are inspected, so detection stays cheap; the
    remaining records are checked against the detected format while loading.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() not in _JSONL_SUFFIXES:
        return "text"
    for lineno, record in _iter_jsonl(path):
        if "text" in record:
            return "jsonl_text"
        if "prompt" in record and "response" in record:
            return "jsonl_prompt"
        raise ValueError(
            f"{path}:{lineno}: cannot detect the dataset format from the first record "
            f"(keys: {sorted(record)}); {_ACCEPTED}"
        )
    raise ValueError(f"{path}: empty dataset (no JSON records); {_ACCEPTED}")


def _read_text_lines(path: Path) -> list[str]:
    return [line.rstrip("\r\n") for _, line in _read_lines(path) if line.strip()]


def _read_jsonl_fields(path: Path, fmt: str) -> list[tuple[str, ...]]:
    """Read the format's string fields from every record, rejecting records of another format."""
    fields = _FORMAT_FIELDS[fmt]
    foreign = [key for other, keys in _FORMAT_FIELDS.items() if other != fmt for key in keys]
    rows: list[tuple[str, ...]] = []
    for lineno, record in _iter_jsonl(path):
        for field in fields:
            value = record.get(field)
            if isinstance(value, str):
                continue
            if field not in record and any(key in record for key in foreign):
                raise ValueError(
                    f"{path}:{lineno}: mixed formats: the file is read as {fmt} but this record has "
                    f"{sorted(key for key in foreign if key in record)} instead of {field!r}; "
                    f"expected a string {field!r} field (use one format per file)"
                )
            problem = "is missing" if field not in record else f"is a {type(value).__name__}"
            raise ValueError(
                f"{path}:{lineno}: {field!r} {problem}; expected a string {field!r} field ({fmt})"
            )
        rows.append(tuple(record[field] for field in fields))
    return rows


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens, via batched tokenizer calls."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        encoded = tokenizer(
            texts[start : start + _TOKENIZE_BATCH],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # long samples are chunked/truncated here, the length warning is noise
        )
        ids.extend(encoded["input_ids"])
    return ids


def _text_examples(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_seq_len: int, bos: list[int], eos: list[int]
) -> list[Example]:
    examples: list[Example] = []
    for ids in _tokenize(tokenizer, texts):
        tokens = bos + ids + eos
        for start in range(0, len(tokens), max_seq_len):
            chunk = tuple(tokens[start : start + max_seq_len])
            if len(chunk) >= 2:  # a single token has no next token to predict
                examples.append(Example(chunk, chunk))
    return examples


def _prompt_examples(
    rows: list[tuple[str, ...]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    bos: list[int],
    eos: list[int],
) -> tuple[list[Example], int, int]:
    """Build masked instruction examples; return ``(examples, n_dropped, longest untruncated length)``."""
    prompts = _tokenize(tokenizer, [prompt for prompt, _ in rows])
    responses = _tokenize(tokenizer, [response for _, response in rows])
    examples: list[Example] = []
    dropped = longest = 0
    for prompt_ids, response_ids in zip(prompts, responses, strict=True):
        ids = bos + prompt_ids + response_ids + eos
        longest = max(longest, len(ids))
        n_masked = len(bos) + len(prompt_ids)
        # Labels are shifted inside the model, so position 0 is never a target: a sample needs a
        # response token (or eos) at position >= 1 within the window, otherwise it carries no loss.
        if min(len(ids), max_seq_len) <= max(n_masked, 1):
            dropped += 1
            continue
        labels = [IGNORE_INDEX] * n_masked + response_ids + eos
        examples.append(Example(tuple(ids[:max_seq_len]), tuple(labels[:max_seq_len])))
    return examples, dropped, longest


def load_examples(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, fmt: str = "auto"
) -> list[Example]:
    """Read, tokenise and window a dataset file into :class:`Example` objects.

    ``fmt`` is ``"auto"`` (see :func:`detect_format`) or one of :data:`FORMATS`.  Text samples longer
    than ``max_seq_len`` are split into consecutive chunks (no token is lost); prompt/response samples
    are truncated from the right, because a chunk without its prompt would teach the wrong mapping.
    """
    if max_seq_len < 2:
        raise ValueError(
            f"max_seq_len must be at least 2 (one input and one target token), got {max_seq_len}"
        )
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    elif fmt in FORMATS:
        _check_file(path)
    else:
        raise ValueError(f"unknown dataset format {fmt!r}; use 'auto' or one of {list(FORMATS)}")

    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []

    if fmt == "jsonl_prompt":
        rows = _read_jsonl_fields(path, fmt)
        if not rows:
            raise ValueError(f"{path}: empty dataset (no records); add prompt/response records")
        examples, dropped, longest = _prompt_examples(rows, tokenizer, max_seq_len, bos, eos)
        if not examples:
            raise ValueError(
                f"{path}: all {dropped} prompt/response samples were dropped because no response token fits "
                f"in max_seq_len={max_seq_len}; raise max_seq_len (longest sample: {longest} tokens) "
                "or shorten the prompts"
            )
        if dropped:
            warnings.warn(
                f"{path}: dropped {dropped} of {len(rows)} prompt/response samples because no response token "
                f"fits in max_seq_len={max_seq_len}; raise max_seq_len (longest sample: {longest} tokens) "
                "to keep them",
                stacklevel=2,
            )
        return examples

    texts = _read_text_lines(path) if fmt == "text" else [text for (text,) in _read_jsonl_fields(path, fmt)]
    examples = _text_examples(texts, tokenizer, max_seq_len, bos, eos)
    if not examples:
        raise ValueError(
            f"{path}: empty dataset (no sample with at least 2 tokens); add non-empty samples to the file"
        )
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example.

    Padding gets ``attention_mask`` 0 and label ``IGNORE_INDEX`` so it neither is attended to nor
    contributes loss; ``pad_id`` itself therefore only has to be a valid vocabulary id.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example.input_ids) for example in examples)
    input_ids, attention_mask, labels = [], [], []
    for example in examples:
        pad = width - len(example.input_ids)
        input_ids.append([*example.input_ids, *([pad_id] * pad)])
        attention_mask.append([1] * len(example.input_ids) + [0] * pad)
        labels.append([*example.labels, *([IGNORE_INDEX] * pad)])
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def batch_order(indices: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle ``indices`` deterministically for ``(seed, epoch)`` and cut them into batches.

    Seeding through ``SeedSequence((seed, epoch))`` gives every epoch an independent, reproducible
    permutation without carrying RNG state between epochs.  The last, shorter batch is kept so every
    sample is seen exactly once per epoch.
    """
    _check_batch_size(batch_size)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    order = [int(indices[i]) for i in rng.permutation(len(indices))]
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def typical_seq_len(examples: Sequence[Example], indices: Sequence[int], batch_size: int, seed: int) -> int:
    """Mean padded length of a batch over one epoch (batches pad to their longest sample): the sequence
    length at which the scheduler's probes time a layer."""
    batches = batch_order(indices, batch_size, seed, 0)
    return round(sum(max(len(examples[i].input_ids) for i in b) for b in batches) / len(batches))


class BatchStream:
    """Endless deterministic stream of batches over one client's shard: epoch after epoch of batch_order(...).

    The whole position is ``(epoch, position)``; the per-epoch order is recomputed from the seed, so
    resuming needs only :meth:`state_dict` and skipping ahead costs no collation.
    """

    def __init__(
        self, examples: Sequence[Example], indices: Sequence[int], batch_size: int, seed: int, pad_id: int
    ) -> None:
        _check_batch_size(batch_size)
        if len(indices) == 0:
            raise ValueError("BatchStream needs at least one sample index (this client's shard is empty)")
        out_of_range = [int(i) for i in indices if not 0 <= i < len(examples)]
        if out_of_range:
            raise ValueError(
                f"BatchStream: sample indices {out_of_range[:5]} are outside the dataset of "
                f"{len(examples)} examples"
            )
        self._examples = examples
        self._indices = tuple(int(i) for i in indices)
        self._batch_size = batch_size
        self._seed = seed
        self._pad_id = pad_id
        self.batches_per_epoch = math.ceil(len(self._indices) / batch_size)
        self._epoch = 0
        self._position = 0  # invariant: 0 <= position < batches_per_epoch
        self._order: list[list[int]] = []
        self._order_epoch = -1  # epoch that self._order was computed for

    def next(self) -> dict[str, torch.Tensor]:
        """Return the batch at the current position and advance by one."""
        if self._order_epoch != self._epoch:
            self._order = batch_order(self._indices, self._batch_size, self._seed, self._epoch)
            self._order_epoch = self._epoch
        batch = collate([self._examples[i] for i in self._order[self._position]], self._pad_id)
        self.skip(1)
        return batch

    def skip(self, n: int) -> None:
        """Advance ``n`` batches without collating them (crossing epoch boundaries as needed)."""
        if n < 0:
            raise ValueError(f"cannot skip a negative number of batches ({n})")
        epochs, self._position = divmod(self._position + n, self.batches_per_epoch)
        self._epoch += epochs

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(
                f"BatchStream state {state} is out of range (epoch >= 0, 0 <= position < "
                f"{self.batches_per_epoch}); was it saved with a different shard or batch size?"
            )
        self._epoch, self._position = epoch, position


def eval_batches(
    examples: Sequence[Example], indices: Sequence[int], batch_size: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Collate ``indices`` in the given order (no shuffle) so evaluation is comparable across runs."""
    _check_batch_size(batch_size)
    order = [int(i) for i in indices]
    return [
        collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        for start in range(0, len(order), batch_size)
    ]
