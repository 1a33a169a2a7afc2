"""The split run: rank 0 plays the server role, every other rank a client role, round after round.

The round protocol (``Role.run``) is the same on every rank, so the collectives line up; each role
says what it does in each phase:

    start      probe every process one at a time, plan the cuts (or take the checkpoint's), build
               the stages, load the initial or checkpointed adapter (replaying a move it recorded)
    train      clients take ``local_steps`` steps through their server replicas, all at once
    settle     every rank says whether it was asked to stop (SIGTERM/SIGUSR1): one stops all
    aggregate  one all-reduce gives every holder the global adapter
    evaluate   the global model on the held-out set
    re-plan    rank 0 may move cuts; every rank moves the layers concerned
    record     rank 0 writes metrics.jsonl, and hands the PEFT adapter and the round's checkpoint to
               a thread that writes them while the next round trains (``checkpoint.Saver``)

Failure handling has one home, ``run``: a stop request leaves after the last complete round
with ``EXIT_PREEMPTED``; a lost peer is named; everything else is logged once and re-raised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from pathlib import Path

import torch
import torch.distributed.rpc as rpc
from safetensors.torch import save_file

from models.aggregation import StackLayout
from models.datasets import typical_seq_len
from models.importance import Sensitivity, allocate_ranks, combine, uniform_params
from models.lora import (
    AdapterLayout,
    LoraSpec,
    build_layout,
    candidate_targets,
    chain_ranks,
    initial_adapter,
    lora_modules,
    reducible,
    with_selection,
    write_adapter,
)
from models.stages import DTYPES
from partition.planner import PlanError
from runtime import checkpoint, dist, faults
from runtime.aggregate import aggregate
from runtime.checkpoint import CheckpointMismatch
from runtime.client import COMM_KEYS, Client
from runtime.compute import ComputeThreads, for_process
from runtime.config import Config, fingerprint, validate_for_world
from runtime.dist import SERVER
from runtime.explain import describe_plan, describe_replan
from runtime.job import (
    ClientData,
    client_data,
    data_seed,
    default_threads,
    lora_spec,
    model_config,
    resolve_model_path,
    round_seed,
    tune_malloc,
)
from runtime.metrics import CpuUsage, MetricsWriter, header, peak_rss_mb, round_record, row
from runtime.probe import ResourceProfile, probe
from runtime.progress import round_line
from runtime.scheduler import Scheduler, model_costs
from runtime.server import Server, install, sink
from runtime.simulate import Link, Throttle, apply_memory_limit

log = logging.getLogger("splitft")


class Diverged(ValueError):
    """The loss became NaN or infinite; the message names the round, the client and the step."""


# Errors of the user's making that every rank learns of together (rank 0 decides, all raise).
USER_ERRORS = {"PlanError": PlanError, "CheckpointMismatch": CheckpointMismatch, "Diverged": Diverged}


def setup_logging(rank: int) -> None:
    role = "server" if rank == 0 else f"client{rank}"
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s.%(msecs)03d [rank {rank} {role}] %(message)s",
        datefmt="%H:%M:%S",
        # milliseconds: recovery timings (benchmarks/recovery.py) are read from these stamps
        force=True,
    )
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run(cfg: Config, data: ClientData | None = None) -> None:
    """Runs this rank's role to the end; ``data`` is a client's already-loaded data (loaded here if None).

    Raises ``SystemExit(EXIT_PREEMPTED)`` after a stop signal, ``SystemExit(EXIT_PEER_LOST)`` when a
    peer went away (named in the log), ``PlanError``/``CheckpointMismatch`` for user errors (every
    rank), and re-raises anything else after logging it once.
    """
    rt = cfg.runtime
    tune_malloc(rt.malloc_arenas, rt.malloc_keep_mb)
    stop = faults.StopSignals()
    world = heartbeat = compute = role = None
    try:
        world = dist.start(rt.device, rt.rpc_timeout_s, rt.round_timeout_s, rt.rpc_threads, rt.rpc_transports)
        setup_logging(world.rank)
        threads = rt.intra_op_threads or default_threads(world.local_world_size)
        compute = for_process(world.device, threads, world.is_server, rt.compute_threads)
        if compute.enabled:
            log.info(
                "the replicas compute on %d thread(s) of %d intra-op threads; the main thread is serial "
                "(runtime.compute_threads)",
                compute.workers,
                threads,
            )
        faults.injector = faults.FaultInjector(world.rank)
        token = dist.broadcast_object(world, uuid.uuid4().hex)  # heartbeat keys of this attempt only
        heartbeat = faults.Heartbeat(world.rank, world.world_size, token, rt.peer_timeout_s)
        dist.barrier(world)
        heartbeat.start()
        role = (
            ServerRole(cfg, world, stop, compute)
            if world.is_server
            else ClientRole(cfg, world, stop, compute, data)
        )
        role.run()
        dist.stop(world)
    except faults.Preempted:
        log.warning(
            "stopped by %s; the last complete round's checkpoint in %s is kept: launch the same command "
            "again to continue (runtime.resume=auto)",
            stop.signal.name if stop.signal else "a peer's stop request",
            Path(cfg.output_dir) / "checkpoint",
        )
        dist.stop(world, graceful=False)
        raise SystemExit(faults.EXIT_PREEMPTED) from None
    except tuple(USER_ERRORS.values()):  # a user error, not a crash: no traceback
        dist.stop(world, graceful=False)
        raise
    except BaseException as e:
        lost = heartbeat.silent(wait_s=4 * heartbeat.interval) if heartbeat else []
        code = None
        if lost:
            log.error(
                "lost %s: it stopped answering (%s: %s). Every complete round is checkpointed in %s; "
                "launch the same command again to continue (runtime.resume=auto), or use "
                "torchrun --max-restarts=N to have torchrun do it",
                ", ".join(f"rank {r} ({dist.worker_name(r)})" for r in lost),
                type(e).__name__,
                e,
                Path(cfg.output_dir) / "checkpoint",
            )
            code = faults.EXIT_PEER_LOST
        elif stop.requested:  # torchrun stopping the workers after another one failed, or a preemption
            log.warning("stopping on %s (%s: %s)", stop.signal.name, type(e).__name__, e)
            code = faults.EXIT_PREEMPTED
        else:
            log.exception("run failed")
        dist.stop(world, graceful=False)
        if code is None:
            raise
        raise SystemExit(code) from None
    finally:
        if role is not None:
            role.close()
        if heartbeat is not None:
            heartbeat.close()
        if compute is not None:
            compute.close()
        stop.close()


class Role:
    """What both roles share: the run's settings and the round protocol."""

    def __init__(self, cfg: Config, world: dist.World, stop: faults.StopSignals, compute: ComputeThreads):
        self.cfg, self.world, self.stop = cfg, world, stop
        self.compute = compute  # where this process's tensor work runs (runtime.compute)
        torch.manual_seed(cfg.seed)
        self.model_path = resolve_model_path(cfg)
        self.mcfg = model_config(self.model_path)
        validate_for_world(cfg, world.world_size, self.mcfg.num_hidden_layers)
        self.spec = lora_spec(cfg, self.mcfg)
        self.reference_targets = self.spec.targets  # the uniform placement lora.budget is a fraction of
        if cfg.lora.selection == "importance":  # the warm-up trains and scores every linear weight
            self.spec = dataclasses.replace(self.spec, targets=candidate_targets(self.mcfg))
        self.selection: dict | None = None
        self.out = Path(cfg.output_dir)
        self.full_layout = build_layout(self.mcfg, self.spec, [])
        self.throttle, self.link = Throttle(1.0), Link(None)
        self.plan: dict[int, tuple[int, int]] = {}  # client rank -> (cut layer, rank at the cut)
        self.layout: AdapterLayout = self.full_layout
        self.flat = torch.zeros(0)
        self.weights: dict[int, float] = {}
        self.t_start = 0.0
        self.resume: dict | None = None
        ranks = cfg.lora.client_ranks  # "auto": decided by rank 0 with the plan
        self.caps = {r: ranks[r - 1] if isinstance(ranks, list) else None for r in range(1, world.world_size)}
        # split.mode=u_shape: layers from here up (and the head) stay on every client
        n_layers = self.mcfg.num_hidden_layers
        self.tail_start = n_layers - cfg.split.tail_layers if cfg.split.mode == "u_shape" else None

    @property
    def cut_map(self) -> dict[int, int]:
        return {r: k for r, (k, _) in self.plan.items()}

    def chains(self) -> dict[int, dict[str, int]]:
        """Every client chain's rank on every module, from the plan (the same on every rank)."""
        return {
            r: chain_ranks(self.layout, self.spec, k, cut_rank, self.caps[r], self.tail_start)
            for r, (k, cut_rank) in self.plan.items()
        }

    # ------------------------------------------------------------------ the protocol
    def run(self) -> None:
        done = self.start()
        for rnd in range(done + 1, self.cfg.train.rounds + 1):
            self.round(rnd)
        self.finish()
        dist.barrier(self.world)

    def start(self) -> int:
        """Probes, plans, builds and loads; returns the last completed round (0 for a new run)."""
        w = self.world
        # The simulated speeds of the first round this launch runs (a resumed run's, not round 1's): the
        # probe measures the client as its training will find it.
        self.simulate_round(dist.broadcast_object(w, self.first_round()))
        seqs = dist.gather_objects(w, self.typical_seq_len())
        seq = max(1, round(sum(seqs[1:]) / w.n_clients))
        self.phase(f"probing {w.world_size} processes one at a time (a timed layer, memory, link)")
        profiles = dist.gather_objects(w, self.probe_in_turn(seqs[w.rank] or seq))
        decision = dist.broadcast_object(w, self.decide(profiles, seq))
        if isinstance(decision[0], str):
            raise USER_ERRORS[decision[0]](decision[1])
        self.plan, resume, caps = decision
        self.resume = resume
        self.caps.update({int(r): c for r, c in caps.items()})
        self.layout = self.layout_for_plan()
        if resume and resume.get("selection"):
            self.use_selection(resume["selection"])
        self.phase(f"building the stages (each process loads only its layers from {self.model_path})")
        self.build()
        counts = dist.gather_objects(w, self.n_samples())
        total = sum(counts)
        self.weights = {r: counts[r] / total for r in range(1, w.world_size)}
        self.announce(counts[1:])
        dist.barrier(w)  # replicas exist before any client asks for its RRef
        self.connect()
        done = resume["round"] if resume else 0
        self.flat = resume["flat"] if resume else initial_adapter(self.layout, self.cfg.seed)
        self.load(self.flat.to(w.device), resume)
        self.show_global()
        if done == 0 and self.cfg.lora.selection == "importance":
            self.select()
        if resume and resume["next_plan"]:  # the move decided at the end of that round, replayed
            self.move({int(r): tuple(v) for r, v in resume["next_plan"].items()})
            dist.barrier(w)
            self.plan = {int(r): tuple(v) for r, v in resume["next_plan"].items()}
        dist.barrier(w)
        self.t_start = time.perf_counter() - (resume["elapsed_s"] if resume else 0.0)
        if done == 0:
            self.phase("evaluating the base model before training")
            self.baseline(self.evaluate())
        return done

    def round(self, rnd: int) -> None:
        t_round = time.perf_counter()
        faults.injector.round = rnd
        torch.manual_seed(round_seed(self.cfg.seed, self.world.rank, rnd))
        self.simulate_round(rnd)
        # No client's step reaches the server before the server has reseeded too (its replicas draw
        # dropout masks from this process's generator), so the draws are the same on every run.
        dist.barrier(self.world)
        prediction = self.predict()
        stats = self.train()
        # settle: the round counts only if every rank finished it with finite losses
        settled = dist.gather_objects(
            self.world, (self.stop.requested or stats is None, (stats or {}).get("diverged"))
        )
        diverged = [(r, d) for r, (_, d) in enumerate(settled) if d]
        if diverged:
            rank, d = diverged[0]
            self.diverged(f"client {rank} got loss {d['loss']} at step {d['step']} of round {rnd}", rnd)
        if any(stopping for stopping, _ in settled):
            raise faults.Preempted()
        self.end_training()
        if self.cfg.runtime.debug:
            self.dump_copies(self.out / "debug" / f"round{rnd}")
        self.aggregate(rnd)
        if self.cfg.runtime.debug and self.cfg.train.aggregation == "stack":
            save_file(
                self.merged_copy(),
                str(self.out / "debug" / f"round{rnd}" / f"merged_rank{self.world.rank}.safetensors"),
            )
        dist.barrier(self.world)  # every holder has the global adapter before anyone evaluates
        self.phase(f"round {rnd}: evaluating the global adapter")
        evaluation = self.evaluate()
        if not math.isfinite(evaluation[0]):
            self.diverged(f"the eval loss after round {rnd} is {evaluation[0]}", rnd)
        reports = dist.gather_objects(self.world, self.report(stats))
        new_plan = dist.broadcast_object(self.world, self.replan(rnd, reports, evaluation))
        after_move, move_s = None, 0.0
        if new_plan is not None:
            t_move = time.perf_counter()
            self.move(new_plan)
            dist.barrier(self.world)
            move_s = time.perf_counter() - t_move
            if self.cfg.runtime.debug:  # the model must be the same function after the move
                after_move = self.evaluate()[0]
        self.record(rnd, t_round, prediction, reports, evaluation, new_plan, after_move, move_s)
        if new_plan is not None:
            self.plan = new_plan

    def diverged(self, what: str, rnd: int) -> None:
        """Stops every rank (each calls this with the same text) before anything of the round is saved."""
        kept = (
            f"the checkpoint of round {rnd - 1} in {self.out / 'checkpoint'} is kept"
            if rnd > 1
            else "no round had completed, so nothing was saved"
        )
        raise Diverged(
            f"training diverged: {what}; lower train.lr (now {self.cfg.train.lr:g}) or check that "
            f"client's data; {kept}"
        )

    def phase(self, what: str) -> None:
        """Says what a long phase is doing (rank 0 only: every rank is in the same phase)."""
        if self.world.is_server:
            log.info("%s ...", what)

    def use_selection(self, selection: dict) -> None:
        """Per-module ranks from the importance selection; the layouts follow."""
        self.selection = selection
        self.spec = with_selection(self.spec, selection["ranks"])
        self.full_layout = build_layout(self.mcfg, self.spec, [])
        self.layout = self.layout_for_plan()

    def layout_for_plan(self) -> AdapterLayout:
        if self.cfg.moves_cuts:
            return self.full_layout
        order = sorted(self.cut_map)
        return build_layout(
            self.mcfg,
            self.spec,
            [self.cut_map[r] for r in order],
            [self.caps[r] for r in order],
            self.tail_start,
        )

    def select(self) -> None:
        """HSplitLoRA step 1 and 2: a warm-up scores every candidate weight, rank 0 allocates ranks under
        the budget, and every holder starts again with LoRA on the chosen weights only."""
        w = self.world
        log.info(
            "importance warm-up: %d steps scoring %d weights",
            self.cfg.lora.warmup_steps,
            len(self.layout.slots),
        )
        self.prepare_warmup()
        dist.barrier(w)
        scores = dist.gather_objects(w, self.warmup())
        selection = dist.broadcast_object(w, self.choose(scores))
        self.use_selection(selection)
        self.relora()
        self.flat = initial_adapter(self.layout, self.cfg.seed)
        self.load(self.flat.to(w.device), None)
        self.show_global()
        dist.barrier(w)

    def aggregate(self, rnd: int) -> None:
        """One all-reduce (``train.aggregation``); every holder then loads the global adapter."""
        rule = self.cfg.train.aggregation
        result = aggregate(
            rule,
            self.holders(),
            self.layout,
            self.chains(),
            self.flat,
            self.spec,
            self.world.device,
            self.world.aggregation,
            self.weights,
        )
        if result.summed is not None:
            self.merge(result.stack, result.summed)
        self.flat = result.flat
        for _, model, _ in self.holders():
            write_adapter(model, self.layout, self.flat.to(self.world.device))
        self.show_global()
        self.aggregated(result.nbytes)

    def evaluate(self) -> tuple[float, float, float]:
        """(loss, token accuracy, tokens) of the global model over the whole held-out set: every holder
        evaluates through the global adapter at its full rank, so this is the exported model's loss."""
        totals = torch.stack(dist.gather_objects(self.world, self.eval_totals())).sum(0)
        loss_sum, tokens, correct = totals.tolist()
        return loss_sum / max(tokens, 1.0), correct / max(tokens, 1.0), tokens

    def probe_in_turn(self, seq: int) -> ResourceProfile:
        """This rank's ResourceProfile, measured one rank at a time (barriers in between)."""
        w, cfg = self.world, self.cfg
        payload = cfg.train.batch_size * seq * self.mcfg.hidden_size * DTYPES[cfg.model.dtype].itemsize
        profile = None
        for turn in range(w.world_size):
            if turn == w.rank:
                profile = self.compute.run(
                    lambda: probe(
                        self.model_path,
                        self.spec,
                        cfg.train.batch_size,
                        seq,
                        w.device,
                        cfg.model.dtype,
                        cfg.model.attn_implementation,
                        self.throttle,
                        send=None if w.is_server else lambda t: rpc.rpc_sync(SERVER, sink, args=(t,)),
                        payload_bytes=payload,
                        link=self.link,
                        server=w.is_server,
                    )
                )
            dist.barrier(w)
        return profile

    # ------------------------------------------------------------------ role hooks (defaults: nothing)
    def first_round(self) -> int:
        return 1

    def simulate_round(self, rnd: int) -> None:
        pass

    def typical_seq_len(self) -> int:
        return 0

    def decide(self, profiles: list[ResourceProfile], seq: int):
        return None

    def announce(self, counts: list[int]) -> None:
        pass

    def connect(self) -> None:
        pass

    def baseline(self, evaluation: tuple[float, float, float]) -> None:
        pass

    def merge(self, stack: StackLayout, summed: torch.Tensor) -> None:
        pass

    def end_training(self) -> None:
        pass

    def merged_copy(self) -> dict[str, torch.Tensor]:
        """stack: this rank's merged weights of the modules it holds (runtime.debug; used by the tests)."""
        return {}

    def prepare_warmup(self) -> None:
        pass

    def warmup(self) -> dict | None:
        return None

    def choose(self, scores: list[dict | None]) -> dict | None:
        return None

    def aggregated(self, nbytes: int) -> None:
        pass

    def predict(self):
        return None

    def replan(self, rnd: int, reports: list[dict], evaluation) -> dict | None:
        return None

    def record(self, rnd, t_round, prediction, reports, evaluation, new_plan, after_move, move_s) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        """On the way out, however the run ends."""


class ServerRole(Role):
    """Rank 0: the shared frozen base, one LoRA replica per client, the scheduler, metrics and checkpoints."""

    def __init__(self, cfg: Config, world: dist.World, stop: faults.StopSignals, compute: ComputeThreads):
        super().__init__(cfg, world, stop, compute)
        self.ckpt_root = self.out / "checkpoint"
        self.saver = checkpoint.Saver(self.ckpt_root, cfg.runtime.keep_checkpoints)
        self.scheduler: Scheduler | None = None
        self.server: Server | None = None
        self.records: list[dict] = []
        self.writer: MetricsWriter | None = None
        self.round_calls: dict[int, dict[str, int]] = {}
        self.usage: dict[str, float] = {}  # CpuUsage of the last round's training
        self.fingerprint = fingerprint(cfg, world.n_clients)
        # simulate.server_slowdown: hooked on the probe's layer and on every replica's layers
        self.throttle = Throttle(cfg.simulate.for_server(1), changing=cfg.simulate.changes)

    def simulate_round(self, rnd: int) -> None:
        """Applies the server slowdown a ``simulate.server_slowdown`` schedule gives round ``rnd``."""
        factor = self.cfg.simulate.for_server(rnd)
        if factor != self.throttle.factor:
            log.info("round %d: simulated server slowdown %g -> %g", rnd, self.throttle.factor, factor)
        self.throttle.set(factor)

    def first_round(self) -> int:
        """The round this launch starts with: after the newest checkpoint's, where it will resume (read only
        when a simulated speed follows a schedule; the full checks come in ``decide``)."""
        if not self.cfg.simulate.changes or self.cfg.resume == "false":
            return 1
        found = checkpoint.latest(self.ckpt_root, adapter=False)
        return found[0]["round"] + 1 if found else 1

    def decide(self, profiles: list[ResourceProfile], seq: int):
        """The plan and the resume state: ((plan, resume) or (error kind, message)), sent to every rank."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "profiles.json").write_text(
            json.dumps({str(r): p.to_dict() for r, p in enumerate(profiles)})
        )
        (self.out / "run_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        try:
            resume = self.load_checkpoint()
            costs = model_costs(
                self.mcfg,
                self.cfg,
                self.full_layout,
                seq,
                max(p.activation_bytes for p in profiles[1:]),
                self.world.n_clients,
            )
            self.scheduler = Scheduler(self.cfg, costs, profiles[1:], profiles[0], self.compute.threads)
            if resume is None:
                cuts = self.scheduler.initial()
                plan = {r: (k, self.spec.r_cut) for r, k in enumerate(cuts, start=1)}
                caps = {}
                if self.cfg.lora.client_ranks == "auto":
                    caps = dict(enumerate(self.scheduler.client_ranks(cuts), start=1))
                    log.info("client ranks from memory (lora.client_ranks=auto): %s", caps)
            else:
                plan = {int(r): tuple(v) for r, v in resume["plan"].items()}
                caps = {int(r): c for r, c in (resume.get("client_ranks") or {}).items()}
                self.scheduler.load_state_dict(resume["scheduler"])
        except (PlanError, CheckpointMismatch) as e:
            return (type(e).__name__, str(e))
        self.records = resume["metrics"] if resume else []
        self.writer = MetricsWriter(self.out / "metrics.jsonl", self.records)
        return plan, resume, caps

    def load_checkpoint(self) -> dict | None:
        """The newest complete checkpoint's state (with its adapter as ``flat``), per runtime.resume."""
        if self.cfg.resume == "false":
            return None
        found = checkpoint.latest(self.ckpt_root)
        if found is None:
            if self.cfg.resume == "true":
                raise CheckpointMismatch(
                    f"runtime.resume=true but {str(self.ckpt_root)!r} holds no complete checkpoint: "
                    "use runtime.resume=auto to start when there is none"
                )
            return None
        state, flat = found
        checkpoint.check_fingerprint(self.ckpt_root, state, self.fingerprint)
        log.info("resuming after round %d from %s", state["round"], self.ckpt_root)
        return {**state, "flat": flat}

    def build(self) -> None:
        self.server = Server(
            self.model_path,
            self.cut_map,
            self.spec,
            self.world.device,
            self.cfg,
            lambda: self.stop.requested,
            self.throttle,
            self.compute,
        )
        self.server.layout = self.layout
        if self.server.merging:
            if self.cfg.model.dtype != "float32":
                log.warning(
                    "train.aggregation=stack merges every round's delta into %s weights, where a small "
                    "delta can round away: model.dtype=float32 keeps it",
                    self.cfg.model.dtype,
                )
            self.server.init_shadow(self.layout)
            if self.resume:
                self.server.load_merged(
                    self.layout, checkpoint.merged_weights(self.ckpt_root, self.resume["round"])
                )
        install(self.server)

    def n_samples(self) -> int:
        return 0

    def holders(self) -> list[tuple[int, torch.nn.Module, float]]:
        return [(r, rep.stage.hf, self.weights[r]) for r, rep in sorted(self.server.replicas.items())]

    def show_global(self) -> None:
        for replica in self.server.replicas.values():
            replica.global_adapter = (self.layout, self.flat.to(self.world.device))

    def announce(self, counts: list[int]) -> None:
        log.info(
            "model %s (%s, %d layers); %d clients with %s training samples",
            self.model_path,
            self.mcfg.model_type,
            self.mcfg.num_hidden_layers,
            len(counts),
            counts,
        )
        for line in describe_plan(self.scheduler, [self.cut_map[r] for r in sorted(self.cut_map)]):
            log.info(line)

    def load(self, flat: torch.Tensor, resume: dict | None) -> None:
        for _, model, _ in self.holders():
            write_adapter(model, self.layout, flat)

    def baseline(self, evaluation: tuple[float, float, float]) -> None:
        loss, acc, tokens = evaluation
        log.info("before training: eval_loss %.4f, token accuracy %.4f", loss, acc)
        (self.out / "baseline.json").write_text(
            json.dumps({"eval_loss": loss, "eval_token_accuracy": acc, "eval_tokens": tokens})
        )
        log.info(header())

    def predict(self):
        return self.scheduler.predict([self.cut_map[r] for r in sorted(self.cut_map)])

    def train(self) -> dict:
        self._usage = CpuUsage()  # what the server process and the host used while the clients trained
        return {}  # the replicas serve the clients' steps on RPC threads

    def end_training(self) -> None:
        for replica in self.server.replicas.values():
            replica.flush()  # each client's last step, applied lazily
        self.round_calls = {r: dict(rep.calls) for r, rep in self.server.replicas.items()}
        self.usage = self._usage.stop()

    def merge(self, stack: StackLayout, summed: torch.Tensor) -> None:
        self.server.merge(self.layout, stack, summed)

    def prepare_warmup(self) -> None:
        for replica in self.server.replicas.values():
            replica.scorer = Sensitivity()

    def choose(self, scores: list[dict | None]) -> dict:
        """Combines every chain's scores (client part + its replica's) and allocates the ranks."""
        chains = []
        for r, replica in sorted(self.server.replicas.items()):
            replica.flush()
            chains.append(({**scores[r], **replica.scorer.scores()}, self.weights[r]))
            replica.scorer = None
            replica.take_step_time()
            replica.new_round()
        combined = combine(chains)
        shapes = {s.name: (s.in_features, s.out_features) for s in self.full_layout.slots}
        suffix = lambda name: name.rsplit(".", 1)[-1]
        reference = {n: v for n, v in shapes.items() if suffix(n) in self.reference_targets}
        uniform = uniform_params(reference, self.spec.r)
        budget = self.cfg.lora.budget * uniform
        ranks = allocate_ranks(combined, shapes, budget, self.spec.r)
        params = sum(r * sum(shapes[n]) for n, r in ranks.items())
        chosen = {n: r for n, r in ranks.items() if r > 0}
        log.info(
            "importance selection: %d of %d weights, %d trainable parameters (budget %d = %.2f x uniform %d)",
            len(chosen),
            len(ranks),
            params,
            budget,
            self.cfg.lora.budget,
            uniform,
        )
        return {
            "ranks": ranks,
            "scores": combined,
            "trainable_params": params,
            "budget_params": budget,
            "uniform_params": uniform,
            "warmup_steps": self.cfg.lora.warmup_steps,
        }

    def relora(self) -> None:
        for replica in self.server.replicas.values():
            replica.relora(self.spec)
        self.server.layout = self.layout
        if self.server.merging:
            self.server.init_shadow(self.layout)
        (self.out / "selection.json").write_text(json.dumps(self.selection, indent=1))

    def merged_copy(self) -> dict[str, torch.Tensor]:
        return self.server.merged_weights(self.layout, [s.name for s in self.layout.slots])

    def aggregated(self, nbytes: int) -> None:
        for replica in self.server.replicas.values():
            replica.new_round()

    def eval_totals(self) -> torch.Tensor:
        return torch.zeros(3, dtype=torch.float64)

    def report(self, stats: dict) -> dict:
        server_s = {r: rep.take_step_time() for r, rep in self.server.replicas.items()}
        return {"stats": {"peak_rss_mb": peak_rss_mb(), "server_s": server_s}, "comm": {}}

    def replan(self, rnd: int, reports: list[dict], evaluation) -> dict | None:
        if rnd >= self.cfg.train.rounds:
            return None
        order = sorted(self.cut_map)
        server_s = reports[0]["stats"]["server_s"]
        cuts = self.scheduler.after_round(
            rnd,
            [self.cut_map[r] for r in order],
            [{**reports[r]["stats"], "server_s": server_s[r]} for r in order],
            evaluation[0],
        )
        if cuts is None:
            return None
        return {
            r: self.plan[r] if k == self.cut_map[r] else (k, _cut_rank(self.layout, self.flat, k, self.spec))
            for r, k in zip(order, cuts)
        }

    def move(self, new_plan: dict[int, tuple[int, int]]) -> None:
        self.server.move({r: k for r, (k, _) in new_plan.items()}, self.plan, self.layout, self.flat)

    def record(self, rnd, t_round, prediction, reports, evaluation, new_plan, after_move, move_s) -> None:
        now = time.perf_counter()
        server_s = reports[0]["stats"]["server_s"]
        rec = _record(rnd, now - self.t_start, now - t_round, reports, evaluation, self.cut_map, self.weights)
        rec["plan"] = _plan_record(self.cfg, self.plan, new_plan, prediction, after_move, move_s)
        rec["plan"]["client_ranks"] = {str(r): c or self.spec.r for r, c in self.caps.items()}
        rec["server"].update(self.usage)
        if self.scheduler.reason is not None:
            rec["plan"]["replan"] = self.scheduler.reason
        if self.cfg.simulate.changes:  # what the clients were made to do (never shown to the scheduler)
            rec["simulated"] = {
                str(r): dict(
                    zip(("slowdown", "bandwidth_mbps"), self.cfg.simulate.for_client(r - 1, rnd)[::2])
                )
                for r in sorted(self.cut_map)
            }
            rec["simulated"]["server"] = {"slowdown": self.cfg.simulate.for_server(rnd)}
        for i, r in enumerate(sorted(self.cut_map)):
            rec["clients"][str(r)]["predicted_time_s"] = prediction.client_time_s[i]
            rec["clients"][str(r)]["server_s"] = server_s[r]
            # RPCs the replica served for this client's training steps; with each step's distributed
            # backward ("backward") they are the step's round trips
            rec["clients"][str(r)]["server_calls"] = self.round_calls.get(r, {})
        if self.selection is not None and rnd == 1:
            rec["lora_selection"] = {
                **{k: v for k, v in self.selection.items() if k not in ("ranks", "scores")},
                "ranks": {n: r for n, r in self.selection["ranks"].items() if r > 0},
            }
        self.writer.write(rec)
        self.records.append(rec)
        log.info(row(rec))
        log.info(
            round_line(
                rnd, self.cfg.train.rounds, rec["elapsed_s"], [r["round_time_s"] for r in self.records]
            )
        )
        order = sorted(self.cut_map)
        said = describe_replan(
            self.scheduler,
            rnd,
            [self.cut_map[r] for r in order],
            None if new_plan is None else [new_plan[r][0] for r in order],
        )
        if said:
            log.info(said)
        if new_plan is not None:
            for line in describe_plan(self.scheduler, [new_plan[r][0] for r in order])[1:]:
                log.info(line)
        export = None
        if not self.server.merging:  # under stack the model is the merged weights (launch.export --merged)
            export = checkpoint.prepare_export(
                self.out, self.layout, self.flat, self.spec, self.mcfg, self.model_path, self.selection
            )
        plan_json = lambda p: None if p is None else {str(r): list(v) for r, v in p.items()}
        state = {
            "round": rnd,
            "elapsed_s": now - self.t_start,
            "fingerprint": self.fingerprint,
            "plan": plan_json(self.plan),
            "next_plan": plan_json(new_plan),
            "scheduler": self.scheduler.state_dict(),
            "data_positions": {str(r): reports[r]["stream"] for r in sorted(self.cut_map)},
            "selection": self.selection,
            "client_ranks": {str(r): c for r, c in self.caps.items() if c is not None},
            "metrics": self.records,
        }
        merged = None
        if self.server.merging:
            merged = self.server.merged_weights(self.layout, [s.name for s in self.layout.slots])
        # written while the next round trains; finish() and close() wait for it
        self.saver.submit(rnd, self.flat, state, merged, export)

    def close(self) -> None:
        """Waits for the checkpoint in flight, so a stopped or failed run keeps its last complete round."""
        try:
            self.saver.wait()
        except OSError as e:  # the run is ending for another reason: say it, do not hide that reason
            log.error("%s", e)

    def dump_copies(self, folder: Path) -> None:
        _dump_copies(
            folder,
            {f"server_for{r}": (rep.stage.hf, self.weights[r]) for r, rep in self.server.replicas.items()},
        )

    def finish(self) -> None:
        self.saver.wait()  # the last round's checkpoint and adapter are on disk before the job ends
        if self.cfg.runtime.debug:
            (self.out / "debug" / "wire.json").write_text(
                json.dumps(
                    {
                        r: {"received": sorted(rep.received), "sent": sorted(rep.sent)}
                        for r, rep in self.server.replicas.items()
                    },
                    indent=1,
                )
            )


class ClientRole(Role):
    """Rank r >= 1: its own data, the embeddings and layers ``0..k-1``, its optimizer."""

    def __init__(
        self,
        cfg: Config,
        world: dist.World,
        stop: faults.StopSignals,
        compute: ComputeThreads,
        data: ClientData | None,
    ):
        super().__init__(cfg, world, stop, compute)
        slowdown, memory_gb, bandwidth = cfg.simulate.for_client(world.rank - 1)
        apply_memory_limit(memory_gb, world.device)
        self.throttle, self.link = Throttle(slowdown, changing=cfg.simulate.changes), Link(bandwidth)
        self.data = data or client_data(cfg, self.model_path, world.rank - 1, world.n_clients)
        self.client: Client | None = None

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
        d = self.data
        return typical_seq_len(
            d.examples, d.shard, self.cfg.train.batch_size, data_seed(self.cfg, self.world.rank - 1)
        )

    def build(self) -> None:
        k, cut_rank = self.plan[self.world.rank]
        self.client = Client(
            self.world.rank,
            k,
            cut_rank,
            self.cfg,
            self.model_path,
            self.spec,
            self.data,
            self.world.device,
            self.throttle,
            self.link,
            self.caps[self.world.rank],
        )

    def n_samples(self) -> int:
        return self.client.n_samples

    def connect(self) -> None:
        self.client.connect()

    def load(self, flat: torch.Tensor, resume: dict | None) -> None:
        for model in self.client.models:
            write_adapter(model, self.layout, flat)
        if resume is not None:
            self.client.stream.load_state_dict(resume["data_positions"][str(self.world.rank)])
            if self.cfg.train.aggregation == "stack":
                self.client.fetch_merged(self.layout, self.client.layers)

    def holders(self) -> list[tuple[int, torch.nn.Module, float]]:
        r = self.world.rank
        return [(r, model, self.weights[r]) for model in self.client.models]

    def show_global(self) -> None:
        self.client.global_adapter = (self.layout, self.flat.to(self.world.device))

    def train(self) -> dict | None:
        usage = CpuUsage()
        stats = self.client.train_round(self.cfg.train.local_steps, lambda: self.stop.requested)
        if stats is not None and "diverged" not in stats:
            stats["train_cores_used"] = usage.stop()["train_cores_used"]  # this process, while it trained
        return stats

    def merge(self, stack: StackLayout, summed: torch.Tensor) -> None:
        self.client.merge(self.layout, stack, summed)

    def warmup(self) -> dict:
        scorer = Sensitivity()
        self.client.train_round(self.cfg.lora.warmup_steps, lambda: False, scorer)
        self.client.take_comm()
        return scorer.scores()

    def relora(self) -> None:
        self.client.relora(self.spec)

    def merged_copy(self) -> dict[str, torch.Tensor]:
        return {
            name: m.get_base_layer().weight.detach().cpu().clone()
            for model in self.client.models
            for name, m in lora_modules(model).items()
        }

    def aggregated(self, nbytes: int) -> None:
        c = self.client
        c.comm["adapters_up"] += nbytes
        c.comm["adapters_down"] += nbytes
        c.link.delay(2 * nbytes)

    def eval_totals(self) -> torch.Tensor:
        return self.client.evaluate()

    def report(self, stats: dict) -> dict:
        return {"stats": stats, "comm": self.client.take_comm(), "stream": self.client.stream.state_dict()}

    def move(self, new_plan: dict[int, tuple[int, int]]) -> None:
        k, cut_rank = new_plan[self.world.rank]
        if k != self.client.cut:
            self.client.move(k, cut_rank, self.layout, self.flat)

    def dump_copies(self, folder: Path) -> None:
        r = self.world.rank
        copies = {f"client{r}": (self.client.stage.hf, self.weights[r])}
        if self.client.tail is not None:
            copies[f"client{r}_tail"] = (self.client.tail.hf, self.weights[r])
        _dump_copies(folder, copies)


def _cut_rank(layout: AdapterLayout, flat: torch.Tensor, k: int, spec: LoraSpec) -> int:
    """The reduced rank on a new cut layer where that changes nothing, else the full rank (models.moves)."""
    return spec.r_cut if reducible(layout, flat, k - 1, spec.r_cut) else spec.r


def _plan_record(cfg, plan, new_plan, prediction, after_move, move_s) -> dict:
    record = {
        "policy": cfg.policy,
        "cut_ranks": {str(r): v[1] for r, v in plan.items()},
        "predicted_round_time_s": prediction.round_time_s,
        "bottleneck": prediction.bottleneck,
        "next_cut_layers": None if new_plan is None else {str(r): v[0] for r, v in new_plan.items()},
        "move_s": move_s,
    }
    if after_move is not None:
        record["eval_loss_after_move"] = after_move
    return record


def _record(rnd, elapsed, round_time, reports, evaluation, cut_map, weights) -> dict:
    clients = {rank: reports[rank]["stats"] for rank in cut_map}
    comm = {rank: reports[rank]["comm"] for rank in cut_map}
    tokens = sum(c["train_tokens"] for c in clients.values())
    return round_record(
        rnd,
        elapsed,
        round_time,
        sum(c["train_loss"] * c["train_tokens"] for c in clients.values()) / max(tokens, 1.0),
        evaluation,
        sum(c["input_tokens"] for c in clients.values()),
        cut_layers={str(r): k for r, k in cut_map.items()},
        comm_bytes={str(r): {k: c[k] for k in COMM_KEYS} for r, c in comm.items()},
        eval_comm_bytes={str(r): c["eval_activations_up"] for r, c in comm.items()},
        server={"peak_rss_mb": reports[0]["stats"]["peak_rss_mb"]},
        clients={
            str(r): {
                "weight": weights[r],
                **{
                    k: c[k]
                    for k in (
                        "steps",
                        "train_loss",
                        "train_time_s",
                        "step_time_s",
                        "compute_s",
                        "step_losses",
                        "peak_rss_mb",
                        "vmdata_mb",
                        "stage_param_mb",
                        "lora_bytes",
                        "train_cores_used",
                    )
                },
            }
            for r, c in clients.items()
        },
    )


def _dump_copies(folder: Path, copies: dict[str, tuple[torch.nn.Module, float]]) -> None:
    """Writes each holder's pre-aggregation LoRA weights and its weight (runtime.debug; used by the tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (model, weight) in copies.items():
        tensors = {}
        for module, m in lora_modules(model).items():
            tensors[f"{module}.A"] = m.lora_A["default"].weight.detach().cpu().contiguous()
            tensors[f"{module}.B"] = m.lora_B["default"].weight.detach().cpu().contiguous()
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"weight": repr(weight)})
