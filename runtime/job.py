"""What every role needs that involves no process group: paths, data shards, LoRA settings, optimizers.

Both the split run (``runtime.run``) and the unsplit reference (``runtime.local``) build their
inputs here, so the two see the same data, order and LoRA initialisation.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, PretrainedConfig

from models.datasets import IGNORE_INDEX, Example, load_examples
from models.families import FAMILIES, family_of
from models.generate import has_response
from models.lora import LoraSpec
from models.stages import CheckpointReader, load_config
from partition import iid_partition, length_dirichlet_partition
from runtime.config import MALLOC_KEEP_MAX_MB, Config, ConfigError

REPO = Path(__file__).resolve().parent.parent
BUILTIN_MODEL = "builtin:tiny"
BUILTIN_DATA = "builtin:sort"


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITFT_CACHE", REPO / ".cache" / "splitft"))


def resolve_model_path(cfg: Config) -> Path:
    """The model folder; ``builtin:tiny`` is built once into the cache (file-locked, so ranks can race)."""
    if cfg.model.path == BUILTIN_MODEL:
        from models.tiny import build_tiny_model

        folder = cache_dir() / "tiny-llama"
        if not (folder / "build_info.json").is_file() and os.environ.get("RANK", "0") == "0":
            print(
                f"building the built-in model into {folder} (done once; it pretrains for some minutes "
                "on CPU) ...",
                file=sys.stderr,
                flush=True,
            )
        return build_tiny_model(folder)
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.path={cfg.model.path!r}: no config.json there; point it at a local Hugging Face "
            f"checkpoint folder (save_pretrained output) or use {BUILTIN_MODEL}"
        )
    return path


def resolve_data_paths(cfg: Config) -> tuple[Path, Path]:
    """(train, eval) data files; ``builtin:sort`` is the generated sort task in the cache."""
    builtin: tuple[Path, Path] | None = None
    if BUILTIN_DATA in (cfg.data.train_path, cfg.data.eval_path):
        from models.tiny import build_demo_data

        builtin = build_demo_data(cache_dir() / "data")
    paths = []
    for i, (key, value) in enumerate(
        (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path))
    ):
        if value == BUILTIN_DATA:
            paths.append(builtin[i])
            continue
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{key}={value!r}: no such file; give a .txt or .jsonl file or {BUILTIN_DATA}")
        paths.append(path)
    return paths[0], paths[1]


def lora_spec(cfg: Config, model_config: PretrainedConfig) -> LoraSpec:
    targets = tuple(cfg.lora.targets) if cfg.lora.targets else family_of(model_config).lora_targets
    return LoraSpec(
        r=cfg.lora.r, alpha=cfg.lora.alpha, r_cut=cfg.lora.r_cut, targets=targets, dropout=cfg.lora.dropout
    )


def model_config(model_path: Path) -> PretrainedConfig:
    """The checkpoint's HF config, after checking that this runtime can split and load it: a causal-LM
    family it knows, and weights in safetensors form (ConfigError naming the problem otherwise)."""
    try:
        config = load_config(model_path)
    except (ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.path={str(model_path)!r}: its config.json cannot be read ({first}); point model.path at "
            "a folder written by save_pretrained"
        ) from None
    if config.model_type not in FAMILIES:
        kind = (
            "is not a causal LM" if not _is_causal_lm(config) else "is a causal LM family not supported yet"
        )
        raise ConfigError(
            f"model.path={str(model_path)!r}: model_type {config.model_type!r} {kind}; supported model "
            f"types: {', '.join(sorted(FAMILIES))}. Use a checkpoint of one of those"
        )
    try:
        CheckpointReader(model_path)
    except FileNotFoundError as e:
        raise ConfigError(f"model.path={str(model_path)!r}: {e}") from None
    return config


def _is_causal_lm(config: PretrainedConfig) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    )


@dataclass
class ClientData:
    """One client's view of the data: its training shard and its share of the held-out set."""

    examples: list[Example]
    shard: list[int]
    eval_examples: list[Example]
    eval_indices: list[int]
    pad_id: int
    heldout: list[int] = field(default_factory=list)  # eval.client_fraction: its own held-back examples
    generate_indices: list[int] = field(default_factory=list)  # eval.generate: its share of the prompts


def load_tokenizer(model_path: Path):
    """The checkpoint's tokenizer. One without a pad token (GPT-2 style) pads with its eos token: padded
    positions are masked out of attention and loss, so the id only has to exist."""
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.path={str(model_path)!r}: no usable tokenizer there ({first}); save the model's "
            "tokenizer into the same folder (tokenizer.save_pretrained)"
        ) from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError(
                f"model.path={str(model_path)!r}: the tokenizer has neither a pad nor an eos token, so "
                "batches cannot be padded; add one (tokenizer.add_special_tokens({'pad_token': ...})) "
                "and save it again"
            )
        tok.pad_token = tok.eos_token
    return tok


def partition_shards(cfg: Config, examples: list[Example], n_clients: int) -> list[list[int]]:
    """Every rank computes the same shards from the seed (no communication needed)."""
    d = cfg.data
    try:
        if d.partition == "iid":
            return iid_partition(len(examples), n_clients, cfg.seed, min_samples=d.min_samples)
        lengths = [len(e.input_ids) for e in examples]
        return length_dirichlet_partition(
            lengths, n_clients, d.alpha, min(d.n_buckets, len(examples)), cfg.seed, min_samples=d.min_samples
        )
    except ValueError as e:  # the partitioner counts clients from 0; the run names them by rank
        said = re.sub(r"^client (\d+)", lambda m: f"client {int(m.group(1)) + 1}", str(e))
        raise ConfigError(
            f"data.partition={d.partition}: {said} (the settings: data.alpha, data.n_buckets, "
            "data.min_samples)"
        ) from None


@dataclass
class FederationData:
    """A worker's view of the data: every client's training shard (the data are tokenised and
    partitioned over the N clients once) and the worker's share of the held-out set."""

    examples: list[Example]
    shards: dict[int, list[int]]  # client id (1..N) -> its training examples
    eval_examples: list[Example]
    eval_indices: list[int]
    pad_id: int
    heldout: dict[int, list[int]] = field(default_factory=dict)  # client -> its held-back examples
    generate_indices: list[int] = field(default_factory=list)  # eval.generate: the worker's share

    def client(self, c: int) -> ClientData:
        return ClientData(
            self.examples,
            self.shards[c],
            self.eval_examples,
            self.eval_indices,
            self.pad_id,
            self.heldout.get(c, []),
            self.generate_indices,
        )


def federation_data(
    cfg: Config, model_path: Path, n_clients: int, worker_index: int, n_workers: int
) -> FederationData:
    """Loads the data once and partitions it over ``n_clients`` clients (so client i's shard depends on
    N only, never on the workers); worker ``worker_index`` (0-based) evaluates every ``n_workers``-th
    held-out example."""
    tok = load_tokenizer(model_path)
    train_path, eval_path = resolve_data_paths(cfg)
    examples = load_examples(train_path, tok, cfg.data.max_seq_len, cfg.data.format)
    shards = {c: shard for c, shard in enumerate(partition_shards(cfg, examples, n_clients), start=1)}
    heldout = {}
    if cfg.eval.client_fraction > 0:
        for c, shard in shards.items():
            shards[c], heldout[c] = hold_out(shard, cfg.eval.client_fraction, cfg.seed, c)
    eval_examples = load_examples(eval_path, tok, cfg.data.max_seq_len, cfg.data.format)
    if cfg.data.max_eval_samples:
        eval_examples = eval_examples[: cfg.data.max_eval_samples]
    prompts = generation_sample(cfg, eval_examples)
    return FederationData(
        examples=examples,
        shards=shards,
        eval_examples=eval_examples,
        eval_indices=list(range(worker_index, len(eval_examples), n_workers)),
        pad_id=tok.pad_token_id,
        heldout=heldout,
        generate_indices=prompts[worker_index::n_workers],
    )


def holdout_seed(seed: int, client: int) -> int:
    return seed * 1_000_003 + 7919 * client + 17


def hold_out(shard: list[int], fraction: float, seed: int, client: int) -> tuple[list[int], list[int]]:
    """(training part, held-back part) of client ``client``'s shard: ``fraction`` of it (at least one
    sample) drawn from (seed, client), so the same whatever the number of workers. A ConfigError
    naming eval.client_fraction if no training sample would be left."""
    n_held = max(1, round(fraction * len(shard)))
    if n_held >= len(shard):
        raise ConfigError(
            f"eval.client_fraction={fraction} leaves client {client} without training data (its shard has "
            f"{len(shard)} sample(s), {n_held} held back); lower eval.client_fraction or raise "
            "data.min_samples"
        )
    held = set(random.Random(holdout_seed(seed, client)).sample(range(len(shard)), n_held))
    return [s for i, s in enumerate(shard) if i not in held], [s for i, s in enumerate(shard) if i in held]


def generation_sample(cfg: Config, eval_examples: list[Example]) -> list[int]:
    """eval.generate: the eval examples whose responses are decoded (a fixed sample, drawn from the seed,
    in eval order). A ConfigError naming eval.generate if the eval data has no responses."""
    n = cfg.eval.generate
    if n == 0:
        return []
    if not all(has_response(e) for e in eval_examples):
        raise ConfigError(
            f"eval.generate={n} decodes the response of eval prompts, but data.eval_path="
            f'{cfg.data.eval_path!r} has no prompt/response records: give JSONL with "prompt" and '
            '"response" fields (data.format=jsonl_prompt) or set eval.generate=0'
        )
    return sorted(random.Random(cfg.seed).sample(range(len(eval_examples)), min(n, len(eval_examples))))


def worker_data(cfg: Config, model_path: Path, rank: int, world_size: int) -> ClientData | FederationData:
    """What worker ``rank`` (>= 1) trains on: its client's data, or with more clients than workers
    (``split.clients``) every client's shard."""
    n_clients, n_workers = cfg.n_clients(world_size), world_size - 1
    if n_clients == n_workers:
        return client_data(cfg, model_path, rank - 1, n_workers)
    return federation_data(cfg, model_path, n_clients, rank - 1, n_workers)


def client_data(cfg: Config, model_path: Path, client_index: int, n_clients: int) -> ClientData:
    """Loads the data and keeps what client ``client_index`` (0-based) owns (one client per worker)."""
    return federation_data(cfg, model_path, n_clients, client_index, n_clients).client(client_index + 1)


def round_seed(seed: int, rank: int, rnd: int) -> int:
    """Every rank's global RNG is reseeded each round from (seed, rank, round): dropout and anything
    else that draws from it does the same on a resumed run as on the uninterrupted one, whatever the
    start-up (probes, a different number of earlier rounds in this process) consumed."""
    return (seed * 1_000_003 + rank) * 100_003 + rnd


def stage_kwargs(cfg: Config) -> dict:
    """How every stage and moved layer of this run is built (``build_stage`` / ``build_layers``)."""
    return {"dtype": cfg.model.dtype, "attn_implementation": cfg.model.attn_implementation}


def make_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """AdamW, made afresh each round: the weights it tracked were replaced by the aggregate.

    Fused (one kernel per parameter) where torch has that kernel, on CPU and CUDA: a LoRA adapter is
    many small tensors, and the default per-tensor loop takes 5.0 ms a step for a four-layer stage's
    56 of them against 0.7 ms fused (``python -m benchmarks.investigations.optimizer_step``, 2 intra-op
    threads)."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None
    )


def schedule_factor(kind: str, step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The learning rate of global step ``step`` (1-based, of ``total``) as a fraction of the peak:
    ``step / warmup`` during the warm-up, then constant, linear or cosine from 1 down to ``min_ratio``
    at the last step."""
    if step <= warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # (0, 1]: the last step is 1
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.lr_schedule={kind!r}: use constant, linear or cosine")


def learning_rate(cfg: Config, rnd: int, step: int) -> float:
    """The learning rate of local step ``step`` (1-based) of round ``rnd``: one schedule over the run's
    global step, the same for every client and server replica and for ``launch.train_local``, so a
    resumed run takes the rates the uninterrupted one took. Round 0 (the importance warm-up) trains at
    ``train.lr``."""
    t = cfg.train
    if rnd < 1:
        return t.lr
    g = (rnd - 1) * t.local_steps + step
    return t.lr * schedule_factor(t.lr_schedule, g, t.rounds * t.local_steps, t.warmup_steps, t.min_lr_ratio)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def squared_grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """The sum of squares of these parameters' gradients (float64): one side's share of the chain's
    squared norm, which the two sides of a split add up before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum())


def clip_factor(squared_norm: float, max_norm: float) -> float:
    """What the gradients are multiplied by to clip their global norm to ``max_norm``:
    ``torch.nn.utils.clip_grad_norm_``'s ``max_norm / (norm + 1e-6)``, at most 1. Both sides of a split
    compute it from the same chain norm, so they scale by the same factor."""
    return min(1.0, max_norm / (math.sqrt(squared_norm) + 1e-6))


def scale_grads(params: Iterable[torch.nn.Parameter], factor: float) -> None:
    if factor == 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


def exchanges_norms(cfg: Config) -> bool:
    """Whether the two sides of a split swap their squared gradient norms every step: to clip by the
    chain's norm, and under float16 to agree on skipping a step whose gradients overflowed."""
    return cfg.train.max_grad_norm is not None or cfg.train.autocast == "float16"


def step_factor(squared_norm: float, scale: float, max_norm: float | None) -> float | None:
    """What a step's (loss-scaled) gradients are multiplied by before the optimizer step, from the chain's
    squared norm of them: None (skip the step) when it is not finite under a loss scale (``scale`` > 1:
    float16 overflowed somewhere on the chain), else ``1 / scale`` (unscaling) times the clipping factor
    of the unscaled norm."""
    if scale != 1.0 and not math.isfinite(squared_norm):
        return None
    factor = 1.0 / scale
    if max_norm is not None:
        factor *= clip_factor(squared_norm / scale**2, max_norm)
    return factor


@dataclass
class LossScale:
    """float16's dynamic loss scale, as ``torch.amp.GradScaler`` keeps it (its defaults): halved at a step
    whose gradients overflowed (the step is skipped), doubled after 2000 steps in a row without. A server
    replica keeps its chain's, and sends it with every forward's reply; the checkpoint keeps it."""

    scale: float = 2.0**16
    growth_tracker: int = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale, self.growth_tracker = self.scale * 0.5, 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == 2000:
            self.scale, self.growth_tracker = self.scale * 2.0, 0


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's mixed precision (``train.autocast``); a no-op context for none. Autocast state is
    per thread: enter it on the thread that computes."""
    if cfg.train.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.train.autocast))


def loss_logits(cfg: Config, logits: torch.Tensor) -> torch.Tensor:
    """The logits a loss is taken of: float32 under ``train.autocast`` (they come out in its dtype)."""
    return logits.float() if cfg.train.autocast != "none" else logits


def check_autocast(cfg: Config, device: torch.device) -> None:
    """ConfigError when this device cannot run the forward under ``train.autocast`` (float16 on a CPU
    whose torch build lacks the kernels), found by running one small matmul as the run would."""
    if cfg.train.autocast == "none":
        return
    try:
        with autocast(cfg, device):
            x = torch.ones(4, 4, device=device, requires_grad=True)
            (x @ x).float().sum().backward()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"train.autocast={cfg.train.autocast}: this {device.type} cannot compute under it ({first}); "
            "use train.autocast=none, or a device that has these kernels (a GPU)"
        ) from None


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The positions of a batch that have a target (what its loss is averaged over)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_weights(batches: list[dict[str, torch.Tensor]]) -> list[float | None]:
    """``train.grad_accum``: each micro-batch's share of the step's target tokens, by which its loss is
    scaled so that the gradients add up to those of one batch of all of them (None: a single batch,
    unscaled)."""
    if len(batches) == 1:
        return [None]
    total = max(sum(target_tokens(b) for b in batches), 1)
    return [target_tokens(b) / total for b in batches]


def data_seed(cfg: Config, client_index: int) -> int:
    return cfg.seed * 1000 + client_index


def tune_malloc(arenas: int, keep_mb: int) -> None:
    """Sets glibc's malloc for a training process, before the RPC thread pool starts.

    ``arenas`` > 0 caps its arenas (``M_ARENA_MAX``; glibc's default is 8 per core). ``keep_mb`` > 0
    keeps freed memory in the process for reuse: the top of a heap goes back to the OS only beyond
    ``keep_mb`` MiB free (``M_TRIM_THRESHOLD``), and blocks up to 32 MiB come from the heaps, not from
    mmap (``M_MMAP_THRESHOLD``). A step frees its activations and the next one allocates them again;
    returned, they are page-faulted in again. A no-op where libc is not glibc.
    """
    if arenas <= 0 and keep_mb <= 0:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # from malloc.h
    if arenas > 0:
        libc.mallopt(m_arena_max, arenas)
    if keep_mb > 0:
        libc.mallopt(m_trim_threshold, min(keep_mb, MALLOC_KEEP_MAX_MB) * 2**20)
        libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads(local_world_size: int) -> int:
    return max(1, usable_cores() // max(1, local_world_size))
