"""Process group and RPC: start-up, names, devices and a shutdown that cannot hang.

Rank 0 is the RPC worker ``server``; rank r >= 1 is ``client{r}``. The default process group is
gloo and carries control traffic (object gathers, barriers): CUDA RPC and an NCCL barrier are
known to deadlock. Where each rank computes, whether the adapter all-reduce runs on an NCCL group
(every rank on a GPU of its own) and the RPC device maps are decided by ``runtime.placement`` from
what every rank reports over that gloo group; this module only gathers the reports and applies them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from runtime import codec, faults
from runtime import placement as pl

SERVER = "server"
log = logging.getLogger("splitft")


def worker_name(rank: int) -> str:
    return SERVER if rank == 0 else f"client{rank}"


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    aggregation: dist.ProcessGroup | None  # the NCCL group (``backend``); None means the default (gloo) group
    rpc_timeout_s: float
    placement: pl.Placement | None = None
    """Every rank's device, as decided at start-up (the same on every rank)."""
    backend: pl.Backend | None = None
    """The adapter all-reduce's backend and why."""

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    @property
    def n_workers(self) -> int:
        """The client ranks (workers), 1..WORLD_SIZE-1; the federation's clients may be more."""
        return self.world_size - 1


def env_world() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's environment."""
    try:
        return (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        )
    except KeyError as e:
        raise RuntimeError(
            f"{e.args[0]} is not set: launch with torchrun, e.g. "
            "torchrun --nproc_per_node=5 -m launch.train torchrun_configs/tiny_cpu.yaml"
        ) from None


_ATTEMPT_STORE: dist.Store | None = None
JOIN_TIMEOUT_S = 600.0  # runtime.join_timeout_s, set by ``start``
JOIN_POLL_S = 0.05
_STOPPING = None  # the run's stop request (runtime.faults.StopSignals), set by ``start``


class NotJoined(RuntimeError):
    """A rank did not arrive at the attempt's rendezvous within ``runtime.join_timeout_s``."""


def _attempt_rendezvous(url: str, timeout=None, **kwargs):
    """``splitft://`` rendezvous: torchrun's store, under a prefix of this attempt's own.

    torch 2.13's ``env://`` under torchrun reuses the agent's store across ``--max-restarts`` with
    no per-attempt prefix, so restarted workers read the dead workers' gloo and TensorPipe
    addresses and fail to connect. So the ranks of an attempt agree on a fresh token (``join``) and
    keep their keys under ``splitft/attempt-<token>/``. Both the process group and RPC use it (one
    store per process).
    """
    global _ATTEMPT_STORE
    rank, world_size, _, _ = env_world()
    if _ATTEMPT_STORE is None:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timeout or timedelta(minutes=10),
        )
        token = join(store, rank, world_size, JOIN_TIMEOUT_S, _STOPPING)
        _ATTEMPT_STORE = dist.PrefixStore(f"splitft/attempt-{token}/", store)
    yield (_ATTEMPT_STORE, rank, world_size)


def join(store: dist.Store, rank: int, world_size: int, timeout_s: float, stopping=None) -> str:
    """The attempt's token, agreed by every rank of it; raises ``NotJoined`` naming who did not come,
    or ``faults.Preempted`` once ``stopping()`` (torchrun stopping the attempt while it waits).

    Counting arrivals cannot tell attempts apart once one attempt lost a rank before it arrived (the
    next attempt's first arrivals would complete the old count), and torchrun's restart count is an
    agent's own (agents of other nodes restart without counting). What holds instead is that torchrun
    stops every worker of an attempt before it starts the next one. So rank 0 deletes the requests
    left by earlier attempts, waits for a request from every other rank (each rank writes a fresh
    nonce, again and again until answered, so a request cleared by a late rank 0 comes back), and
    answers with a new token and the nonces it answers. A rank takes only an answer that holds its
    own nonce: a stale answer of an earlier attempt never matches.
    """
    base = f"splitft/join/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
    others = list(range(1, world_size))
    wants = [f"{base}want/{r}" for r in others]
    deadline = time.monotonic() + timeout_s

    def wait() -> None:
        if stopping is not None and stopping():
            raise faults.Preempted()
        time.sleep(JOIN_POLL_S)

    if rank == 0:
        for key in wants:  # the answer is only ever replaced: a rank reading it never finds it gone
            store.delete_key(key)
        while others and not store.check(wants):
            if time.monotonic() > deadline:
                missing = [r for r, key in zip(others, wants) if not store.check([key])]
                raise NotJoined(
                    f"{', '.join(f'rank {r} ({worker_name(r)})' for r in missing)} did not arrive within "
                    f"runtime.join_timeout_s={timeout_s:g}s: see that rank's log (it failed, hangs, or is "
                    "still reading its data; raise runtime.join_timeout_s if start-up is that slow)"
                )
            wait()
        nonces = [v.decode() for v in store.multi_get(wants)] if others else []
        token = uuid.uuid4().hex
        store.set(f"{base}grant", json.dumps({"token": token, "nonces": nonces}))
        return token
    nonce = uuid.uuid4().hex
    while True:
        store.set(wants[rank - 1], nonce)
        if store.check([f"{base}grant"]):
            grant = json.loads(store.get(f"{base}grant"))
            if grant["nonces"][rank - 1] == nonce:
                return grant["token"]
        if time.monotonic() > deadline:
            raise NotJoined(
                f"rank {rank} ({worker_name(rank)}): the server (rank 0) did not start the attempt within "
                f"runtime.join_timeout_s={timeout_s:g}s: it has not arrived, or it waits for another rank "
                "(its log names it)"
            )
        wait()


dist.register_rendezvous_handler("splitft", _attempt_rendezvous)


def init_method() -> str:
    """``splitft://`` under torchrun's agent store, else the plain ``env://``."""
    return "splitft://" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "env://"


def report(rank: int, requested: str) -> pl.RankReport:
    """This rank's report for ``placement.place``: its node and how many GPUs it sees.

    ``runtime.device=cpu`` asks CUDA nothing. The node is the host name plus CUDA_VISIBLE_DEVICES, so
    two torchrun agents on one host that see the same GPUs count as one node (their ranks must not be
    placed as if each had the GPUs to itself).
    """
    if requested == "cpu":
        return pl.RankReport(rank, socket.gethostname(), 0)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "cuda" and gpus == 0:
        raise RuntimeError("runtime.device=cuda but this rank sees no CUDA device; use runtime.device=cpu")
    return pl.RankReport(rank, f"{socket.gethostname()}|{os.environ.get('CUDA_VISIBLE_DEVICES', '*')}", gpus)


def pick_device(placement: pl.Placement, rank: int) -> torch.device:
    """This rank's device from the world's placement."""
    return torch.device(placement.device(rank))


def start(
    device_request: str,
    rpc_timeout_s: float,
    round_timeout_s: float,
    rpc_threads: int,
    transports: list[str],
    server_gpu: str = "own",
    aggregation_backend: str = "auto",
    join_timeout_s: float = JOIN_TIMEOUT_S,
    stopping=None,
) -> World:
    """Initialises the process group and RPC on this rank (call once, on every rank).

    Collectives get ``round_timeout_s`` (rank 0 waits in one while the clients train a round); one
    RPC gets ``rpc_timeout_s``. Neither is how a dead peer is noticed (``runtime.faults.Heartbeat``).
    ``server_gpu`` and ``aggregation_backend`` are ``runtime.server_gpu`` and
    ``runtime.aggregation_backend``; a backend that cannot hold raises ``placement.PlacementError`` (a
    ``ConfigError``) on every rank alike, before any NCCL group or RPC exists. Under torchrun every
    rank waits up to ``join_timeout_s`` for the others to arrive (``NotJoined`` names the missing), or
    until ``stopping()``.
    """
    global JOIN_TIMEOUT_S, _STOPPING
    JOIN_TIMEOUT_S, _STOPPING = join_timeout_s, stopping
    faults.injector.hit("startup")
    rank, world_size, local_rank, local_world_size = env_world()
    mine = report(rank, device_request)
    timeout = timedelta(seconds=round_timeout_s)
    # Placement needs every rank's report: gather them over a gloo group first.
    dist.init_process_group(
        "gloo", init_method=init_method(), rank=rank, world_size=world_size, timeout=timeout
    )
    reports: list[pl.RankReport] = _all_gather(mine, world_size)
    placement = pl.place(reports, device_request, server_gpu)
    backend = pl.choose_backend(placement, aggregation_backend)
    device = pick_device(placement, rank)
    if rank == 0:
        log.info("placement: %s", placement.reason)
        log.info("adapter aggregation on %s: %s", backend.name, backend.reason)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    aggregation = dist.new_group(backend="nccl", timeout=timeout) if backend.name == "nccl" else None
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=rpc_threads,
        rpc_timeout=rpc_timeout_s,
        _transports=transports,
        init_method=init_method(),
    )
    # Activations go straight from a worker's GPU to the server's; replies use the reverse map.
    for target, device_map in pl.device_maps(placement, rank).items():
        options.set_device_map(worker_name(target), device_map)
    with warnings.catch_warnings():
        # torch's static-world TensorPipe start-up gathers device maps over a raw ProcessGroupGloo it
        # builds itself (torch/distributed/rpc/backend_registry.py): every rank warns; no argument avoids it.
        warnings.filterwarnings(
            "ignore", message="You are using a Backend .* as a ProcessGroup", category=UserWarning
        )
        rpc.init_rpc(worker_name(rank), rank=rank, world_size=world_size, rpc_backend_options=options)
    return World(
        rank, world_size, local_rank, local_world_size, device, aggregation, rpc_timeout_s, placement, backend
    )


def gather_objects(world: World, obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank (a control message: ``runtime.codec``)."""
    with faults.progress.collective(f"a gather ({type(obj).__name__})"):
        return _all_gather(obj, world.world_size)


def broadcast_object(world: World, obj: object) -> object:
    """Rank 0's ``obj`` on every rank (a control message: ``runtime.codec``; other ranks' is ignored)."""
    with faults.progress.collective("a broadcast"):
        return _broadcast(obj)


def _broadcast(obj: object) -> object:
    size = torch.zeros(1, dtype=torch.int64)
    data = None
    if dist.get_rank() == 0:
        data = _bytes_tensor(codec.encode(obj))
        size[0] = data.numel()
    dist.broadcast(size, src=0)
    if data is None:
        data = torch.empty(int(size[0]), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return codec.decode(data.numpy().tobytes())


def _all_gather(obj: object, world_size: int) -> list[object]:
    """Control messages travel as JSON in byte tensors on the default (gloo) group, never pickled:
    no rank unpickles what a peer sends. Two all-gathers: the sizes, then the padded payloads."""
    data = _bytes_tensor(codec.encode(obj))
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64))
    longest = max(int(n) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    out = [torch.empty(longest, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(out, padded)
    return [codec.decode(t[: int(n)].numpy().tobytes()) for t, n in zip(out, sizes)]


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def barrier(world: World) -> None:
    with faults.progress.collective("a barrier"):
        dist.barrier()


def stop(world: World | None, graceful: bool = True) -> None:
    """Shuts RPC down with a timeout (the default waits forever on a dead peer), then the group.

    Never raises: it runs on the way out of a failed run too, where it must not hide the error.
    A graceful shutdown that fails has already torn the RPC agent down (a second, non-graceful
    call would only raise "RPC has not been initialized"), so there is no second call.
    """
    if world is not None:
        try:
            rpc.shutdown(graceful=graceful, timeout=world.rpc_timeout_s)
        except Exception as e:
            log.debug("RPC shutdown: %s", e)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:
            log.debug("destroy_process_group: %s", e)
