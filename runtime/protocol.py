"""The round protocol: the phases every rank goes through together, so that the collectives line up.

``Role`` runs the protocol; ``ServerRole`` (rank 0, ``runtime.server_role``) and ``ClientRole``
(ranks >= 1, ``runtime.client_role``) say what each does in each phase through the hooks at the end
of this class (a hook a role does not need does nothing). What crosses ranks in each phase is a
typed message of ``runtime.messages``:

    start      probe every process one at a time, plan the cuts (or take the checkpoint's): a
               ``Decision`` or a ``UserError`` from rank 0; build the stages; load the initial or
               checkpointed adapter (replaying a move it recorded); ``lora.selection=importance``:
               round 0's draw of clients warms up, rank 0 chooses the weights (``select``)
    train      clients take ``local_steps`` steps through their server replicas, all at once
    settle     every rank says whether it was asked to stop (SIGTERM/SIGUSR1) or diverged
               (``Settled``): one stops all
    aggregate  one all-reduce gives every holder the global adapter
    evaluate   the global model on the held-out set (every ``eval.every`` rounds and the last), each
               client's held-back samples (``eval.client_fraction``), greedy decoding (``eval.generate``)
    re-plan    rank 0 may move cuts (from the ``ClientReport`` / ``ServerReport`` of every rank);
               every rank moves the layers concerned
    record     rank 0 writes metrics.jsonl, and hands the PEFT adapter and the round's checkpoint to
               a thread that writes them while the next round trains (``checkpoint.Saver``)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed.rpc as rpc
from safetensors.torch import save_file

from models.aggregation import StackLayout, fedavg_numel, fedavg_vector, stack_vector
from models.lora import (
    AdapterLayout,
    build_layout,
    candidate_targets,
    chain_ranks,
    initial_adapter,
    with_selection,
    write_adapter,
)
from models.stages import DTYPES
from partition.sampling import round_weights, sample_clients
from runtime import dist, faults
from runtime.aggregate import aggregate
from runtime.compute import ComputeThreads
from runtime.config import Config, validate_for_world
from runtime.dist import SERVER
from runtime.job import lora_spec, model_config, resolve_model_path, round_seed
from runtime.messages import (
    Assignment,
    ClientRound,
    Decision,
    Diverged,
    EvalDetails,
    GenerationScore,
    RunState,
    Settled,
    UserError,
    WarmupScores,
    first_divergence,
)
from runtime.probe import ResourceProfile, probe
from runtime.record import RoundOutcome
from runtime.server import sink
from runtime.simulate import Link, Throttle

log = logging.getLogger("splitft")

Evaluation = tuple[float, float, float]  # (loss, token accuracy, tokens) of the global model
Plan = dict[int, tuple[int, int]]  # client -> (cut layer, LoRA rank at the cut)


class Role:
    """What both roles share: the run's settings and the round protocol."""

    def __init__(self, cfg: Config, world: dist.World, stop: faults.StopSignals, compute: ComputeThreads):
        # a seeded per-client draw of a simulate knob becomes its list of N values, the same on every rank
        n = cfg.n_clients(world.world_size)
        cfg = dataclasses.replace(cfg, simulate=cfg.simulate.drawn(n, cfg.seed))
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
        self.plan: Plan = {}
        # Clients sharing workers: the (cut, cut rank) each client had before the move decided at the end
        # of round moved_round - 1; in moved_round its worker moves it from there, as its own worker would
        self.moved_from: Plan = {}
        self.moved_round = 0
        self.layout: AdapterLayout = self.full_layout
        self.flat = torch.zeros(0)
        self.counts: dict[int, int] = {}  # client -> its training samples
        self.weights: dict[int, float] = {}  # client -> its weight in this round's aggregate
        self.participants: list[int] = []  # the clients that train this round (train.clients_per_round)
        self.t_start = 0.0
        self.rnd = 0  # the round in progress (0: start-up and the importance warm-up)
        self.resume: RunState | None = None
        # N clients on the M workers (ranks 1..M); more clients than workers: each worker trains the
        # clients rank 0 assigns it (an Assignment each round), one after another
        self.n_clients = cfg.n_clients(world.world_size)
        self.workers = list(range(1, world.world_size))
        self.multiplexed = self.n_clients > len(self.workers)
        self.assignment: Assignment | None = None
        self._stack: StackLayout | None = None
        self._stack_key: tuple = (None, None)  # the layout and plan it was built for
        ranks = cfg.lora.client_ranks  # "auto": decided by rank 0 with the plan
        self.caps = {
            c: ranks[c - 1] if isinstance(ranks, list) else None for c in range(1, self.n_clients + 1)
        }
        # split.mode=u_shape: layers from here up (and the head) stay on every client
        n_layers = self.mcfg.num_hidden_layers
        self.tail_start = n_layers - cfg.split.tail_layers if cfg.split.mode == "u_shape" else None

    @property
    def cut_map(self) -> dict[int, int]:
        return {r: k for r, (k, _) in self.plan.items()}

    @property
    def cuts(self) -> list[int]:
        """The cut of every client, in client order."""
        return [self.cut_map[r] for r in sorted(self.cut_map)]

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
        seq = max(1, round(sum(seqs[1:]) / w.n_workers))
        self.phase(f"probing {w.world_size} processes one at a time (a timed layer, memory, link)")
        profiles = dist.gather_objects(w, self.probe_in_turn(seqs[w.rank] or seq))
        decision: Decision | UserError = dist.broadcast_object(w, self.decide(profiles, seq))
        if isinstance(decision, UserError):
            raise decision.exception()
        self.plan, self.resume = decision.plan, decision.resume
        self.caps.update(decision.caps)
        self.layout = self.layout_for_plan()
        resume = self.resume
        if resume and resume.selection:
            self.use_selection(resume.selection)
        self.phase(f"building the stages (each process loads only its layers from {self.model_path})")
        self.build()
        self.counts = {}
        for per_rank in dist.gather_objects(w, self.n_samples()):  # workers sharing clients all say all
            self.counts.update(per_rank)
        self.participants = sorted(self.counts)
        self.weights = round_weights(self.counts, self.participants)  # until a round (or the warm-up) draws
        self.announce([self.counts[c] for c in self.participants])
        dist.barrier(w)  # replicas exist before any client asks for its RRef
        self.connect()
        done = resume.round if resume else 0
        self.flat = decision.flat if resume else initial_adapter(self.layout, self.cfg.seed)
        self.load(self.flat.to(w.device), resume)
        self.show_global()
        if done == 0 and self.cfg.lora.selection == "importance":
            self.select()
        if resume and resume.next_plan:  # the move decided at the end of that round, replayed
            self.move(resume.next_plan)
            dist.barrier(w)
            self.take_plan(dict(resume.next_plan), done + 1)
        dist.barrier(w)
        self.t_start = time.perf_counter() - (resume.elapsed_s if resume else 0.0)
        if done == 0:
            self.phase("evaluating the base model before training")
            self.baseline(*self.evaluate_all())
        return done

    def round(self, rnd: int) -> None:
        t_round = time.perf_counter()
        self.rnd = rnd
        faults.injector.round = rnd
        faults.progress.begin_round(rnd)
        torch.manual_seed(round_seed(self.cfg.seed, self.world.rank, rnd))
        self.simulate_round(rnd)
        t = self.cfg.train
        self.participants = sample_clients(
            self.cfg.seed, rnd, self.counts, t.clients_per_round, t.client_sampling
        )
        self.weights = round_weights(self.counts, self.participants)
        self.begin_round(rnd)
        if self.multiplexed:
            self.assignment = dist.broadcast_object(self.world, self.assign(rnd))
        # No client's step reaches the server before the server has reseeded too (its replicas draw
        # dropout masks from this process's generator), so the draws are the same on every run.
        dist.barrier(self.world)
        prediction = self.predict()
        faults.progress.mark("training")
        faults.injector.hit("hang")
        trained = self.train()
        self.settle(rnd, trained)
        self.end_training()
        if self.cfg.runtime.debug:
            self.dump_copies(self.out / "debug" / f"round{rnd}")
        faults.progress.mark("aggregating")
        self.aggregate(rnd)
        if self.cfg.runtime.debug and self.cfg.train.aggregation == "stack":
            save_file(
                self.merged_copy(),
                str(self.out / "debug" / f"round{rnd}" / f"merged_rank{self.world.rank}.safetensors"),
            )
        dist.barrier(self.world)  # every holder has the global adapter before anyone evaluates
        evaluation, details = None, None  # eval.every: a round not evaluated measures nothing
        if rnd % self.cfg.eval.every == 0 or rnd == self.cfg.train.rounds:
            self.phase(f"round {rnd}: evaluating the global adapter")
            evaluation, details = self.evaluate_all()
            if not math.isfinite(evaluation[0]):
                self.diverged(f"the eval loss after round {rnd} is {evaluation[0]}", rnd)
        reports = dist.gather_objects(self.world, self.report(trained))
        new_plan = dist.broadcast_object(self.world, self.replan(rnd, reports, evaluation))
        after_move, move_s = None, 0.0
        if new_plan is not None:
            t_move = time.perf_counter()
            self.move(new_plan)
            dist.barrier(self.world)
            move_s = time.perf_counter() - t_move
            if self.cfg.runtime.debug:  # the model must be the same function after the move
                after_move = self.evaluate()[0]
        self.record(
            RoundOutcome.gathered(
                rnd,
                started=t_round,
                prediction=prediction,
                reports=reports,
                evaluation=evaluation,
                details=details,
                new_plan=new_plan,
                after_move=after_move,
                move_s=move_s,
            )
        )
        if new_plan is not None:
            self.take_plan(new_plan, rnd + 1)

    def take_plan(self, new_plan: Plan, rnd: int) -> None:
        """The plan from round ``rnd`` on. A client whose cut it changes starts round ``rnd`` moved from its
        old cut (``moved_from``): with one client per worker its stage moved at once (``move``); a worker
        that shares clients moves the client when it switches to it, if it trains in round ``rnd``, so its
        first steps at the new cut start where its own worker's would (after that round every client
        holds the global adapter at its cut either way)."""
        self.moved_from = {c: self.plan[c] for c, (k, _) in new_plan.items() if k != self.plan[c][0]}
        self.moved_round = rnd
        self.plan = new_plan

    def settle(self, rnd: int, trained: ClientRound) -> None:
        """The round counts only if every rank finished it with finite losses: one stops all."""
        settled: list[Settled] = dist.gather_objects(self.world, self.settled(trained))
        error = next((s.error for s in settled if s.error is not None), None)
        if error is not None:  # the lowest rank's: every rank stops with the same message
            raise error.exception()
        diverged = first_divergence(settled)
        if diverged is not None:
            rank, d = diverged
            who = d.client if d.client is not None else rank
            self.diverged(f"client {who} got loss {d.loss} at step {d.step} of round {rnd}", rnd)
        if any(s.stopping for s in settled):
            raise faults.Preempted()

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
        """Says what a long phase is doing (rank 0 only: every rank is in the same phase); every rank
        records it as progress (``faults.progress``)."""
        faults.progress.mark(what)
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
        return build_layout(self.mcfg, self.spec, self.cuts, [self.caps[r] for r in order], self.tail_start)

    def select(self) -> None:
        """HSplitLoRA step 1 and 2: a warm-up scores every candidate weight, rank 0 allocates ranks under
        the budget, and every holder starts again with LoRA on the chosen weights only.

        The warm-up's clients are round 0's draw (``train.clients_per_round`` of them, seeded as every
        round's; every client when it is unset), weighted by their shares of the drawn samples: what a
        round trains, so the warm-up costs one round's clients whatever N is, and its clients and
        weights do not depend on the workers. Clients sharing workers warm up one after another on
        the worker rank 0 assigns them, as they train."""
        w, t = self.world, self.cfg.train
        self.participants = sample_clients(
            self.cfg.seed, 0, self.counts, t.clients_per_round, t.client_sampling
        )
        self.weights = round_weights(self.counts, self.participants)
        log.info(
            "importance warm-up: %d steps of clients %s scoring %d weights",
            self.cfg.lora.warmup_steps,
            self.participants,
            len(self.layout.slots),
        )
        self.prepare_warmup()
        if self.multiplexed:
            self.assignment = dist.broadcast_object(w, self.assign(0))
        dist.barrier(w)
        scores = dist.gather_objects(w, self.warmup())
        selection: dict | UserError = dist.broadcast_object(w, self.choose(scores))
        if isinstance(selection, UserError):
            raise selection.exception()
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
            self.contribution() if self.multiplexed else None,
        )
        if result.summed is not None:
            self.merge(result.stack, result.summed)
        self.flat = result.flat
        for _, model, _ in self.holders():
            write_adapter(model, self.layout, self.flat.to(self.world.device))
        self.show_global()
        self.aggregated(result.nbytes)

    def evaluate(self) -> Evaluation:
        """(loss, token accuracy, tokens) of the global model over the whole held-out set: every holder
        evaluates through the global adapter at its full rank, so this is the exported model's loss."""
        totals = torch.stack(dist.gather_objects(self.world, self.eval_totals())).sum(0)
        loss_sum, tokens, correct = totals.tolist()
        return loss_sum / max(tokens, 1.0), correct / max(tokens, 1.0), tokens

    def evaluate_all(self) -> tuple[Evaluation, EvalDetails]:
        """The global model's loss on the eval set, then what the ``eval`` section asks for besides: each
        client's loss on its own held-back samples, and greedy decoding scored against the references."""
        e = self.cfg.eval
        t0 = time.perf_counter()
        evaluation = self.evaluate()
        details = EvalDetails(time_s=time.perf_counter() - t0)
        if e.client_fraction > 0:
            for part in dist.gather_objects(self.world, self.heldout_totals()):
                for c, totals in part.items():
                    loss_sum, tokens, correct = totals.tolist()
                    details.clients[c] = (loss_sum / max(tokens, 1.0), correct / max(tokens, 1.0), tokens)
        if e.generate > 0:
            t1 = time.perf_counter()
            totals = torch.stack(dist.gather_objects(self.world, self.generation_totals())).sum(0)
            details.generation = GenerationScore.summed(totals, time.perf_counter() - t1)
        return evaluation, details

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

    def begin_round(self, rnd: int) -> None:
        """Before any step of round ``rnd`` can reach the server (the barrier after it holds them)."""

    def assign(self, rnd: int) -> Assignment | None:
        """Clients sharing workers: rank 0's assignment of the round's clients to workers."""
        return None

    def copy_vector(self, client: int, models: list[torch.nn.Module], weight: float) -> torch.Tensor:
        """Clients sharing workers: what one client's trained copy (``models``, on this rank) adds to the
        round's all-reduce under ``train.aggregation``, taken when the client finishes."""
        if self.cfg.train.aggregation == "fedavg":
            return fedavg_vector([(m, weight) for m in models], self.layout)
        return stack_vector([(client, m, weight) for m in models], self.stack_layout())

    def stack_layout(self) -> StackLayout:
        """stack / svd: the blocks of every client's chain, under the current layout and plan."""
        key = (self.layout, sorted(self.plan.items()))
        if self._stack is None or self._stack_key[0] is not key[0] or self._stack_key[1] != key[1]:
            self._stack, self._stack_key = StackLayout(self.layout, self.chains()), key
        return self._stack

    def contribution(self) -> torch.Tensor:
        """Clients sharing workers: this rank's share of the round's sum, added over its clients in client
        order (so the sum does not depend on which worker trained whom, or when)."""
        parts = self.take_contributions()
        fedavg = self.cfg.train.aggregation == "fedavg"
        n = fedavg_numel(self.layout) if fedavg else self.stack_layout().numel
        vec = torch.zeros(n, dtype=torch.float64)
        for c in sorted(parts):
            vec += parts[c]
        return vec

    def take_contributions(self) -> dict[int, torch.Tensor]:
        return {}

    def typical_seq_len(self) -> int:
        return 0

    def decide(self, profiles: list[ResourceProfile], seq: int) -> Decision | UserError | None:
        return None

    def build(self) -> None:
        pass

    def n_samples(self) -> dict[int, int]:
        """Training samples of the clients this rank can train, by client."""
        return {}

    def announce(self, counts: list[int]) -> None:
        pass

    def connect(self) -> None:
        pass

    def load(self, flat: torch.Tensor, resume: RunState | None) -> None:
        pass

    def holders(self) -> list[tuple[int, torch.nn.Module, float]]:
        """(client, the HF module holding a copy of its adapter, its aggregation weight) on this rank."""
        return []

    def show_global(self) -> None:
        pass

    def baseline(self, evaluation: Evaluation, details: EvalDetails) -> None:
        pass

    def train(self) -> ClientRound:
        return None

    def settled(self, trained: ClientRound) -> Settled:
        """Whether this rank finished the round's training (``trained``: what ``train`` returned)."""
        return Settled(stopping=self.stop.requested)

    def merge(self, stack: StackLayout, summed: torch.Tensor) -> None:
        pass

    def end_training(self) -> None:
        pass

    def merged_copy(self) -> dict[str, torch.Tensor]:
        """stack: this rank's merged weights of the modules it holds (runtime.debug; used by the tests)."""
        return {}

    def dump_copies(self, folder: Path) -> None:
        pass

    def prepare_warmup(self) -> None:
        pass

    def warmup(self) -> WarmupScores | UserError | None:
        return None

    def choose(self, scores: list[WarmupScores | UserError | None]) -> dict | UserError | None:
        return None

    def relora(self) -> None:
        pass

    def aggregated(self, nbytes: int) -> None:
        pass

    def eval_totals(self) -> torch.Tensor:
        return torch.zeros(3, dtype=torch.float64)

    def heldout_totals(self) -> dict[int, torch.Tensor]:
        """eval.client_fraction: [loss_sum, tokens, correct] on each held-back set this rank evaluates."""
        return {}

    def generation_totals(self) -> torch.Tensor:
        """eval.generate: [exact matches, ROUGE-L sum, samples] over this rank's share of the prompts."""
        return torch.zeros(3, dtype=torch.float64)

    def predict(self):
        return None

    def report(self, trained: ClientRound):
        return None

    def replan(self, rnd: int, reports: list, evaluation: Evaluation | None) -> Plan | None:
        return None

    def move(self, new_plan: Plan) -> None:
        pass

    def record(self, outcome: RoundOutcome) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        """On the way out, however the run ends."""
