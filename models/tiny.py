"""The project's built-in default model and dataset, made entirely offline.

Everything here is generated locally so the runtime can be exercised end to end
(tests, demos, CI) without the Hugging Face hub:

* a character-level tokenizer over printable ASCII,
* a family of digit-list tasks with checkable answers and widely varying lengths,
* a small ``LlamaForCausalLM`` pretrained on some of those tasks so it knows the
  ``"<task>: d d d = d d d"`` format, and
* a fine-tuning dataset for a task the base model never saw (``sort``), so LoRA
  fine-tuning has something real to adapt.

Records are ``{"prompt": ..., "response": ...}``; the training text is
``<s> + prompt + response + </s>`` with the loss on the response (and ``</s>``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
# Order fixes the ids: <pad> must be 0 so zero-filled buffers are padding.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
# \x0b, \x0c and \r never occur in our data and only make round-trips ambiguous.
VOCAB_CHARS = tuple(c for c in string.printable if c not in "\x0b\x0c\r")

PRETRAIN_TASKS = ("rsort", "runiq", "max", "min")
FINETUNE_TASK = "sort"
TASKS = (*PRETRAIN_TASKS, FINETUNE_TASK)
MIN_ITEMS, MAX_ITEMS = 1, 29
# Longest text: "rsort: " + 29 digits + " =" + 29 digits + <s> + </s> = 126 tokens,
# so every example fits the usual max_seq_len of 128 without truncation.
MAX_TEXT_TOKENS = 128

MODEL_KWARGS: dict[str, int | float | bool] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
}
DEFAULT_PRETRAIN_STEPS = 260
_PRETRAIN_BATCH = 32
_PRETRAIN_LR = 3e-3
_BUCKET_POOL_BATCHES = 16
# Bump when the tokenizer or training recipe change in a way the cache parameters
# below do not capture, so stale cached builds are redone.
_BUILD_VERSION = 1
_MODEL_MARKER = "build_info.json"
_DATA_MARKER = "data_info.json"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Return a character-level fast tokenizer: one token per printable ASCII character.

    No post-processor is set, so nothing adds ``<s>``/``</s>`` implicitly: the data
    loader owns that decision. ``clean_up_tokenization_spaces`` is off because the
    default clean-up would rewrite " ." to "." and break ``decode(encode(s)) == s``.
    """
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *VOCAB_CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # [\s\S] rather than "." so newlines are single tokens too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=int(MODEL_KWARGS["max_position_embeddings"]),
    )


# Each task maps the input digits to the answer digits; all share one text format.
# The pretraining tasks only need the multiset of input digits, which a small
# transformer reads within a few hundred steps; positional tasks (copy, reverse,
# increment each digit) were tried and sat on a loss plateau beyond the CPU budget.
# Every pretraining list comes out in descending order, so the ascending "sort"
# is new: the base confidently answers it wrongly, and LoRA has a real change to learn
# on top of skills it has (reading the digits, counting repeats, finding the min).
TASK_FUNCTIONS: dict[str, Callable[[list[int]], list[int]]] = {
    "rsort": lambda digits: sorted(digits, reverse=True),
    "runiq": lambda digits: sorted(set(digits), reverse=True),
    "max": lambda digits: [max(digits)],
    "min": lambda digits: [min(digits)],
    "sort": sorted,
}


def _check_task(task: str) -> None:
    if task not in TASK_FUNCTIONS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASK_FUNCTIONS)}")


def make_example(task: str, digits: list[int]) -> dict[str, str]:
    """Format one example, e.g. ``{"prompt": "sort: 8 3 1 =", "response": " 1 3 8"}``."""
    _check_task(task)
    answer = TASK_FUNCTIONS[task](digits)
    return {
        "prompt": f"{task}: {' '.join(map(str, digits))} =",
        "response": "".join(f" {d}" for d in answer),
    }


def _example_stream(task: str, rng: random.Random) -> Iterator[dict[str, str]]:
    tasks = PRETRAIN_TASKS if task == "pretrain" else (task,)
    while True:
        # Uniform length gives texts from 10 to 124 characters.
        n_items = rng.randint(MIN_ITEMS, MAX_ITEMS)
        yield make_example(rng.choice(tasks), [rng.randrange(10) for _ in range(n_items)])


def generate_examples(task: str, n: int, seed: int) -> list[dict[str, str]]:
    """Return ``n`` deterministic examples of ``task``.

    ``task`` is one of ``TASKS``, or ``"pretrain"`` for the uniform mixture of
    ``PRETRAIN_TASKS``. The stream is keyed by task and seed, so the same call always
    gives the same list and different tasks never share digit sequences by accident.
    """
    stream = _example_stream(task, random.Random(f"{task}:{seed}"))
    return [next(stream) for _ in range(n)]


def write_jsonl(records: list[dict[str, str]], path: str | Path) -> None:
    """Write one JSON object per line, atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _encode_batch(
    tokenizer: PreTrainedTokenizerFast, records: list[dict[str, str]]
) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the response and ``</s>`` only."""
    rows: list[tuple[list[int], list[int]]] = []
    for record in records:
        prompt = [tokenizer.bos_token_id, *tokenizer.encode(record["prompt"])]
        response = [*tokenizer.encode(record["response"]), tokenizer.eos_token_id]
        rows.append((prompt + response, [-100] * len(prompt) + response))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _length_bucketed_batches(rng: random.Random) -> Iterator[list[dict[str, str]]]:
    """Yield pretraining batches of similar-length examples.

    Training is compute bound on CPU, and random batches would be padded to ~126
    tokens when the mean is ~70; grouping a pool by length nearly halves the cost.
    """
    stream = _example_stream("pretrain", rng)
    while True:
        pool = sorted(
            (next(stream) for _ in range(_PRETRAIN_BATCH * _BUCKET_POOL_BATCHES)),
            key=lambda r: len(r["prompt"]) + len(r["response"]),
        )
        batches = [pool[i : i + _PRETRAIN_BATCH] for i in range(0, len(pool), _PRETRAIN_BATCH)]
        rng.shuffle(batches)
        yield from batches


def _pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, *, steps: int, seed: int) -> float:
    """Full fine-tune on fresh pretraining examples each step; return the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=_PRETRAIN_LR, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        # Linear warmup, then cosine down to 10%: stable start, settled end.
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batches = _length_bucketed_batches(random.Random(f"pretrain-run:{seed}"))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(**_encode_batch(tokenizer, next(batches))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def _data_params() -> dict[str, Any]:
    """What shapes the generated text; part of every cache key so task edits invalidate caches."""
    return {
        "pretrain_tasks": list(PRETRAIN_TASKS),
        "finetune_task": FINETUNE_TASK,
        "items": [MIN_ITEMS, MAX_ITEMS],
    }


def _read_marker(folder: Path, marker: str) -> dict[str, Any] | None:
    try:
        return json.loads((folder / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serialise builders of one folder: torchrun ranks often all ask for it at once."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Swap a finished build into place; callers hold the build lock."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)


def _remove_stale_temps(out_dir: Path) -> None:
    # Left behind only by killed builds; safe to delete because we hold the lock.
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
    force: bool = False,
) -> Path:
    """Build (or reuse) the default base model and tokenizer in ``out_dir``.

    A folder whose ``build_info.json`` matches these parameters is reused as is.
    Otherwise the model is built in a temporary sibling folder, the marker is
    written last, and the folder is renamed into place, replacing ``out_dir``
    entirely; so a killed build never leaves a folder that looks complete.
    ``out_dir`` therefore belongs to this function: keep nothing else in it.
    Concurrent callers (every torchrun rank) are serialised by a sibling
    ``.<name>.lock`` file, so exactly one builds and the others reuse its result.
    """
    out_dir = Path(out_dir).resolve()
    params = {
        "version": _BUILD_VERSION,
        "seed": seed,
        "pretrain_steps": pretrain_steps,
        "model": MODEL_KWARGS,
        **_data_params(),
    }
    with _build_lock(out_dir):
        info = _read_marker(out_dir, _MODEL_MARKER)
        if not force and info is not None and info.get("params") == params:
            return out_dir
        _remove_stale_temps(out_dir)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
        try:
            info = _build_into(tmp_dir, seed=seed, pretrain_steps=pretrain_steps)
            info["params"] = params
            (tmp_dir / _MODEL_MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
            _publish(tmp_dir, out_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _build_into(folder: Path, *, seed: int, pretrain_steps: int) -> dict[str, Any]:
    started = time.monotonic()
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_KWARGS,
    )

    def build() -> tuple[LlamaForCausalLM, float]:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        try:
            # fork_rng keeps the caller's global RNG state untouched by our seeding.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = LlamaForCausalLM(config)
                return model, _pretrain(model, tokenizer, steps=pretrain_steps, seed=seed)
        finally:
            torch.set_num_threads(previous_threads)

    # On a short-lived thread: the OpenMP workers its ops start end with it, and do not stay on in
    # the caller's process (runtime/compute.py says why that matters).
    with ThreadPoolExecutor(1) as pool:
        model, final_loss = pool.submit(build).result()
    model.save_pretrained(folder)  # safetensors is the only format in transformers 5
    tokenizer.save_pretrained(folder)
    return {"final_pretrain_loss": final_loss, "build_seconds": round(time.monotonic() - started, 1)}


def build_demo_data(
    out_dir: str | Path, seed: int = 0, n_train: int = 2048, n_eval: int = 128
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of the fine-tuning task; reuse a matching build.

    Eval prompts never occur in the train set, so eval measures generalisation.
    """
    out_dir = Path(out_dir)
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    params = {"version": _BUILD_VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval, **_data_params()}
    with _build_lock(out_dir):
        info = _read_marker(out_dir, _DATA_MARKER)
        if info == params and train_path.exists() and eval_path.exists():
            return train_path, eval_path
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / _DATA_MARKER).unlink(missing_ok=True)
        train = generate_examples(FINETUNE_TASK, n_train, seed)
        seen = {record["prompt"] for record in train}
        eval_stream = _example_stream(FINETUNE_TASK, random.Random(f"{FINETUNE_TASK}:eval:{seed}"))
        evaluation: list[dict[str, str]] = []
        while len(evaluation) < n_eval:
            record = next(eval_stream)
            if record["prompt"] not in seen:
                seen.add(record["prompt"])
                evaluation.append(record)
        write_jsonl(train, train_path)
        write_jsonl(evaluation, eval_path)
        (out_dir / _DATA_MARKER).write_text(json.dumps(params), encoding="utf-8")
    return train_path, eval_path
