"""The typed messages of the round protocol: what the ranks send each other, and what a role hands to
the scheduler and to the round's record.

Every phase of ``runtime.protocol.Role`` that gathers or broadcasts sends one of these (or a list of
them), so a reader can see what crosses the process group without following string keys:

    start      rank 0 broadcasts a :class:`Decision` (the plan) or a :class:`UserError`; under
               ``lora.selection=importance`` every rank gathers its :class:`WarmupScores`
    train      a client's :class:`ClientRound` is :class:`RoundStats`, or a :class:`Divergence`
    settle     every rank gathers a :class:`Settled`
    record     the clients gather a :class:`ClientReport`, the server a :class:`ServerReport`
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from partition.planner import Measured, PlanError
from runtime.checkpoint import CheckpointMismatch


class Diverged(ValueError):
    """The loss became NaN or infinite; the message names the round, the client and the step."""


# Errors of the user's making that every rank learns of together (rank 0 decides, all raise).
USER_ERRORS: dict[str, type[Exception]] = {
    "PlanError": PlanError,
    "CheckpointMismatch": CheckpointMismatch,
    "Diverged": Diverged,
}


@dataclass(frozen=True)
class UserError:
    """A user error found by rank 0 (a plan that cannot fit, a checkpoint of another run), sent to every
    rank so that all stop with the same message."""

    kind: str  # a key of USER_ERRORS
    message: str

    @staticmethod
    def of(e: Exception) -> UserError:
        return UserError(type(e).__name__, str(e))

    def exception(self) -> Exception:
        return USER_ERRORS[self.kind](self.message)


@dataclass
class RunState:
    """A round's checkpoint state (``state.json`` of its folder; the adapter is saved beside it): what a
    resumed run continues from. Keyed by client in memory, by strings in the file."""

    round: int
    elapsed_s: float
    fingerprint: dict  # runtime.config.fingerprint: what must not change across a resume
    plan: dict[int, tuple[int, int]]  # client -> (cut layer, LoRA rank at the cut) of this round
    next_plan: dict[int, tuple[int, int]] | None  # the move decided at the end of this round
    scheduler: dict  # Scheduler.state_dict
    data_positions: dict[int, dict]  # client -> its BatchStream state
    selection: dict | None  # HSplitLoRA's importance selection, once made
    client_ranks: dict[int, int]  # client -> its own LoRA rank, where it has one
    metrics: list[dict]  # metrics.jsonl's records up to this round
    client_times: dict[int, float] = field(default_factory=dict)  # client -> its last measured train s
    loss_scales: dict[int, list] = field(default_factory=dict)  # replica -> [scale, growth tracker] (float16)

    def to_json(self) -> dict:
        plan = lambda p: None if p is None else {str(c): list(v) for c, v in p.items()}
        return {
            "round": self.round,
            "elapsed_s": self.elapsed_s,
            "fingerprint": self.fingerprint,
            "plan": plan(self.plan),
            "next_plan": plan(self.next_plan),
            "scheduler": self.scheduler,
            "data_positions": {str(c): v for c, v in self.data_positions.items()},
            "selection": self.selection,
            "client_ranks": {str(c): r for c, r in self.client_ranks.items()},
            "metrics": self.metrics,
            "client_times": {str(c): t for c, t in self.client_times.items()},
            **({"loss_scales": {str(r): v for r, v in self.loss_scales.items()}} if self.loss_scales else {}),
        }

    @staticmethod
    def from_json(d: dict) -> RunState:
        plan = lambda p: None if p is None else {int(c): (int(v[0]), int(v[1])) for c, v in p.items()}
        return RunState(
            round=int(d["round"]),
            elapsed_s=float(d["elapsed_s"]),
            fingerprint=d.get("fingerprint", {}),
            plan=plan(d["plan"]),
            next_plan=plan(d.get("next_plan")),
            scheduler=d.get("scheduler") or {},
            data_positions={int(c): v for c, v in d["data_positions"].items()},
            selection=d.get("selection"),
            client_ranks={int(c): int(r) for c, r in (d.get("client_ranks") or {}).items()},
            metrics=d.get("metrics", []),
            client_times={int(c): float(t) for c, t in (d.get("client_times") or {}).items()},
            loss_scales={int(r): [float(v[0]), int(v[1])] for r, v in (d.get("loss_scales") or {}).items()},
        )


@dataclass
class Decision:
    """Rank 0's start-up decision, the same on every rank: each client's cut and the rank at its cut,
    the clients' own LoRA ranks (``lora.client_ranks``), and the state a resumed run continues from."""

    plan: dict[int, tuple[int, int]]  # client -> (cut layer, LoRA rank at the cut)
    caps: dict[int, int | None]  # client -> its own LoRA rank; None: lora.r
    resume: RunState | None = None
    flat: torch.Tensor | None = None  # the resumed global adapter


@dataclass
class Divergence:
    """A client's first NaN or infinite loss of a round (nothing was stepped with it)."""

    step: int
    loss: float
    client: int | None = None  # None: the worker's own client (one client per worker)


@dataclass
class RoundStats:
    """A client's figures of one round of training (medians over its steps where a time is per step)."""

    steps: int
    train_loss: float  # token-weighted mean over the round's steps
    train_tokens: float  # target tokens the loss was taken over
    input_tokens: float  # non-padding input tokens
    train_time_s: float
    step_time_s: float  # median wall time of a step
    compute_s: float  # median client-side compute of a step
    step_losses: list[float]
    peak_rss_mb: float
    vmdata_mb: float  # what simulate.memory_limit_gb (RLIMIT_DATA) caps
    stage_param_mb: float
    lora_bytes: int  # the adapter this client holds
    train_cores_used: float = 0.0  # cores this process used while it trained
    switch_s: float = 0.0  # clients sharing workers: taking this client (re-cut, replica, data position)
    grad_norms: list[float] = field(default_factory=list)  # train.max_grad_norm: the chain's, before clipping

    # recorded per client in metrics.jsonl (the token counts go into the round's totals instead)
    RECORDED = (
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
        "switch_s",
    )

    def recorded(self) -> dict:
        """What metrics.jsonl records of this client (with its steps' gradient norms when it clips)."""
        out = {k: getattr(self, k) for k in self.RECORDED}
        if self.grad_norms:
            out["grad_norms"] = self.grad_norms
        return out

    def measured(self, server_s: float | None) -> Measured:
        """What the scheduler learns from this round, with the server's time for this client."""
        return Measured(
            compute_s=self.compute_s,
            step_s=self.step_time_s,
            train_time_s=self.train_time_s,
            train_loss=self.train_loss,
            server_s=server_s,
        )


@dataclass
class SatOut:
    """A client that was not sampled this round (``train.clients_per_round``): it trained no step."""


# A client's round ends in its figures, the divergence that stopped it, or sitting it out; None: it was
# stopped.
ClientRound = RoundStats | Divergence | SatOut | None


@dataclass
class CommBytes:
    """Bytes a client moved in one round, by direction (the output contract's ``comm_bytes``)."""

    activations_up: int = 0
    gradients_down: int = 0
    activations_down: int = 0  # U-shape: the server's top hidden states coming back
    gradients_up: int = 0  # U-shape: their gradient going up
    adapters_up: int = 0
    adapters_down: int = 0
    eval_activations_up: int = 0  # evaluation's traffic, recorded apart from training's

    CONTRACT = (
        "activations_up",
        "gradients_down",
        "activations_down",
        "gradients_up",
        "adapters_up",
        "adapters_down",
    )

    def contract(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in self.CONTRACT}


@dataclass
class Settled:
    """Whether a rank finished the round's training: asked to stop, a loss that diverged, or a user error
    found while training (a client that does not fit its simulated memory), which every rank raises."""

    stopping: bool
    diverged: Divergence | None = None
    error: UserError | None = None


def first_divergence(settled: list[Settled]) -> tuple[int, Divergence] | None:
    """The lowest rank whose loss diverged this round, with its divergence (None if no rank's did)."""
    return next(((r, s.diverged) for r, s in enumerate(settled) if s.diverged is not None), None)


@dataclass
class ClientReport:
    """A client's report of its round, gathered by rank 0 for the record and the scheduler."""

    stats: RoundStats | None  # None: it sat the round out
    comm: CommBytes
    stream: dict  # its BatchStream's state: where its data resume
    client: int = 0  # its id (0: the reporting worker's own client, one client per worker)


@dataclass
class Assignment:
    """Rank 0's round plan when clients share workers: which worker trains which clients, in order, and
    where each of those clients' data resume (every worker holds every shard; positions move)."""

    workers: dict[int, list[int]]  # worker -> the clients it trains this round, one after another
    positions: dict[int, dict | None]  # client -> its BatchStream state (None: from the start)


@dataclass
class WarmupScores:
    """What a worker's importance warm-up gives rank 0 (``lora.selection=importance``): each warm-up
    client's scores of the weights its stage trained, and, when clients share workers, where each one's
    data stream stopped (rank 0 hands it to whichever worker trains that client next)."""

    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # client -> module -> score
    streams: dict[int, dict] = field(default_factory=dict)  # client -> its BatchStream state


@dataclass
class ServerReport:
    """Rank 0's part of the round's report."""

    peak_rss_mb: float
    server_s: dict[int, float | None] = field(default_factory=dict)  # client -> median replica step s


@dataclass
class GenerationScore:
    """eval.generate: a sample of eval prompts decoded greedily through the split, scored against their
    reference responses (gathered from every worker's share: [exact matches, ROUGE-L sum, samples])."""

    exact_match: float  # the fraction decoded exactly
    rouge_l: float  # mean ROUGE-L F-measure
    samples: int
    time_s: float  # wall time of the decoding, all workers at once

    @staticmethod
    def summed(totals: torch.Tensor, time_s: float) -> GenerationScore:
        exact, rouge, n = totals.tolist()
        return GenerationScore(exact / max(n, 1.0), rouge / max(n, 1.0), int(n), time_s)


@dataclass
class EvalDetails:
    """What an evaluated round measured besides the global model's loss on the eval set."""

    time_s: float  # wall time of the eval-set loss
    clients: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # eval.client_fraction:
    # client -> (loss, token accuracy, tokens) of the global model on that client's held-back samples
    generation: GenerationScore | None = None  # eval.generate
