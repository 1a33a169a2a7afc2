"""The round's record, made on rank 0: its line of ``metrics.jsonl`` and its checkpoint state.

Both are built from a :class:`RoundOutcome` (what the round produced, gathered from every rank) and
the server role's state (plan, weights, scheduler). ``metrics.jsonl``'s fields are the output
contract's (``runtime.metrics.round_record``), then the run's own: the plan, the server, each client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime.job import learning_rate
from runtime.messages import ClientReport, EvalDetails, RunState, ServerReport
from runtime.metrics import eval_fields, round_record

if TYPE_CHECKING:
    from partition.planner import Prediction
    from runtime.server_role import ServerRole

Evaluation = tuple[float, float, float]
Plan = dict[int, tuple[int, int]]


@dataclass
class RoundOutcome:
    """What one round produced, as rank 0 records it."""

    round: int
    started: float  # time.perf_counter() at the round's start
    prediction: Prediction | None  # the scheduler's prediction for the round, made before it trained
    server: ServerReport
    clients: dict[int, ClientReport]  # client -> its report
    evaluation: Evaluation | None  # (loss, token accuracy, tokens) of the global model; None: not evaluated
    new_plan: Plan | None  # the move decided at its end
    eval_loss_after_move: float | None  # runtime.debug: the same model's loss after the move
    move_s: float  # wall time of the move
    details: EvalDetails | None = None  # what else the evaluation measured (eval section)

    @staticmethod
    def gathered(
        rnd, started, prediction, reports: list, evaluation, new_plan, after_move, move_s, details=None
    ):
        """From the gathered reports: rank 0's ServerReport, then each worker's ClientReports."""
        server, clients = by_client(reports)
        return RoundOutcome(
            rnd, started, prediction, server, clients, evaluation, new_plan, after_move, move_s, details
        )


def by_client(reports: list) -> tuple[ServerReport, dict[int, ClientReport]]:
    """The gathered reports (rank 0's ServerReport, then a list of ClientReports from each worker) as
    the server's and each client's, by client id."""
    return reports[0], {rep.client: rep for per_worker in reports[1:] for rep in per_worker}


def metrics_row(role: ServerRole, o: RoundOutcome, elapsed: float, round_time: float) -> dict:
    """The round's line of metrics.jsonl."""
    cfg, scheduler = role.cfg, role.scheduler
    # the clients that trained; everyone: every client that reported (clients sharing workers: those that
    # trained; one client per worker: every client, those that sat out too)
    order = [c for c in sorted(o.clients) if o.clients[c].stats is not None]
    everyone = sorted(o.clients)
    stats = {c: o.clients[c].stats for c in order}
    tokens = sum(s.train_tokens for s in stats.values())
    rec = round_record(
        o.round,
        elapsed,
        round_time,
        sum(s.train_loss * s.train_tokens for s in stats.values()) / max(tokens, 1.0),
        o.evaluation,
        sum(s.input_tokens for s in stats.values()),
        cut_layers={str(c): role.cut_map[c] for c in order},
        comm_bytes={str(c): o.clients[c].comm.contract() for c in everyone},
        eval_comm_bytes={str(c): o.clients[c].comm.eval_activations_up for c in everyone},
        participants=order,
        workers={str(c): role.worker_of.get(c, c) for c in order},
        lr=learning_rate(cfg, o.round, cfg.train.local_steps),  # at the round's last step
        server={"peak_rss_mb": o.server.peak_rss_mb, **role.usage},
        clients={str(c): {"weight": role.weights[c], **stats[c].recorded()} for c in order},
    )
    rec.update(eval_fields(o.details))
    plan = {
        "policy": cfg.policy,
        "cut_ranks": {str(c): v[1] for c, v in role.plan.items()},
        "predicted_round_time_s": o.prediction.round_time_s,
        "bottleneck": o.prediction.bottleneck,
        "next_cut_layers": None if o.new_plan is None else {str(c): v[0] for c, v in o.new_plan.items()},
        "move_s": o.move_s,
    }
    if o.eval_loss_after_move is not None:
        plan["eval_loss_after_move"] = o.eval_loss_after_move
    plan["client_ranks"] = {str(c): r or role.spec.r for c, r in role.caps.items()}
    if scheduler.reason is not None:
        plan["replan"] = scheduler.reason
    if role.predicted_round_s is not None:  # clients sharing workers: the assignment's busiest worker
        plan["assigned_round_time_s"] = role.predicted_round_s
    rec["plan"] = plan
    if cfg.simulate.changes:  # what the clients were made to do (never shown to the scheduler)
        rec["simulated"] = {
            str(c): dict(zip(("slowdown", "bandwidth_mbps"), cfg.simulate.for_client(c - 1, o.round)[::2]))
            for c in order
        }
        rec["simulated"]["server"] = {"slowdown": cfg.simulate.for_server(o.round)}
    for i, c in enumerate(sorted(role.cut_map)):
        if c not in stats:
            continue
        client = rec["clients"][str(c)]
        client["predicted_time_s"] = o.prediction.client_time_s[i]
        client["server_s"] = o.server.server_s.get(c)
        # RPCs the replica served for this client's training steps; with each step's distributed
        # backward ("backward") they are the step's round trips
        client["server_calls"] = role.round_calls.get(c, {})
    if role.selection is not None and o.round == 1:
        rec["lora_selection"] = {
            **{k: v for k, v in role.selection.items() if k not in ("ranks", "scores")},
            "ranks": {n: r for n, r in role.selection["ranks"].items() if r > 0},
        }
    return rec


def run_state(role: ServerRole, o: RoundOutcome, elapsed: float) -> RunState:
    """The round's checkpoint state: what a resumed run continues from."""
    return RunState(
        round=o.round,
        elapsed_s=elapsed,
        fingerprint=role.fingerprint,
        plan=role.plan,
        next_plan=o.new_plan,
        scheduler=role.scheduler.state_dict(),
        data_positions=role.positions,
        selection=role.selection,
        client_ranks={c: r for c, r in role.caps.items() if r is not None},
        metrics=role.records,
        client_times=role.client_times,
        loss_scales={
            r: [rep.loss_scale.scale, rep.loss_scale.growth_tracker]
            for r, rep in role.server.replicas.items()
            if rep.loss_scale is not None
        },
    )
