"""A client rank's role: its own data, the embeddings and layers ``0..k-1`` (``runtime.client``), its
simulated resources (the protocol it plays its part in: ``runtime.protocol``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed.rpc as rpc

from models.aggregation import StackLayout
from models.datasets import BatchStream, eval_batches, typical_seq_len
from models.importance import Sensitivity
from models.lora import lora_modules, write_adapter
from partition.planner import PlanError
from runtime import dist, faults
from runtime.client import Client
from runtime.compute import ComputeThreads
from runtime.config import Config
from runtime.debug import dump_copies
from runtime.dist import SERVER
from runtime.job import ClientData, FederationData, data_seed, load_tokenizer, round_seed, worker_data
from runtime.messages import (
    ClientReport,
    ClientRound,
    Divergence,
    RoundStats,
    RunState,
    SatOut,
    Settled,
    UserError,
)
from runtime.metrics import CpuUsage
from runtime.protocol import Plan, Role
from runtime.server import finish_client, serve_client
from runtime.simulate import (
    Link,
    MemoryLimit,
    MemoryShortfall,
    Throttle,
    apply_memory_limit,
    client_memory_message,
    is_out_of_memory,
)

log = logging.getLogger("splitft")


class ClientRole(Role):
    """Rank r >= 1: its own data, the embeddings and layers ``0..k-1``, its optimizer."""

    def __init__(
        self,
        cfg: Config,
        world: dist.World,
        stop: faults.StopSignals,
        compute: ComputeThreads,
        data: ClientData | FederationData | None,
    ):
        super().__init__(cfg, world, stop, compute)
        simulate = self.cfg.simulate  # its seeded draws already drawn (Role)
        slowdown, memory_gb, bandwidth = simulate.for_client(world.rank - 1)
        # clients sharing workers, each with its own memory limit: the worker applies the limit of the client
        # it runs while that client trains, and keeps its own otherwise (its probe measures its own)
        self.memory = MemoryLimit(world.device) if self.own_memory_limits else None
        if self.memory is None:
            apply_memory_limit(memory_gb, world.device)
        # clients sharing a worker: hooked even at slowdown 1, as a later client of it may be slower
        changing = simulate.changes or self.multiplexed
        self.throttle, self.link = Throttle(slowdown, changing=changing), Link(bandwidth)
        self.data = data or worker_data(cfg, self.model_path, world.rank, world.world_size)
        self.client: Client | None = None
        # clients sharing workers: every client's data stream (positions come with each Assignment), and
        # this round's weighted copies of the clients this worker trained
        self.streams: dict[int, BatchStream] = {}
        if self.multiplexed:
            d = self.data
            self.streams = {
                c: BatchStream(d.examples, shard, cfg.train.batch_size, data_seed(cfg, c - 1), d.pad_id)
                for c, shard in d.shards.items()
            }
        self.contributions: dict[int, torch.Tensor] = {}
        self.adapter_bytes = 0
        self.heldout_sets: dict[int, list[dict[str, torch.Tensor]]] = {}  # eval.client_fraction: batches
        self.tokenizer = None  # eval.generate: loaded at the first generation eval

    @property
    def own_memory_limits(self) -> bool:
        """Whether clients sharing this worker each have their own ``simulate.memory_limit_gb``."""
        return self.multiplexed and isinstance(self.cfg.simulate.memory_limit_gb, list)

    # ------------------------------------------------------------------ start
    def simulate_round(self, rnd: int) -> None:
        """Applies the simulated slowdown and bandwidth a ``simulate`` schedule gives round ``rnd``."""
        slowdown, _, bandwidth = self.cfg.simulate.for_client(self.world.rank - 1, rnd)
        if (slowdown, bandwidth) != (self.throttle.factor, self.link.bandwidth_mbps):
            log.info(
                "round %d: simulated slowdown %g -> %g, bandwidth %s -> %s Mbit/s",
                rnd,
                self.throttle.factor,
                slowdown,
                self.link.bandwidth_mbps,
                bandwidth,
            )
        self.throttle.set(slowdown)
        self.link.bandwidth_mbps = bandwidth

    def typical_seq_len(self) -> int:
        d = self.own_data()
        return typical_seq_len(
            d.examples, d.shard, self.cfg.train.batch_size, data_seed(self.cfg, self.world.rank - 1)
        )

    def own_data(self) -> ClientData:
        """The data of the client this worker starts with (clients sharing workers: client ``rank``)."""
        return self.data.client(self.world.rank) if self.multiplexed else self.data

    def build(self) -> None:
        k, cut_rank = self.plan[self.world.rank]
        self.client = Client(
            self.world.rank,
            k,
            cut_rank,
            self.cfg,
            self.model_path,
            self.spec,
            self.own_data(),
            self.world.device,
            self.throttle,
            self.link,
            self.caps[self.world.rank],
        )

    def n_samples(self) -> dict[int, int]:
        if self.multiplexed:
            return {c: len(shard) for c, shard in self.data.shards.items()}
        return {self.world.rank: self.client.n_samples}

    def connect(self) -> None:
        self.client.connect()

    def load(self, flat: torch.Tensor, resume: RunState | None) -> None:
        for model in self.client.models:
            write_adapter(model, self.layout, flat)
        if resume is not None and not self.multiplexed:  # shared workers: positions come with each Assignment
            self.client.stream.load_state_dict(resume.data_positions[self.world.rank])
        if resume is not None and self.cfg.train.aggregation == "stack":  # the layers read from disk
            self.client.fetch_merged(self.layout, self.client.layers)

    def holders(self) -> list[tuple[int, torch.nn.Module, float]]:
        r = self.world.rank
        return [(r, model, self.weights[r]) for model in self.client.models]

    def show_global(self) -> None:
        self.client.global_adapter = (self.layout, self.flat.to(self.world.device))

    # ------------------------------------------------------------------ importance selection (HSplitLoRA)
    def warmup(self) -> dict:
        scorer = Sensitivity()
        self.client.train_round(self.cfg.lora.warmup_steps, lambda: False, scorer)
        self.client.take_comm()
        return scorer.scores()

    def relora(self) -> None:
        self.client.relora(self.spec)

    # ------------------------------------------------------------------ a round
    def train(self) -> ClientRound | list[ClientReport]:
        if self.multiplexed:
            return self.train_clients()
        if self.world.rank not in self.participants:
            return SatOut()
        usage = CpuUsage()
        trained = self.client.train_round(
            self.cfg.train.local_steps, lambda: self.stop.requested, rnd=self.rnd
        )
        if isinstance(trained, RoundStats):
            trained.train_cores_used = usage.stop()["train_cores_used"]  # this process, while it trained
        return trained

    def train_clients(self) -> list[ClientReport] | Divergence | UserError | None:
        """Clients sharing workers: trains this worker's clients of the round one after another, each from
        the global adapter at its own cut, on its own data from its own position, with its own seed and
        simulated profile; keeps each one's weighted copy for the aggregate. Returns their reports, or the
        first divergence (naming its client), or the user error of a client that does not fit its
        simulated memory, or None if stopped."""
        rank = self.world.rank
        reports = []
        for c in self.assignment.workers.get(rank, []):
            if self.stop.requested:
                return None
            t_switch = time.perf_counter()
            self.switch_to(c)
            switch_s = time.perf_counter() - t_switch
            torch.manual_seed(round_seed(self.cfg.seed, c, self.rnd))  # the client's, whichever worker
            usage = CpuUsage()
            trained = self.train_client(c)
            if trained is None or isinstance(trained, UserError):
                return trained
            if isinstance(trained, Divergence):
                trained.client = c
                return trained
            trained.train_cores_used = usage.stop()["train_cores_used"]
            trained.switch_s = switch_s
            self.contributions[c] = self.copy_vector(c, self.client.models, self.weights[c])
            rpc.rpc_sync(
                SERVER, finish_client, args=(rank, c, self.weights[c]), timeout=self.client.timeout_s
            )
            reports.append(ClientReport(trained, self.client.take_comm(), self.client.stream.state_dict(), c))
        return reports

    def train_client(self, c: int) -> ClientRound | UserError:
        """Client ``c``'s steps of the round, under its own simulated memory limit if it has one (the worker's
        own limit is back afterwards, whatever happened): a client whose cut does not fit that limit, before
        or while it trains, is a user error naming the client, its cut and its limit."""
        train = lambda: self.client.train_round(
            self.cfg.train.local_steps, lambda: self.stop.requested, rnd=self.rnd
        )
        _, limit_gb, _ = self.cfg.simulate.for_client(c - 1, self.rnd)
        if self.memory is None or limit_gb is None:
            return train()
        try:
            self.memory.lower_to(limit_gb)
            log.info("client %d trains under its simulated memory limit of %g GiB", c, limit_gb)
            return train()
        except Exception as e:
            if not isinstance(e, MemoryShortfall) and not is_out_of_memory(e):
                raise
            why = (
                str(e)
                if isinstance(e, MemoryShortfall)
                else f"it ran out while training ({str(e).splitlines()[0]})"
            )
            return UserError.of(PlanError(client_memory_message(c, self.plan[c][0], limit_gb, why)))
        finally:
            self.memory.restore()

    def switch_to(self, c: int) -> None:
        """This worker's stage and its server replica take client ``c``: its cut, the global adapter at its
        own ranks (``lora.client_ranks`` caps the stage's layers; the replica's hold ``lora.r``, as with
        one client per worker), its data position and its simulated speed and bandwidth."""
        k, cut_rank = self.plan[c]
        # the replica re-cuts on the server while this stage re-cuts here; both before the first step
        served = rpc.rpc_async(SERVER, serve_client, args=(self.world.rank, k), timeout=self.client.timeout_s)
        self.client.recut(k, cut_rank, self.layout, self.flat, self.caps[c])
        served.wait()
        slowdown, _, bandwidth = self.cfg.simulate.for_client(c - 1, self.rnd)
        self.throttle.set(slowdown)
        self.link.bandwidth_mbps = bandwidth
        stream = self.streams[c]
        position = self.assignment.positions.get(c)
        if position is not None:
            stream.load_state_dict(position)
        self.client.stream = stream

    def take_contributions(self) -> dict[int, torch.Tensor]:
        parts, self.contributions = self.contributions, {}
        return parts

    def settled(self, trained: ClientRound | list[ClientReport]) -> Settled:
        return Settled(
            stopping=self.stop.requested or trained is None,
            diverged=trained if isinstance(trained, Divergence) else None,
            error=trained if isinstance(trained, UserError) else None,
        )

    def merge(self, stack: StackLayout, summed: torch.Tensor) -> None:
        self.client.merge(self.layout, stack, summed)

    def merged_copy(self) -> dict[str, torch.Tensor]:
        return {
            name: m.get_base_layer().weight.detach().cpu().clone()
            for model in self.client.models
            for name, m in lora_modules(model).items()
        }

    def aggregated(self, nbytes: int) -> None:
        if self.multiplexed:  # counted for each client that trained (report), as its own upload would be
            self.adapter_bytes = nbytes
            return
        c = self.client
        trained = self.world.rank in self.participants  # one that sat out uploads nothing of its own
        if trained:
            c.comm.adapters_up += nbytes
        c.comm.adapters_down += nbytes
        c.link.delay((2 if trained else 1) * nbytes)

    def eval_totals(self) -> torch.Tensor:
        return self.client.evaluate()

    def heldout_totals(self) -> dict[int, torch.Tensor]:
        """Each held-back set this worker evaluates: its client's, or with clients sharing workers those of
        clients ``c`` with ``(c - 1) % workers == rank - 1`` (the global model is one function whatever
        the cut this worker's stage has)."""
        if not self.heldout_sets:
            d, n = self.data, self.world.n_workers
            sets = d.heldout if self.multiplexed else {self.world.rank: d.heldout}
            bs = self.cfg.train.eval_batch_size
            self.heldout_sets = {
                c: eval_batches(d.examples, held, bs, d.pad_id)
                for c, held in sets.items()
                if (c - 1) % n == self.world.rank - 1
            }
        return {c: self.client.evaluate(batches) for c, batches in self.heldout_sets.items()}

    def generation_totals(self) -> torch.Tensor:
        d = self.data
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_path)
        examples = [d.eval_examples[i] for i in d.generate_indices]
        return self.client.generate(examples, self.tokenizer, d.pad_id)

    def report(self, trained: RoundStats | SatOut | list[ClientReport]) -> list[ClientReport]:
        if self.multiplexed:
            self.client.take_comm()  # the evaluation's traffic: the worker's, not one client's
            for r in trained:
                r.comm.adapters_up += self.adapter_bytes
                r.comm.adapters_down += self.adapter_bytes
            return trained
        stats = trained if isinstance(trained, RoundStats) else None  # None: it sat the round out
        comm, stream = self.client.take_comm(), self.client.stream.state_dict()
        return [ClientReport(stats=stats, comm=comm, stream=stream, client=self.world.rank)]

    def move(self, new_plan: Plan) -> None:
        if self.multiplexed:  # this worker re-cuts to each client's cut when it switches to that client
            return
        k, cut_rank = new_plan[self.world.rank]
        if k != self.client.cut:
            self.client.move(k, cut_rank, self.layout, self.flat)

    def dump_copies(self, folder: Path) -> None:
        r = self.world.rank
        copies = {f"client{r}": (self.client.stage.hf, self.weights[r])}
        if self.client.tail is not None:
            copies[f"client{r}_tail"] = (self.client.tail.hf, self.weights[r])
        dump_copies(folder, copies)
