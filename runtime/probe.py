"""Measures what a participant can do: cores, memory, layer time, activation size, link speed.

Nothing here is told the simulated numbers of ``runtime.simulate``: a throttled layer is simply
timed, a memory limit is read back from ``RLIMIT_DATA`` (or the CUDA allocator's fraction), and a
link is timed by sending through it. The runtime passes ``send`` (an RPC to the server), so this
module never touches ``torch.distributed``.
"""

from __future__ import annotations

import math
import os
import resource
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from models.families import run_layer
from models.lora import LoraSpec, add_lora
from models.stages import build_stage, load_config
from runtime.job import usable_cores
from runtime.simulate import Link, Throttle, vmdata_bytes

_UNLIMITED = 2**60  # cgroup "no limit" shows as max (v2) or ~2**63 (v1)


@dataclass
class ResourceProfile:
    """One participant's measured resources (times in wall / process-CPU seconds, sizes in bytes)."""

    host: str
    physical_cores: int
    logical_cores: int
    usable_cores: int  # CPUs this process may run on (sched_getaffinity)
    cpu_freq_mhz: float
    memory_total_bytes: int  # host memory, capped by the cgroup limit and RLIMIT_DATA
    memory_available_bytes: int  # available_memory(cpu)
    load_avg: tuple[float, float, float]
    cuda: dict | None  # name, total_bytes, free_bytes, sm_count, capability, memory_fraction
    layer_time_s: float  # one decoder layer forward+backward at (batch, seq) on this device
    layer_cpu_s: float  # process CPU seconds of that
    activation_bytes: int  # bytes that layer saves for backward
    head_time_s: float = 0.0  # server only: final norm + LM head + loss, forward+backward
    head_cpu_s: float = 0.0
    rtt_s: float = 0.0  # clients only: a tiny send to the server
    bandwidth_Bps: float = math.inf  # clients only: bytes per second to the server

    def to_dict(self) -> dict:
        """A JSON-able dict (``inf`` bandwidth as None; ``from_dict`` reads it back)."""
        d = asdict(self)
        d["load_avg"] = list(self.load_avg)
        d["bandwidth_Bps"] = None if math.isinf(self.bandwidth_Bps) else self.bandwidth_Bps
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ResourceProfile:
        d = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        d["load_avg"] = tuple(d["load_avg"])
        if d.get("bandwidth_Bps") is None:
            d["bandwidth_Bps"] = math.inf
        return cls(**d)


# ---- memory ----


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2 unlimited) -> None


def _cgroup_dirs() -> list[tuple[Path, str, str]]:
    """(folder, limit file, usage file) for this process's memory cgroup and its ancestors (v2 and v1)."""
    root = Path("/sys/fs/cgroup")
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, files = root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        # Inside a cgroup namespace the path may not exist below the mount: then the mount is ours.
        rel = Path(path.lstrip("/"))
        for folder in (base / rel, *(base / p for p in rel.parents)):
            found.append((folder, *files))
    return found


def cgroup_available() -> int | None:
    """The tightest cgroup memory limit minus usage over this process's cgroup hierarchy (None: no limit)."""
    best = None
    for folder, limit_file, usage_file in _cgroup_dirs():
        limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
        if limit is None or usage is None or limit >= _UNLIMITED:
            continue
        left = max(0, limit - usage)
        best = left if best is None else min(best, left)
    return best


def _cgroup_limit() -> int | None:
    limits = [_read_int(folder / f) for folder, f, _ in _cgroup_dirs()]
    limits = [x for x in limits if x is not None and x < _UNLIMITED]
    return min(limits) if limits else None


def _rlimit_data() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    return None if soft == resource.RLIM_INFINITY else soft


def available_memory(device: torch.device | str) -> int:
    """Bytes this process can still allocate on ``device``.

    CPU: the least of the host's available memory, the cgroup limit minus usage (Slurm caps jobs
    this way) and the soft ``RLIMIT_DATA`` minus the current data segment. CUDA: the driver's
    free memory, capped by the per-process fraction times total minus what torch has reserved,
    plus what torch has reserved but not allocated (its cache, reusable by this process).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction = torch.cuda.get_per_process_memory_fraction(device)
        reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
        return max(0, min(free, int(fraction * total) - reserved)) + reserved - allocated
    candidates = [psutil.virtual_memory().available]
    cgroup = cgroup_available()
    if cgroup is not None:
        candidates.append(cgroup)
    rlimit = _rlimit_data()
    if rlimit is not None:
        candidates.append(max(0, rlimit - vmdata_bytes()))
    return int(min(candidates))


def _cuda_facts(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "total_bytes": int(props.total_memory),
        "free_bytes": available_memory(device),
        "sm_count": int(props.multi_processor_count),
        "capability": f"{props.major}.{props.minor}",
        "memory_fraction": float(torch.cuda.get_per_process_memory_fraction(device)),
    }


# ---- compute ----


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], device: torch.device, repeats: int = 3) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``step`` over ``repeats`` runs (after the caller's warm-up)."""
    walls, cpus = [], []
    for _ in range(repeats):
        _sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


class _SavedBytes:
    """Counts the bytes autograd saves for backward: each storage once, parameters' storages skipped."""

    def __init__(self, skip: set[int]):
        self.skip, self.seen, self.bytes = skip, set(), 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.skip and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _rng(device: torch.device):
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def time_layer(
    model_dir: str | Path,
    spec: LoraSpec,
    batch: int,
    seq: int,
    device: torch.device | str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    throttle: Throttle | None = None,
) -> tuple[float, float, int]:
    """(wall s, CPU s, activation bytes) of one middle decoder layer with LoRA, forward+backward.

    Only that layer's tensors are loaded. Times are medians of 3 runs after one warm-up (which
    also counts the bytes saved for backward). The input requires grad, as a middle layer's does.
    """
    device = torch.device(device)
    j = load_config(model_dir).num_hidden_layers // 2
    with _rng(device):
        torch.manual_seed(0)
        stage = build_stage(
            model_dir, j, j + 1, device=device, dtype=dtype, attn_implementation=attn_implementation
        )
        add_lora(stage, spec, cut_rank=False)
        layer = stage.layers[str(j)]
        handles = throttle.attach(layer) if throttle is not None else []
        dtype_t = next(stage.parameters()).dtype
        hidden = torch.randn(batch, seq, stage.config.hidden_size, device=device, dtype=dtype_t)
        hidden.requires_grad_(True)

        def step() -> None:
            inputs = stage.family.layer_inputs_fn(stage.hf, stage.config, hidden, None)
            run_layer(layer, j, hidden, inputs).float().pow(2).mean().backward()

        try:
            counter = _SavedBytes({p.untyped_storage().data_ptr() for p in stage.parameters()})
            with counter.hooks():
                step()  # warm-up
            wall, cpu = _timed(step, device)
        finally:
            Throttle.detach(handles)
            stage.zero_grad(set_to_none=True)
    return wall, cpu, counter.bytes


def time_head(
    model_dir: str | Path,
    batch: int,
    seq: int,
    device: torch.device | str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> tuple[float, float]:
    """(wall s, CPU s) of the final norm + LM head + cross-entropy, forward+backward (median of 3)."""
    device = torch.device(device)
    n_layers = load_config(model_dir).num_hidden_layers
    with _rng(device):
        torch.manual_seed(0)
        stage = build_stage(
            model_dir, n_layers, n_layers, device=device, dtype=dtype, attn_implementation=attn_implementation
        )
        dtype_t = next(stage.parameters()).dtype
        hidden = torch.randn(batch, seq, stage.config.hidden_size, device=device, dtype=dtype_t)
        hidden.requires_grad_(True)
        labels = torch.randint(0, stage.config.vocab_size, (batch * seq,), device=device)

        def step() -> None:
            logits = stage(hidden=hidden)
            F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels).backward()

        step()  # warm-up
        wall, cpu = _timed(step, device)
    return wall, cpu


# ---- link ----


def measure_link(
    send: Callable[[torch.Tensor], None], payload_bytes: int, link: Link | None, device: torch.device | str
) -> tuple[float, float]:
    """(rtt s, bandwidth B/s) of ``send``: median of 5 tiny sends; median of 3 ``payload_bytes`` sends.

    Each send first pays ``link.delay`` (a simulated link), then calls ``send``. Bandwidth is
    ``payload_bytes / (t - rtt)``; ``inf`` when ``payload_bytes`` is 0.
    """
    device = torch.device(device)

    def once(t: torch.Tensor) -> float:
        start = time.perf_counter()
        if link is not None:
            link.delay(t.numel() * t.element_size())
        send(t)
        return time.perf_counter() - start

    tiny = torch.zeros(1, device=device)
    once(tiny)  # warm-up (first RPC sets up connections)
    rtt = statistics.median(once(tiny) for _ in range(5))
    if payload_bytes <= 0:
        return rtt, math.inf
    payload = torch.zeros(max(1, payload_bytes // 4), dtype=torch.float32, device=device)
    nbytes = payload.numel() * 4
    elapsed = statistics.median(once(payload) for _ in range(3))
    return rtt, nbytes / max(elapsed - rtt, 1e-9)


# ---- all together ----


def probe(
    model_dir: str | Path,
    spec: LoraSpec,
    batch: int,
    seq: int,
    device: torch.device | str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    throttle: Throttle | None = None,
    send: Callable[[torch.Tensor], None] | None = None,
    payload_bytes: int = 0,
    link: Link | None = None,
    server: bool = False,
) -> ResourceProfile:
    """This process's ResourceProfile: host facts, a timed layer, the head (server), the link (``send``)."""
    device = torch.device(device)
    vm = psutil.virtual_memory()
    caps = [vm.total, _cgroup_limit(), _rlimit_data()]
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError):
        freq = None
    layer_time, layer_cpu, activation = time_layer(
        model_dir, spec, batch, seq, device, dtype, attn_implementation, throttle
    )
    profile = ResourceProfile(
        host=socket.gethostname(),
        physical_cores=psutil.cpu_count(logical=False) or logical,
        logical_cores=logical,
        usable_cores=usable_cores(),
        cpu_freq_mhz=float(freq.current) if freq else 0.0,
        memory_total_bytes=int(min(c for c in caps if c is not None)),
        memory_available_bytes=available_memory("cpu"),
        load_avg=tuple(os.getloadavg()),
        cuda=_cuda_facts(device) if device.type == "cuda" else None,
        layer_time_s=layer_time,
        layer_cpu_s=layer_cpu,
        activation_bytes=activation,
    )
    if server:
        profile.head_time_s, profile.head_cpu_s = time_head(
            model_dir, batch, seq, device, dtype, attn_implementation
        )
    if send is not None:
        profile.rtt_s, profile.bandwidth_Bps = measure_link(send, payload_bytes, link, device)
    return profile
