"""The one run configuration: typed sections, read from YAML plus ``key=value`` overrides, validated once.

Every error names the field and says how to fix it, and validation happens before any
process group starts, so a bad config costs nothing on a cluster.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models.wire import WIRE_DTYPES


class ConfigError(ValueError):
    """A config field is wrong; the message names the field and the fix."""


@dataclass
class ModelConfig:
    path: str = "builtin:tiny"
    """A local Hugging Face causal-LM folder (config.json + safetensors), or ``builtin:tiny``."""
    dtype: str = "float32"
    """Weights and activations: float32, bfloat16 or float16."""
    attn_implementation: str | None = None
    """Passed to transformers (``sdpa``, ``eager``); None lets transformers choose."""


@dataclass
class DataConfig:
    train_path: str = "builtin:sort"
    """Training data: .txt (a sample per line), JSONL with ``text``, or JSONL with ``prompt``/``response``."""
    eval_path: str = "builtin:sort"
    """Held-out data in the same formats; evaluated on the global model every round."""
    format: str = "auto"
    """auto, text, jsonl_text or jsonl_prompt."""
    max_seq_len: int = 128
    """Longer samples are chunked (text) or truncated (prompt/response)."""
    partition: str = "length_dirichlet"
    """How the training set is split over clients: length_dirichlet (SplitFT) or iid."""
    alpha: float = 1.0
    """Dirichlet concentration: smaller means more skewed shards."""
    n_buckets: int = 4
    """Length categories K of the length-based Dirichlet split."""
    min_samples: int = 8
    """A client's shard must hold at least this many samples (else re-drawn, then an error)."""
    max_eval_samples: int = 0
    """Evaluate on at most this many held-out samples (0: all)."""


@dataclass
class LoraSection:
    r: int = 8
    """LoRA rank on every target module."""
    alpha: float = 16.0
    """LoRA alpha; the scaling alpha/r is kept for every rank."""
    r_cut: int = 4
    """Reduced rank on each client's cut layer (its last layer), as in SplitFT."""
    targets: list[str] | None = None
    """Target module names inside a decoder layer; None uses the family's defaults."""
    dropout: float = 0.0
    """LoRA dropout (0 keeps split and unsplit runs bit-comparable)."""
    client_ranks: list[int] | str | None = None
    """HSplitLoRA: each client's own LoRA rank on its layers (one per client, each in 1..lora.r; its cut
    layer gets min(this, r_cut)); auto: the largest rank that fits each client's measured memory at its
    planned cut; None: lora.r for every client. Server replicas always use lora.r."""
    selection: str = "all"
    """Which weights get LoRA: all (every lora.targets module at rank r) or importance (HSplitLoRA: a
    warm-up scores every linear weight of the decoder layers and ranks go where the score is high)."""
    budget: float = 0.5
    """selection=importance: trainable parameters as a fraction of placing rank r on every lora.targets
    module (the uniform placement)."""
    warmup_steps: int = 4
    """selection=importance: steps of each client's warm-up that score the weights."""


@dataclass
class TrainConfig:
    rounds: int = 5
    """Federated rounds; each ends with aggregation, evaluation and a checkpoint."""
    local_steps: int = 20
    """Optimizer steps each client takes per round."""
    batch_size: int = 8
    """Per-client micro-batch size."""
    eval_batch_size: int = 32
    """Batch size of the held-out evaluation."""
    lr: float = 1e-3
    """AdamW learning rate (client and server side alike): the peak of ``lr_schedule``."""
    lr_schedule: str = "constant"
    """How the learning rate moves over the run's global step (round and local step, the same on every
    client and server replica): constant, linear (to ``min_lr_ratio`` x lr at the last step) or cosine
    (likewise, on a half cosine); each after ``warmup_steps`` of linear warm-up."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps to lr at the start of the run (0: none)."""
    min_lr_ratio: float = 0.0
    """linear and cosine: the last step's learning rate as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    aggregation: str = "fedavg"
    """How the clients' adapters become one model: fedavg (A and B averaged per component over the copies
    that hold it), stack (the exact weighted sum of the copies' B@A, merged into the frozen weights each
    round; lossless for any mix of ranks) or svd (that exact sum cut back to each rank by SVD)."""
    clients_per_round: int | None = None
    """Clients sampled to train each round (None: every client). The others sit the round out: they keep
    their data position, contribute nothing to the aggregate, and take the global adapter. The draw is
    seeded from (seed, round), so every rank and every relaunch draws the same clients."""
    client_sampling: str = "uniform"
    """How the clients of a round are drawn, without replacement: uniform, or by_samples (in proportion
    to each client's number of training samples)."""
    max_grad_norm: float | None = None
    """Clips each optimizer step's LoRA gradients to this global norm, taken over the whole chain (the
    client's layers and its server replica's together, as the unsplit model would); None: no clipping."""
    grad_accum: int = 1
    """Micro-batches of ``batch_size`` per optimizer step; the loss is weighted by target tokens, so
    batch b with grad_accum n takes the steps of batch b x n (a local step is one optimizer step)."""
    activation_checkpointing: bool = False
    """Decoder layers (clients' and server replicas') keep only their inputs in the forward and recompute
    their activations in the backward: less activation memory for about one more forward."""
    autocast: str = "none"
    """Mixed precision of the forward: none, bfloat16 or float16 (torch.autocast, on the clients, the
    server replicas and launch.train_local; the loss is taken in float32). The LoRA weights and the
    optimizer stay in float32. float16 scales the loss dynamically (GradScaler's rule; each server
    replica keeps its chain's scale, and the checkpoint keeps it)."""


POLICIES = ("fixed", "manual", "resource", "adaptive")
LR_SCHEDULES = ("constant", "linear", "cosine")
AUTOCASTS = ("none", "bfloat16", "float16")


@dataclass
class SplitConfig:
    policy: str | None = None
    """How cut layers are chosen: fixed (one k for all, the papers' baseline), manual (one k per client),
    resource (minimise the predicted round time under every client's measured memory) or adaptive
    (resource, then re-planned from measured step times and the loss trend). None: fixed for an int
    cut_layers, manual for a list."""
    cut_layers: int | list[int] = 2
    """fixed/manual: each client's cut k (it runs layers 0..k-1), one int or one per client, in 1..L-1.
    adaptive: a list is the plan it starts from (else it starts from the resource plan)."""
    clients: int | None = None
    """N, the federation's clients (None: one per worker, WORLD_SIZE - 1). More clients than workers: each
    worker trains the clients rank 0 assigns it each round one after another, re-cutting its stage to
    each client's cut; each client keeps its own data shard, data position and cut."""
    assignment: str = "predicted"
    """Clients sharing workers: how rank 0 assigns a round's clients to workers. predicted: the longest
    first onto the least loaded worker, then moves and swaps off the busiest, by each client's measured
    training time when it has trained before, else the cost model's prediction; dynamic: predicted, and
    a worker that has trained its own clients takes one not yet started from the worker predicted to
    end last, when it would end it no later (a client slower than predicted, such as one not measured
    yet, no longer holds up those queued behind it; which worker trains whom then follows the clock);
    round_robin: in client order, one worker after another."""
    replan_every: int = 2
    """adaptive: re-plan after every this many rounds."""
    hysteresis: float = 0.1
    """adaptive: move layers only if the predicted round time drops by more than this fraction."""
    smoothing: float = 0.5
    """adaptive: weight of the newest measurement in the running estimates (1: newest only)."""
    memory_headroom: float = 0.1
    """A cut fits a client when its predicted memory times (1 + this) is below what the client has."""
    mode: str = "standard"
    """standard: the server runs every layer from the cut up, the final norm and the LM head (it receives
    the targets). u_shape: each client also keeps the last tail_layers layers, the final norm and the
    head; hidden states go up at the cut and come back down, and the loss is computed on the client, so
    labels, input_ids and logits never leave it."""
    tail_layers: int = 0
    """u_shape: decoder layers at the top of the model that stay on every client (0: norm and head only)."""
    schedule: dict[int, list[int]] | None = None
    """Forced moves, e.g. {2: [3, 1]}: after round 2 switch to these cuts (experiments and tests)."""
    plateau: float = 0.02
    """adaptive: a client whose training loss fell by less than this fraction per round (over the last
    trend_window rounds against the ones before) has plateaued; it gets one layer more when its memory
    holds it and the predicted round time grows by at most ``hysteresis`` (0: off)."""
    trend_window: int = 2
    """adaptive: rounds over which loss trends are measured (a trend needs 2x this many rounds)."""


@dataclass
class SimulateConfig:
    """Simulated heterogeneity for clients that share one machine. Each knob acts on the running client
    (its probe and its training both see it): one value for every client or a list, one per client.
    ``slowdown`` and ``bandwidth_mbps`` also take a schedule, ``{round: value or list}``: each entry holds
    from that round on (the first key must be 1), e.g. ``{1: [1, 1, 2, 4], 4: [4, 1, 1, 2]}``.
    ``slowdown``, ``memory_limit_gb`` and ``bandwidth_mbps`` also take a seeded draw, one value per client
    (``drawn``): ``{lognormal: sigma}`` for ``slowdown`` (the fastest client at 1), ``{lognormal: sigma,
    median: value}`` for the other two."""

    slowdown: float | list[float] | dict[int, float | list[float]] | dict[str, float] = 1.0
    """The client's layer compute really takes this many times longer (>= 1)."""
    memory_limit_gb: float | list[float | None] | dict[int, Any] | dict[str, float] | None = None
    """The client has only this much memory (CPU: RLIMIT_DATA; CUDA: per-process memory fraction). Fixed for
    the run (no schedule): the planner's memory caps come from the start-up probe."""
    bandwidth_mbps: (
        float | list[float | None] | dict[int, float | list[float | None] | None] | dict[str, float] | None
    ) = None
    """The client's link to the server: every send (activations, gradients, adapters) takes size/bandwidth."""
    server_slowdown: float | dict[int, float] = 1.0
    """The server's layer compute really takes this many times longer (>= 1; one value or a schedule
    ``{round: value}``), as when another job shares the server's node; its probe sees it too."""

    def for_client(self, index: int, rnd: int = 1) -> tuple[float, float | None, float | None]:
        """(slowdown, memory_limit_gb, bandwidth_mbps) of client ``index`` (0-based) during round ``rnd``."""
        pick = lambda v: v[index] if isinstance(v, list) else v
        return (
            pick(at_round(self.slowdown, rnd)),
            pick(self.memory_limit_gb),
            pick(at_round(self.bandwidth_mbps, rnd)),
        )

    @property
    def changes(self) -> bool:
        """Whether a knob follows a schedule (its value changes during the run)."""
        knobs = (self.slowdown, self.bandwidth_mbps, self.server_slowdown)
        return any(isinstance(v, dict) and not is_draw(v) for v in knobs)

    def for_server(self, rnd: int = 1) -> float:
        """The server's slowdown during round ``rnd``."""
        return float(at_round(self.server_slowdown, rnd))

    def drawn(self, n_clients: int, seed: int) -> SimulateConfig:
        """This config with every seeded draw replaced by its list of ``n_clients`` values.

        Client i's value depends on the seed, the knob and N only (not on the workers): ``exp(sigma z_i)``
        with ``z`` standard normal from ``numpy.random.default_rng((seed, knob))``, times ``median``, or,
        for ``slowdown`` (a throttle only slows down), divided by the smallest so the fastest client is 1.
        """
        values = {}
        for knob, name in enumerate(DRAWN_KNOBS):
            spec = getattr(self, name)
            if not is_draw(spec):
                continue
            z = np.random.default_rng((seed, knob)).standard_normal(n_clients)
            factors = np.exp(float(spec["lognormal"]) * z)
            scaled = factors / factors.min() if name == "slowdown" else factors * float(spec["median"])
            values[name] = [round(float(v), 6) for v in scaled]
        return dataclasses.replace(self, **values)


DRAWN_KNOBS = ("slowdown", "memory_limit_gb", "bandwidth_mbps")
"""The ``simulate`` knobs that take a seeded per-client draw (the index also seeds the draw)."""


def is_draw(value: Any) -> bool:
    """Whether a ``simulate`` value is a seeded draw (``{lognormal: sigma, ...}``), not a schedule."""
    return isinstance(value, dict) and any(isinstance(k, str) for k in value)


def at_round(value: Any, rnd: int) -> Any:
    """The value a ``simulate`` knob has during round ``rnd``: a schedule's latest entry at or before it."""
    if not isinstance(value, dict):
        return value
    return value[max(k for k in value if k <= rnd)]


MALLOC_KEEP_MAX_MB = 2047  # glibc's M_TRIM_THRESHOLD is a C int of bytes


@dataclass
class RuntimeConfig:
    device: str = "auto"
    """auto (CUDA when every rank has a GPU, else CPU), cpu or cuda."""
    server_gpu: str = "own"
    """On a node with G >= 2 GPUs: own (the server, rank 0, gets cuda:0 to itself and the workers share
    cuda:1..G-1 round-robin) or shared (every rank of the node round-robin on cuda:0..G-1). With one GPU
    every rank shares it; workers on other nodes use all their node's GPUs (``runtime/placement.py``)."""
    aggregation_backend: str = "auto"
    """The adapter all-reduce: auto (NCCL when every rank has a GPU and no two ranks share one, else
    gloo; NCCL refuses two ranks on one device), nccl (an error where that does not hold) or gloo."""
    rpc_timeout_s: float = 600.0
    """Timeout of one RPC (a training step's forward, an evaluation batch) and of the RPC shutdown."""
    round_timeout_s: float = 86400.0
    """Timeout of a collective: rank 0 waits in one for the clients' whole round of training, so this
    bounds a round, not a step. Only a peer that is alive but stuck ever reaches it; a dead or silent
    peer is noticed by the liveness check (``peer_timeout_s``) first."""
    peer_timeout_s: float = 60.0
    """A rank whose heartbeat has not changed for this long is declared lost: every rank that watches it
    stops with a message naming it (clients watch the server, the server watches every client)."""
    stall_timeout_s: float = 900.0
    """No rank's progress (a step, an evaluation batch, a phase, a collective entered or left) for this
    long: the job is stalled; every rank names the rank furthest behind and where it was, and exits 77.
    Longer than ``rpc_timeout_s``, so a single slow step or batch fails on its own timeout first."""
    join_timeout_s: float = 600.0
    """At start-up, every rank waits this long for the others to arrive; a rank that has not is named and
    the attempt ends (exit 77). Covers the ranks' own checks and data loading before they join."""
    rpc_threads: int = 16
    """TensorPipe worker threads on each rank."""
    rpc_transports: list[str] = field(default_factory=lambda: ["uv"])
    """TensorPipe transports. ``uv`` (TCP, event-driven) by default: the same-host ``shm`` transport
    busy-polls a core in every process, which halved split throughput on a 2-core host. Use
    ``[shm, uv]`` where every process has a spare core."""
    resume: str | bool = "auto"
    """auto: continue from the newest complete checkpoint in output_dir if there is one, else start
    (what ``torchrun --max-restarts`` and requeued batch jobs need); true: continue, and refuse to
    start if there is no checkpoint; false: start, and refuse an output_dir that holds a checkpoint."""
    overwrite: bool = False
    """A launch that would start afresh in an output_dir holding another run's results (metrics, adapter,
    side files, a checkpoint it cannot resume) refuses; true moves them into output_dir/previous-<time>/
    first (nothing is deleted) and starts. A checkpoint that runtime.resume continues is kept."""
    keep_checkpoints: int = 2
    """How many round checkpoints (output_dir/checkpoint/round-NNNNNN) to keep, newest first."""
    debug: bool = False
    """Write every holder's pre-aggregation adapter each round and what the server received (tests)."""
    malloc_arenas: int = 2
    """glibc malloc arenas per process (0: glibc's default, 8 per core). RPC requests run on a pool of
    threads, each with its own arena by default, so activation memory freed by one is not reused by
    the next and every step page-faults it in again (benchmarks/RESULTS.md)."""
    malloc_keep_mb: int = MALLOC_KEEP_MAX_MB
    """glibc malloc: freed memory up to this many MiB stays in the process for the next step instead of
    going back to the OS, and blocks up to 32 MiB come from its heaps (0: glibc's dynamic thresholds).
    Without it the server, computing on a thread of its own, page-faulted 90,000-135,000 pages a round
    back in, with it 1,000-8,000 (docs/performance.md). Peak memory is unchanged; memory
    freed after the peak is not returned."""
    intra_op_threads: int = 0
    """torch intra-op threads per process (0: cores / processes on this node)."""
    tensorboard: bool = False
    """Also write every round's scalars of metrics.jsonl as TensorBoard event files under
    output_dir/tensorboard/ (rank 0 only). Needs the tensorboardX package (the ``tensorboard`` extra)."""
    compute_threads: bool = True
    """CPU, more than one intra-op thread: the server runs every tensor op of its replicas on as few
    threads as keep OpenMP's workers within its cores (one when its intra-op threads are more than
    half its cores), and its main thread serially. OpenMP keeps a team of workers per computing
    thread, and with more workers than cores it lets them sleep after every op
    (``runtime/compute.py``). false: the replicas compute on the RPC and autograd threads. No effect
    at one intra-op thread or on a GPU."""


@dataclass
class EvalConfig:
    every: int = 1
    """Evaluate the global model every this many rounds (the last round always); a round not evaluated
    records no eval figures in metrics.jsonl."""
    client_fraction: float = 0.0
    """Hold back this fraction of every client's training shard (at least one sample when > 0, drawn
    from the seed and the client id) and report each client's eval loss on its own held-back samples:
    is the global model good for every client? 0: no hold-out."""
    generate: int = 0
    """Decode greedily, through the split, the responses of this many eval prompts (a fixed sample of
    the eval set) and report exact match and ROUGE-L against the reference responses. Needs
    prompt/response eval data. 0: off."""
    max_new_tokens: int = 64
    """eval.generate: the most tokens decoded per prompt (decoding also stops at eos)."""


@dataclass
class WireConfig:
    dtype: str = "auto"
    """Hidden states up and their gradients down: auto (the model's dtype), float32, bfloat16, float16
    or int8 (float16/int8: per-token absmax scales travel with the values; the gradient through the
    quantiser is straight-through)."""


@dataclass
class Config:
    output_dir: str = "runs/demo"
    """Where metrics.jsonl, adapter/ and checkpoint/ go."""
    seed: int = 0
    """Seeds the partition, the LoRA init and every client's data order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def cut_layers_for(self, n_clients: int) -> list[int]:
        cuts = self.split.cut_layers
        return list(cuts) if isinstance(cuts, list) else [cuts] * n_clients

    @property
    def policy(self) -> str:
        if self.split.policy is not None:
            return self.split.policy
        return "manual" if isinstance(self.split.cut_layers, list) else "fixed"

    def n_clients(self, world_size: int) -> int:
        """N, the federation's clients: split.clients, or one per worker (WORLD_SIZE - 1)."""
        return self.split.clients if self.split.clients is not None else world_size - 1

    @property
    def moves_cuts(self) -> bool:
        """Whether cut layers may change during the run (adaptive, or a schedule of forced moves)."""
        return self.policy == "adaptive" or bool(self.split.schedule)

    @property
    def resume(self) -> str:
        """``runtime.resume`` as one of "auto", "true", "false" (YAML reads true/false as booleans)."""
        r = self.runtime.resume
        return r if isinstance(r, str) else str(r).lower()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {value!r} is not a mapping")
        kt, vt = typing.get_args(tp)
        return {
            _check_type(k, kt, f"{where} key"): _check_type(v, vt, f"{where}[{k}]") for k, v in value.items()
        }
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {value!r} is not a list")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML reads 1e30 or 5e-5 (no dot) as a string: take any number Python reads
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (
        not isinstance(value, tp) or (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: {value!r} is not a {tp.__name__}")
    return value


def _type_name(tp: Any) -> str:
    args, origin = typing.get_args(tp), typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping {_type_name(args[0])} -> ({_type_name(args[1])})"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}: valid keys here are {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Applies ``a.b.c=value`` (value parsed as YAML) to the nested dict ``data``."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value (e.g. train.rounds=3)")
    key, raw = override.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {override!r}: the value is not valid YAML ({_yaml_problem(e)}); quote it or close its "
            "brackets, e.g. split.cut_layers=[1,2]"
        ) from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{context}, {problem}" if context else problem


def _read_yaml(p: Path) -> Any:
    """The file's YAML; a syntax error names the file, the line and the column."""
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text: save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark, start = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        opened = (
            f", in what starts on line {start.line + 1}" if start and mark and start.line != mark.line else ""
        )
        raise ConfigError(
            f"{where}: YAML syntax error ({_yaml_problem(e)}{opened}); fix that line of the config file "
            "(indentation, a missing ':' or an unclosed bracket or quote)"
        ) from None


def config_from_dict(data: dict[str, Any]) -> Config:
    """A Config from ``Config.to_dict()`` output (a run's saved ``run_config.json``), validated."""
    schedule = data.get("split", {}).get("schedule")
    if schedule:  # JSON keys are strings
        data = {**data, "split": {**data["split"], "schedule": {int(k): v for k, v in schedule.items()}}}
    sim = data.get("simulate") or {}
    data = {
        **data,
        "simulate": {  # a schedule's rounds, not a draw's keys
            k: {int(r) if r.isdigit() else r: x for r, x in v.items()} if isinstance(v, dict) else v
            for k, v in sim.items()
        },
    }
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config (or the defaults), applies overrides and validates the values."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (see torchrun_configs/ for examples)")
        data = _read_yaml(p) or {}
    for o in overrides:
        apply_override(data, o)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _non_finite(node: Any, name: str) -> tuple[str, float] | None:
    """The first inf or nan number in a section, list or schedule, with its ``section.key`` name."""
    if isinstance(node, float) and not math.isfinite(node):
        return name, node
    if isinstance(node, dict):
        children = [(f"{name}.{key}" if name else str(key), value) for key, value in node.items()]
    else:
        children = [(name, value) for value in node] if isinstance(node, list) else []
    for child, value in children:
        found = _non_finite(value, child)
        if found:
            return found
    return None


def validate(cfg: Config) -> None:
    """Range checks that need no model or process group."""
    found = _non_finite(cfg.to_dict(), "")
    if found:  # no field means anything at inf or nan; a range check such as > 0 would let inf through
        name, value = found
        raise ConfigError(f"{name}={value}: must be a finite number (not inf or nan)")
    t, d, lo, rt = cfg.train, cfg.data, cfg.lora, cfg.runtime
    _require(
        cfg.model.dtype in ("float32", "bfloat16", "float16"),
        f"model.dtype={cfg.model.dtype!r}: use float32, bfloat16 or float16",
    )
    _require(
        d.format in ("auto", "text", "jsonl_text", "jsonl_prompt"),
        f"data.format={d.format!r}: use auto, text, jsonl_text or jsonl_prompt",
    )
    _require(d.max_seq_len >= 2, f"data.max_seq_len={d.max_seq_len}: must be at least 2")
    _require(
        d.partition in ("length_dirichlet", "iid"),
        f"data.partition={d.partition!r}: use length_dirichlet or iid",
    )
    _require(d.alpha > 0, f"data.alpha={d.alpha}: must be > 0 (e.g. 0.5 skewed, 100 near-IID)")
    _require(d.n_buckets >= 1, f"data.n_buckets={d.n_buckets}: must be >= 1")
    _require(d.min_samples >= 1, f"data.min_samples={d.min_samples}: must be >= 1")
    _require(d.max_eval_samples >= 0, f"data.max_eval_samples={d.max_eval_samples}: must be >= 0 (0 = all)")
    _require(lo.r >= 1, f"lora.r={lo.r}: must be >= 1")
    _require(1 <= lo.r_cut <= lo.r, f"lora.r_cut={lo.r_cut}: must be in 1..lora.r ({lo.r})")
    _require(lo.alpha > 0, f"lora.alpha={lo.alpha}: must be > 0")
    _require(0 <= lo.dropout < 1, f"lora.dropout={lo.dropout}: must be in [0, 1)")
    _require(lo.targets is None or len(lo.targets) > 0, "lora.targets: give at least one module name or null")
    _require(t.rounds >= 1, f"train.rounds={t.rounds}: must be >= 1")
    _require(t.local_steps >= 1, f"train.local_steps={t.local_steps}: must be >= 1")
    _require(t.batch_size >= 1, f"train.batch_size={t.batch_size}: must be >= 1")
    _require(t.eval_batch_size >= 1, f"train.eval_batch_size={t.eval_batch_size}: must be >= 1")
    _require(t.lr > 0, f"train.lr={t.lr}: must be > 0")
    _require(
        t.lr_schedule in LR_SCHEDULES,
        f"train.lr_schedule={t.lr_schedule!r}: use {', '.join(LR_SCHEDULES[:-1])} or {LR_SCHEDULES[-1]}",
    )
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps}: must be >= 0")
    total = t.rounds * t.local_steps
    _require(
        t.warmup_steps < total,
        f"train.warmup_steps={t.warmup_steps} is not shorter than the run ({t.rounds} rounds x "
        f"{t.local_steps} local steps = {total} steps): lower it or train longer",
    )
    _require(
        0 <= t.min_lr_ratio <= 1,
        f"train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1] (a fraction of train.lr)",
    )
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: must be >= 0")
    _require(
        t.aggregation in ("fedavg", "stack", "svd"),
        f"train.aggregation={t.aggregation!r}: use fedavg, stack or svd",
    )
    _require(
        t.clients_per_round is None or t.clients_per_round >= 1,
        f"train.clients_per_round={t.clients_per_round}: must be >= 1 (or null: every client, every round)",
    )
    _require(
        cfg.split.assignment in ("predicted", "dynamic", "round_robin"),
        f"split.assignment={cfg.split.assignment!r}: use predicted, dynamic or round_robin",
    )
    _require(
        t.client_sampling in ("uniform", "by_samples"),
        f"train.client_sampling={t.client_sampling!r}: use uniform or by_samples",
    )
    _require(
        t.max_grad_norm is None or t.max_grad_norm > 0,
        f"train.max_grad_norm={t.max_grad_norm}: must be > 0 (e.g. 1.0), or null for no clipping",
    )
    _require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum}: must be >= 1 (1: no accumulation)")
    _require(
        t.autocast in AUTOCASTS,
        f"train.autocast={t.autocast!r}: use {', '.join(AUTOCASTS[:-1])} or {AUTOCASTS[-1]}",
    )
    _require(lo.selection in ("all", "importance"), f"lora.selection={lo.selection!r}: use all or importance")
    _require(
        0 < lo.budget <= 1,
        f"lora.budget={lo.budget}: must be in (0, 1] (a fraction of the uniform placement)",
    )
    _require(
        lo.warmup_steps >= 2,
        f"lora.warmup_steps={lo.warmup_steps}: must be >= 2 (LoRA's B starts at zero, so the first step "
        "scores every weight 0)",
    )
    _require(
        lo.client_ranks is None or lo.client_ranks == "auto" or isinstance(lo.client_ranks, list),
        f"lora.client_ranks={lo.client_ranks!r}: use a list (one rank per client), auto or null",
    )
    for r in lo.client_ranks if isinstance(lo.client_ranks, list) else []:
        _require(
            isinstance(r, int) and 1 <= r <= lo.r,
            f"lora.client_ranks={lo.client_ranks}: every rank must be an int in 1..lora.r ({lo.r})",
        )
    _require(cfg.wire.dtype in WIRE_DTYPES, f"wire.dtype={cfg.wire.dtype!r}: use one of {list(WIRE_DTYPES)}")
    _require(rt.device in ("auto", "cpu", "cuda"), f"runtime.device={rt.device!r}: use auto, cpu or cuda")
    _require(
        rt.server_gpu in ("own", "shared"),
        f"runtime.server_gpu={rt.server_gpu!r}: use own (the server gets a GPU of its own) or shared",
    )
    _require(
        rt.aggregation_backend in ("auto", "nccl", "gloo"),
        f"runtime.aggregation_backend={rt.aggregation_backend!r}: use auto, nccl or gloo",
    )
    _require(
        not (rt.aggregation_backend == "nccl" and rt.device == "cpu"),
        "runtime.aggregation_backend=nccl needs a GPU on every rank but runtime.device=cpu: use "
        "runtime.aggregation_backend=auto or gloo, or runtime.device=cuda",
    )
    for name in ("rpc_timeout_s", "round_timeout_s", "peer_timeout_s"):
        _require(getattr(rt, name) > 0, f"runtime.{name}={getattr(rt, name)}: must be > 0")
    for name in ("stall_timeout_s", "join_timeout_s"):
        _require(
            getattr(rt, name) > 0,
            f"runtime.{name}={getattr(rt, name)}: must be a finite number of seconds > 0",
        )
    _require(
        rt.resume in ("auto", True, False),
        f"runtime.resume={rt.resume!r}: use auto (continue if a checkpoint exists), true or false",
    )
    _require(
        not (rt.overwrite and rt.resume is True),
        "runtime.overwrite=true starts afresh but runtime.resume=true only continues: use "
        "runtime.resume=auto (continue a matching checkpoint, else move the old results aside) or false",
    )
    _require(rt.keep_checkpoints >= 1, f"runtime.keep_checkpoints={rt.keep_checkpoints}: must be >= 1")
    _require(rt.rpc_threads >= 1, f"runtime.rpc_threads={rt.rpc_threads}: must be >= 1")
    _require(
        bool(rt.rpc_transports) and set(rt.rpc_transports) <= {"uv", "shm", "ibv"},
        f"runtime.rpc_transports={rt.rpc_transports}: use a non-empty list of uv, shm, ibv",
    )
    _require(rt.malloc_arenas >= 0, f"runtime.malloc_arenas={rt.malloc_arenas}: must be >= 0 (0 = default)")
    _require(
        0 <= rt.malloc_keep_mb <= MALLOC_KEEP_MAX_MB,
        f"runtime.malloc_keep_mb={rt.malloc_keep_mb}: must be 0..{MALLOC_KEEP_MAX_MB} "
        "(glibc's M_TRIM_THRESHOLD is an int; 0 = glibc's default)",
    )
    _require(rt.intra_op_threads >= 0, f"runtime.intra_op_threads={rt.intra_op_threads}: must be >= 0")
    _validate_eval(cfg)
    sp, sim = cfg.split, cfg.simulate
    _require(
        sp.clients is None or sp.clients >= 1,
        f"split.clients={sp.clients}: must be >= 1 or null",
    )
    _require(
        sp.policy is None or sp.policy in POLICIES, f"split.policy={sp.policy!r}: use one of {list(POLICIES)}"
    )
    _require(
        cfg.policy != "fixed" or isinstance(sp.cut_layers, int),
        f"split.policy=fixed takes one int split.cut_layers, got {sp.cut_layers}: use policy manual",
    )
    _require(
        cfg.policy != "manual" or isinstance(sp.cut_layers, list),
        f"split.policy=manual takes a list split.cut_layers (one per client), got {sp.cut_layers}",
    )
    _require(sp.mode in ("standard", "u_shape"), f"split.mode={sp.mode!r}: use standard or u_shape")
    _require(
        sp.tail_layers == 0 or sp.mode == "u_shape",
        f"split.tail_layers={sp.tail_layers} keeps layers on the clients only in split.mode=u_shape",
    )
    _require(sp.tail_layers >= 0, f"split.tail_layers={sp.tail_layers}: must be >= 0")
    _require(sp.replan_every >= 1, f"split.replan_every={sp.replan_every}: must be >= 1")
    _require(0 <= sp.hysteresis < 1, f"split.hysteresis={sp.hysteresis}: must be in [0, 1)")
    _require(0 < sp.smoothing <= 1, f"split.smoothing={sp.smoothing}: must be in (0, 1]")
    _require(0 <= sp.plateau < 1, f"split.plateau={sp.plateau}: must be in [0, 1) (0 turns the rule off)")
    _require(sp.trend_window >= 1, f"split.trend_window={sp.trend_window}: must be >= 1")
    _require(sp.memory_headroom >= 0, f"split.memory_headroom={sp.memory_headroom}: must be >= 0")
    _require(
        not sp.schedule or cfg.policy in ("fixed", "manual"),
        f"split.schedule forces moves under policy fixed or manual, not {cfg.policy} (adaptive moves itself)",
    )
    for rnd in sp.schedule or {}:
        _require(
            1 <= rnd < t.rounds, f"split.schedule round {rnd}: must be in 1..train.rounds-1 ({t.rounds - 1})"
        )
    _require(
        not isinstance(sim.memory_limit_gb, dict) or is_draw(sim.memory_limit_gb),
        f"simulate.memory_limit_gb={sim.memory_limit_gb}: memory cannot follow a schedule (the planner's "
        "memory caps come from the start-up probe); give one value, a list (one per client) or a draw "
        "{lognormal: sigma, median: GB}",
    )
    for name in DRAWN_KNOBS:
        _check_draw(name, getattr(sim, name))
    for name, value, ok, rule in (
        ("slowdown", sim.slowdown, lambda v: v >= 1, ">= 1"),
        ("server_slowdown", sim.server_slowdown, lambda v: v >= 1, ">= 1"),
        ("memory_limit_gb", sim.memory_limit_gb, lambda v: v is None or v > 0, "> 0 or null"),
        ("bandwidth_mbps", sim.bandwidth_mbps, lambda v: v is None or v > 0, "> 0 or null"),
    ):
        if is_draw(value):
            continue
        if isinstance(value, dict):
            _require(
                bool(value) and min(value) == 1 and all(k >= 1 for k in value),
                f"simulate.{name}={value}: a schedule maps rounds >= 1 to values and must start at round 1 "
                f"(e.g. {{1: 1.0, 4: [1, 2]}}: from round 4 on the second value holds)",
            )
        for entry in value.values() if isinstance(value, dict) else [value]:
            for v in entry if isinstance(entry, list) else [entry]:
                _require(ok(v), f"simulate.{name}={value}: every value must be {rule}")


def _check_draw(name: str, value: Any) -> None:
    """A seeded draw: ``{lognormal: sigma}`` (slowdown) or ``{lognormal: sigma, median: value}``."""
    if not is_draw(value):
        return
    keys = {"lognormal"} if name == "slowdown" else {"lognormal", "median"}
    example = "{lognormal: 0.5}" if name == "slowdown" else "{lognormal: 0.5, median: 100}"
    number = lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    _require(
        set(value) == keys and all(number(v) for v in value.values()),
        f"simulate.{name}={value}: a draw takes exactly the keys {sorted(keys)}, finite numbers, e.g. "
        f"simulate.{name}={example}"
        + (" (the fastest client gets slowdown 1, so no median)" if name == "slowdown" else ""),
    )
    _require(
        0 <= value["lognormal"] <= 5,
        f"simulate.{name}={value}: lognormal (sigma of the log) must be in [0, 5], e.g. 0.5",
    )
    _require(value.get("median", 1) > 0, f"simulate.{name}={value}: median must be > 0")


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    _require(e.every >= 1, f"eval.every={e.every}: must be >= 1 (1 = evaluate every round)")
    _require(
        0 <= e.client_fraction < 1,
        f"eval.client_fraction={e.client_fraction}: must be in [0, 1) (a fraction of each client's shard "
        "held back for its own evaluation; 0 = none)",
    )
    _require(e.generate >= 0, f"eval.generate={e.generate}: must be >= 0 (0 = no generation eval)")
    _require(e.max_new_tokens >= 1, f"eval.max_new_tokens={e.max_new_tokens}: must be >= 1")
    _require(
        not cfg.runtime.tensorboard or importlib.util.find_spec("tensorboardX") is not None,
        "runtime.tensorboard=true needs the tensorboardX package, which is not installed: "
        "pip install 'tensorboardX==2.6.5' (or pip install -e '.[tensorboard]'), or set "
        "runtime.tensorboard=false",
    )


def check_world_size(world_size: int) -> None:
    _require(
        world_size >= 2,
        f"WORLD_SIZE={world_size}: need a server and at least one client "
        "(torchrun --nproc_per_node=2 or more)",
    )


def check_clients(cfg: Config, world_size: int) -> int:
    """N against the launch's workers (what the checkpoint's fingerprint then counts); returns N."""
    check_world_size(world_size)
    n_workers, n_clients = world_size - 1, cfg.n_clients(world_size)
    _require(
        n_clients >= n_workers,
        f"split.clients={n_clients} but torchrun started {n_workers} client ranks (workers): a worker "
        f"trains at least one client; launch with --nproc_per_node={n_clients + 1} or set split.clients "
        f">= {n_workers}",
    )
    return n_clients


def validate_for_world(cfg: Config, world_size: int, n_layers: int) -> list[int] | None:
    """Checks the config against the launch and the model; returns each client's cut layer (None when
    the resource or adaptive policy will choose them)."""
    n_clients = check_clients(cfg, world_size)
    k = cfg.train.clients_per_round
    if k is not None:
        _require(
            k <= n_clients,
            f"train.clients_per_round={k} but the run has {n_clients} clients: use at most {n_clients} "
            "(or null: every client, every round)",
        )
    _require(n_layers >= 2, f"the model has {n_layers} decoder layer(s): a split needs at least 2")
    tail = cfg.split.tail_layers
    _require(
        n_layers - tail >= 2,
        f"split.tail_layers={tail} leaves {n_layers - tail} of the model's {n_layers} layers below the "
        "tail: the server needs at least one and every client one; lower split.tail_layers",
    )
    for name in ("slowdown", "memory_limit_gb", "bandwidth_mbps"):
        value = getattr(cfg.simulate, name)
        for rnd, entry in value.items() if isinstance(value, dict) else [(None, value)]:
            where = f"simulate.{name}" if rnd is None else f"simulate.{name}[{rnd}]"
            _require(
                not isinstance(entry, list) or len(entry) == n_clients,
                f"{where} has {len(entry) if isinstance(entry, list) else 0} entries for {n_clients} "
                "clients: give one per client or a single value",
            )
    for rnd, cuts in (cfg.split.schedule or {}).items():
        _check_cuts(cuts, n_clients, n_layers, f"split.schedule[{rnd}]", tail)
    ranks = cfg.lora.client_ranks
    _require(
        not isinstance(ranks, list) or len(ranks) == n_clients,
        f"lora.client_ranks has {len(ranks or [])} entries for {n_clients} clients: "
        "give one per client or null",
    )
    if cfg.policy == "adaptive" and isinstance(cfg.split.cut_layers, list):
        _check_cuts(cfg.split.cut_layers, n_clients, n_layers, "split.cut_layers", tail)
        return None
    if cfg.policy in ("resource", "adaptive"):
        return None
    cuts = cfg.cut_layers_for(n_clients)
    _check_cuts(cuts, n_clients, n_layers, "split.cut_layers", tail)
    return cuts


def _check_cuts(cuts: list[int], n_clients: int, n_layers: int, where: str, tail: int = 0) -> None:
    _require(
        len(cuts) == n_clients,
        f"{where} has {len(cuts)} entries for {n_clients} clients: give one per client "
        f"or a single int (torchrun --nproc_per_node={len(cuts) + 1} matches this list)",
    )
    for i, k in enumerate(cuts):
        _require(
            1 <= k <= n_layers - tail - 1,
            f"{where}[{i}]={k}: the model has {n_layers} layers"
            + (f" and split.tail_layers={tail} stay on the clients" if tail else "")
            + f", so a cut must be in 1..{n_layers - tail - 1}",
        )


# Settings that do not change what a run computes: where it writes, how long it goes on, how the
# processes talk and wait, and the simulated speeds (the plan comes from the checkpoint on resume).
NOT_IN_FINGERPRINT = ("output_dir", "train.rounds", "runtime.", "simulate.", "eval.")


def fingerprint(cfg: Config, n_clients: int) -> dict[str, Any]:
    """Every setting a resumed run must share with its checkpoint, as flat ``section.key`` names."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and key != "schedule":
                walk(value, f"{name}.")
            elif not name.startswith(NOT_IN_FINGERPRINT):
                flat[name] = value

    walk(cfg.to_dict(), "")
    if flat.get("split.schedule"):  # JSON keys are strings: compare like with like
        flat["split.schedule"] = {str(k): v for k, v in flat["split.schedule"].items()}
    flat["split.policy"] = cfg.policy
    flat["clients"] = n_clients
    if cfg.eval.client_fraction > 0:  # it changes the training shards (how often one evaluates does not)
        flat["eval.client_fraction"] = cfg.eval.client_fraction
    if cfg.train.lr_schedule != "constant":  # its rates depend on the run's length: train.rounds then counts
        flat["train.rounds"] = cfg.train.rounds
    return flat
