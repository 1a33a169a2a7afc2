"""Rank 0's role: the shared frozen base, one LoRA replica per client, the scheduler, metrics and
checkpoints (the protocol it plays its part in: ``runtime.protocol``)."""

from __future__ import annotations

import json
import logging
import time

import torch

from models.aggregation import StackLayout
from models.importance import Sensitivity, allocate_ranks, combine, uniform_params
from models.lora import AdapterLayout, LoraSpec, reducible, write_adapter
from partition.planner import PlanError, Prediction
from partition.sampling import WorkQueue, assign_clients, client_estimates, round_robin
from runtime import checkpoint, dist, faults
from runtime.checkpoint import CheckpointMismatch
from runtime.compute import ComputeThreads
from runtime.config import Config, fingerprint
from runtime.debug import dump_copies
from runtime.explain import describe_plan, describe_replan
from runtime.job import LossScale
from runtime.messages import (
    Assignment,
    Decision,
    EvalDetails,
    RunState,
    ServerReport,
    UserError,
    WarmupScores,
)
from runtime.metrics import (
    CpuUsage,
    MetricsWriter,
    TensorBoardLog,
    header,
    peak_rss_mb,
    row,
    write_baseline,
)
from runtime.probe import ResourceProfile
from runtime.progress import round_line
from runtime.protocol import Evaluation, Plan, Role
from runtime.record import RoundOutcome, by_client, metrics_row, run_state
from runtime.scheduler import Scheduler, model_costs
from runtime.server import Server, install
from runtime.simulate import Throttle

log = logging.getLogger("splitft")


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
        self.tensorboard: TensorBoardLog | None = None  # runtime.tensorboard
        self.round_calls: dict[int, dict[str, int]] = {}
        self.usage: dict[str, float] = {}  # CpuUsage of the last round's training
        self.fingerprint = fingerprint(cfg, self.n_clients)
        self.positions: dict[int, dict] = {}  # client -> where its data resume (from the round's reports)
        self.worker_of: dict[int, int] = {}  # client -> the worker that trains it this round
        self.client_times: dict[int, float] = {}  # client -> its training time when it last trained
        self.predicted_round_s: float | None = None  # shared workers: the busiest worker's predicted time
        self.prediction: Prediction | None = None  # the cost model's round (begin_round, prepare_warmup)
        # simulate.server_slowdown: hooked on the probe's layer and on every replica's layers
        self.throttle = Throttle(cfg.simulate.for_server(1), changing=cfg.simulate.changes)

    # ------------------------------------------------------------------ start
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

    def decide(self, profiles: list[ResourceProfile], seq: int) -> Decision | UserError:
        """The plan and the resume state, or the user error that stops every rank."""
        try:
            resume, flat = self.load_checkpoint()
            costs = model_costs(
                self.mcfg,
                self.cfg,
                self.full_layout,
                seq,
                max(p.activation_bytes for p in profiles[1:]),
                self.n_clients,
            )
            # a client is planned on its first worker's probe (client c starts on worker (c - 1) % M + 1)
            clients = [profiles[(c - 1) % len(self.workers) + 1] for c in range(1, self.n_clients + 1)]
            self.scheduler = Scheduler(
                self.cfg, costs, clients, profiles[0], self.compute.threads, workers=len(self.workers)
            )
            if resume is None:
                cuts = self.scheduler.initial()
                plan = {r: (k, self.spec.r_cut) for r, k in enumerate(cuts, start=1)}
                caps = {}
                if self.cfg.lora.client_ranks == "auto":
                    caps = dict(enumerate(self.scheduler.client_ranks(cuts), start=1))
                    log.info("client ranks from memory (lora.client_ranks=auto): %s", caps)
            else:
                plan, caps = resume.plan, dict(resume.client_ranks)
                self.scheduler.load_state_dict(resume.scheduler)
        except (PlanError, CheckpointMismatch) as e:
            return UserError.of(e)  # nothing written: a checkpoint of another run keeps its run_config.json
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "profiles.json").write_text(
            json.dumps({str(r): p.to_dict() for r, p in enumerate(profiles)})
        )
        (self.out / "run_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        self.records = list(resume.metrics) if resume else []
        self.positions = dict(resume.data_positions) if resume else {}
        self.client_times = dict(resume.client_times) if resume else {}
        self.writer = MetricsWriter(self.out / "metrics.jsonl", self.records)
        return Decision(plan, caps, resume, flat)

    def load_checkpoint(self) -> tuple[RunState | None, torch.Tensor | None]:
        """The newest complete checkpoint's state and adapter, per runtime.resume ((None, None): start)."""
        if self.cfg.resume == "false":
            return None, None
        found = checkpoint.latest(self.ckpt_root)
        if found is None:
            if self.cfg.resume == "true":
                raise CheckpointMismatch(
                    f"runtime.resume=true but {str(self.ckpt_root)!r} holds no complete checkpoint: "
                    "use runtime.resume=auto to start when there is none"
                )
            return None, None
        state, flat = found
        checkpoint.check_fingerprint(self.ckpt_root, state, self.fingerprint)
        log.info("resuming after round %d from %s", state["round"], self.ckpt_root)
        return RunState.from_json(state), flat

    def build(self) -> None:
        # One replica per worker: for its own client, or (clients sharing workers) for each client it
        # trains, in turn; it starts at the cut of the worker's first client, and the shared base holds
        # the layers of every client's cut.
        self.server = Server(
            self.model_path,
            {w: self.cut_map[w] for w in self.workers},
            self.spec,
            self.world.device,
            self.cfg,
            lambda: self.stop.requested,
            self.throttle,
            self.compute,
            base_start=min(self.cut_map.values()),
        )
        self.server.layout = self.layout
        self.server.copy_vector = self.copy_vector  # clients sharing workers: each finished client's share
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
                    self.layout, checkpoint.merged_weights(self.ckpt_root, self.resume.round)
                )
        install(self.server)

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
        for line in describe_plan(self.scheduler, self.cuts):
            log.info(line)

    def load(self, flat: torch.Tensor, resume: RunState | None) -> None:
        for _, model, _ in self.holders():
            write_adapter(model, self.layout, flat)
        for r, (scale, tracker) in (resume.loss_scales if resume is not None else {}).items():
            if r in self.server.replicas and self.server.replicas[r].loss_scale is not None:
                self.server.replicas[r].loss_scale = LossScale(scale, tracker)  # train.autocast=float16

    def baseline(self, evaluation: Evaluation, details: EvalDetails) -> None:
        write_baseline(self.out, evaluation, details)
        log.info(header())

    # ------------------------------------------------------------------ importance selection (HSplitLoRA)
    def prepare_warmup(self) -> None:
        for replica in self.server.replicas.values():
            replica.scorer = Sensitivity()
        self.prediction = self.scheduler.predict(self.cuts)  # what the warm-up's assignment starts from

    def choose(self, scores: list[WarmupScores | UserError | None]) -> dict | UserError:
        """Combines the warm-up clients' chain scores (client part + its replica's), weighted, summed in
        client order (so the sum does not depend on which worker ran whom), and allocates the ranks."""
        error = next((s for s in scores if isinstance(s, UserError)), None)
        if error is not None:  # a client that did not fit its simulated memory: every rank stops
            return error
        parts = [s for s in scores if isinstance(s, WarmupScores)]
        clients = {c: part for s in parts for c, part in s.scores.items()}
        for s in parts:  # clients sharing workers: where the warm-up left each client's data
            self.positions.update(s.streams)
        replicas = self.server.warmup_scores
        for r, replica in sorted(self.server.replicas.items()):
            replica.flush()
            if not self.multiplexed:  # one client per worker: the replica is client r's
                replicas[r] = replica.scorer.scores()
            replica.scorer = None
            replica.take_step_time()
            replica.new_round()
        self.server.warmup_scores = {}
        combined = combine([({**clients[c], **replicas[c]}, self.weights[c]) for c in sorted(clients)])
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

    # ------------------------------------------------------------------ a round
    def begin_round(self, rnd: int) -> None:
        for replica in self.server.replicas.values():
            replica.round = rnd  # its steps' learning rates (runtime.job.learning_rate)
        # The cost model's round, once and before any client starts: over a thousand clients it is tens
        # of milliseconds of Python, which would hold the GIL while the RPC threads serve the workers'
        # first switches of the round.
        self.prediction = self.scheduler.predict(self.cuts)

    def predict(self) -> Prediction:
        return self.prediction

    def train(self) -> None:
        self._usage = CpuUsage()  # what the server process and the host used while the clients trained
        return None  # the replicas serve the clients' steps on RPC threads

    def end_training(self) -> None:
        for replica in self.server.replicas.values():
            replica.flush()  # each client's last step, applied lazily
        self.round_calls = {r: dict(rep.calls) for r, rep in self.server.replicas.items()}
        self.usage = self._usage.stop()

    def merge(self, stack: StackLayout, summed: torch.Tensor) -> None:
        self.server.merge(self.layout, stack, summed)

    def merged_copy(self) -> dict[str, torch.Tensor]:
        return self.server.merged_weights(self.layout, [s.name for s in self.layout.slots])

    def aggregated(self, nbytes: int) -> None:
        for replica in self.server.replicas.values():
            replica.new_round()

    def report(self, trained: None) -> ServerReport:
        if self.multiplexed:  # what each replica left when its worker finished a client
            if self.server.work is not None:  # split.assignment=dynamic: who really trained whom
                self.worker_of = dict(self.server.work.trained_by)
                self.server.work = None
            finished, self.server.finished = self.server.finished, {}
            for rep in self.server.replicas.values():
                rep.take_step_time()
            self.round_calls = {c: calls for c, (_, calls) in finished.items()}
            return ServerReport(peak_rss_mb=peak_rss_mb(), server_s={c: s for c, (s, _) in finished.items()})
        server_s = {r: rep.take_step_time() for r, rep in self.server.replicas.items()}
        return ServerReport(peak_rss_mb=peak_rss_mb(), server_s=server_s)

    def assign(self, rnd: int) -> Assignment:
        """Clients sharing workers: the round's clients onto the workers (``split.assignment``), each with
        its data position. A client's time is what it took when it last trained, else the cost model's."""
        modelled = dict(zip(sorted(self.cut_map), self.prediction.client_time_s))
        predicted = client_estimates(modelled, self.client_times)
        if self.cfg.split.assignment == "round_robin":
            workers = round_robin(self.participants, self.workers)
            load = {w: sum(predicted[c] for c in cs) for w, cs in workers.items()}
            how = "split.assignment=round_robin"
        else:
            workers, load = assign_clients(self.participants, predicted, self.workers)
            how = (
                "longest client first onto the least loaded worker, then moves and swaps off the busiest, "
                "by measured or predicted time"
            )
        if self.cfg.split.assignment == "dynamic" and rnd > 0:  # the importance warm-up keeps its lists
            self.server.start_work(WorkQueue(workers, predicted))
            how += "; a worker that runs out takes clients queued on one that runs late"
        self.predicted_round_s = max(load.values())
        log.info(
            "round %d: %s (%s)",
            rnd,
            "; ".join(
                f"worker {w} trains clients {cs} (predicted {load[w]:.2f} s)" for w, cs in workers.items()
            ),
            how,
        )
        self.worker_of = {c: w for w, cs in workers.items() for c in cs}
        return Assignment(workers, {c: self.positions.get(c) for cs in workers.values() for c in cs})

    def take_contributions(self) -> dict[int, torch.Tensor]:
        parts, self.server.contributions = self.server.contributions, {}
        return parts

    def replan(self, rnd: int, reports: list, evaluation: Evaluation | None) -> Plan | None:
        if rnd >= self.cfg.train.rounds:
            return None
        server, clients = by_client(reports)
        measured = [
            clients[c].stats.measured(server.server_s.get(c))
            if c in clients and clients[c].stats is not None
            else None  # it sat the round out
            for c in sorted(self.cut_map)
        ]
        eval_loss = None if evaluation is None else evaluation[0]  # None: a round eval.every skips
        cuts = self.scheduler.after_round(rnd, self.cuts, measured, eval_loss)
        if cuts is None:
            return None
        return {
            r: self.plan[r] if k == self.cut_map[r] else (k, _cut_rank(self.layout, self.flat, k, self.spec))
            for r, k in zip(sorted(self.cut_map), cuts)
        }

    def move(self, new_plan: Plan) -> None:
        if self.multiplexed:  # a replica takes each client's cut when its worker serves that client
            self.server.cover(min(k for k, _ in new_plan.values()), self.layout)
            return
        self.server.move({r: k for r, (k, _) in new_plan.items()}, self.plan, self.layout, self.flat)

    def record(self, outcome: RoundOutcome) -> None:
        """metrics.jsonl's line now; the adapter and the checkpoint on the saver's thread."""
        now = time.perf_counter()
        self.positions.update({c: r.stream for c, r in outcome.clients.items()})
        self.client_times.update(
            {c: r.stats.train_time_s for c, r in outcome.clients.items() if r.stats is not None}
        )
        rec = metrics_row(self, outcome, elapsed=now - self.t_start, round_time=now - outcome.started)
        self.writer.write(rec)
        if self.cfg.runtime.tensorboard:
            if self.tensorboard is None:  # made with the first row: a start that ends no round has none
                self.tensorboard = TensorBoardLog(self.out / "tensorboard", first_round=outcome.round)
            self.tensorboard.write(rec)
        self.records.append(rec)
        log.info(row(rec))
        rnd = outcome.round
        log.info(
            round_line(
                rnd, self.cfg.train.rounds, rec["elapsed_s"], [r["round_time_s"] for r in self.records]
            )
        )
        new_cuts = (
            None if outcome.new_plan is None else [outcome.new_plan[r][0] for r in sorted(self.cut_map)]
        )
        said = describe_replan(self.scheduler, rnd, self.cuts, new_cuts)
        if said:
            log.info(said)
        if new_cuts is not None:
            for line in describe_plan(self.scheduler, new_cuts)[1:]:
                log.info(line)
        export = None
        if not self.server.merging:  # under stack the model is the merged weights (launch.export --merged)
            export = checkpoint.prepare_export(
                self.out, self.layout, self.flat, self.spec, self.mcfg, self.model_path, self.selection, rnd
            )
        state = run_state(self, outcome, elapsed=now - self.t_start)
        merged = None
        if self.server.merging:
            merged = self.server.merged_weights(self.layout, [s.name for s in self.layout.slots])
        # written while the next round trains; finish() and close() wait for it
        self.saver.submit(rnd, self.flat, state.to_json(), merged, export)

    # ------------------------------------------------------------------ the end
    def dump_copies(self, folder) -> None:
        dump_copies(
            folder,
            {f"server_for{r}": (rep.stage.hf, self.weights[r]) for r, rep in self.server.replicas.items()},
        )

    def finish(self) -> None:
        self.saver.wait()  # the last round's checkpoint and adapter are on disk before the job ends
        if self.tensorboard is not None:
            self.tensorboard.close()
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

    def close(self) -> None:
        """Waits for the checkpoint in flight, so a stopped or failed run keeps its last complete round."""
        try:
            self.saver.wait()
        except OSError as e:  # the run is ending for another reason: say it, do not hide that reason
            log.error("%s", e)


def _cut_rank(layout: AdapterLayout, flat: torch.Tensor, k: int, spec: LoraSpec) -> int:
    """The reduced rank on a new cut layer where that changes nothing, else the full rank (models.moves)."""
    return spec.r_cut if reducible(layout, flat, k - 1, spec.r_cut) else spec.r
