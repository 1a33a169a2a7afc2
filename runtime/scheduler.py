"""The scheduler on rank 0: measured profiles -> cost figures -> each client's cut layer, round after round.

``partition.planner`` holds the cost model and the policies (pure). This module turns what the
processes measured (``runtime.probe.ResourceProfile``) and what the model is (its config, dtype, the
adapter layout, the run's batch and sequence length) into the planner's figures, makes the first
plan, and after every round feeds the measured step times, each client's training loss and the eval
loss back (``adaptive``: the speed rule of ``partition.planner``, then the plateau rule of
``partition.plateau``) or applies a forced move (``split.schedule``), and says why (``reason``).
"""

from __future__ import annotations

from dataclasses import replace

from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, PretrainedConfig

from models.aggregation import wire_numel
from models.families import family_of, get_module
from models.lora import AdapterLayout
from models.stages import DTYPES
from models.wire import wire_bytes_per_element
from partition.planner import (
    AdaptivePlanner,
    ClientCosts,
    Measured,
    ModelCosts,
    Prediction,
    ServerCosts,
    check_memory,
    memory_need,
    plan,
    plan_resource,
    plan_shared,
    predict,
    rank_for_memory,
    shared_times,
)
from partition.plateau import deepen_plateaued, loss_trend
from runtime.config import Config
from runtime.probe import ResourceProfile

# A client's memory grows by about this many times the bytes one layer saves for backward: the
# saved tensors, their gradients during the backward, and allocator slack (VmData measured at
# 3.0x on CPU).
ACTIVATION_FACTOR = 3.0


def model_costs(
    mcfg: PretrainedConfig,
    cfg: Config,
    layout: AdapterLayout,
    seq: int,
    activation_bytes: float,
    n_clients: int = 1,
) -> ModelCosts:
    """The model's figures at the run's batch size and a typical padded sequence length ``seq``."""
    family = family_of(mcfg)
    with init_empty_weights():
        hf = AutoModelForCausalLM.from_config(mcfg)
    width = DTYPES[cfg.model.dtype].itemsize
    # An optional module a checkpoint does without (OPT's project_in when word_embed_proj_dim equals
    # hidden_size) is None: it holds nothing.
    count = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters())
    layer = count(get_module(hf, family.layers)[0]) * width
    embed = sum(count(get_module(hf, path)) for path in family.embed) * width
    tokens = cfg.train.batch_size * seq
    hidden = tokens * mcfg.hidden_size * wire_bytes_per_element(cfg.wire.dtype, mcfg.hidden_size, width)
    targets = cfg.train.batch_size * (seq - 1)  # int32 labels shifted by one
    u_shape = cfg.split.mode == "u_shape"
    tail = cfg.split.tail_layers if u_shape else 0
    head = sum(count(m) for path in family.head if (m := get_module(hf, path)) is not None) * width
    return ModelCosts(
        n_layers=mcfg.num_hidden_layers - tail,
        steps=cfg.train.local_steps,
        layer_param_bytes=float(layer),
        embed_param_bytes=float(embed),
        lora_param_bytes=layout.numel * 4 / mcfg.num_hidden_layers,
        activation_bytes=float(activation_bytes) * ACTIVATION_FACTOR,
        # standard: hidden states, bool mask and int32 targets up, their gradient down; U-shaped: hidden
        # states up and back down (and the mask), a gradient each way
        payload_bytes=float(2 * hidden + tokens if u_shape else hidden + tokens + 4 * targets),
        gradient_bytes=float(2 * hidden if u_shape else hidden),
        adapter_bytes=float(wire_numel(cfg.train.aggregation, layout, n_clients) * 4),
        tail_layers=tail,
        head_on_client=u_shape,
        head_param_bytes=float(head),
    )


def client_costs(p: ResourceProfile) -> ClientCosts:
    """A client's figures; a client on a GPU is limited by the GPU's memory and loads no host cores."""
    return ClientCosts(
        layer_time_s=p.layer_time_s,
        layer_cpu_s=0.0 if p.cuda else p.layer_cpu_s,
        memory_bytes=float(p.cuda["free_bytes"] if p.cuda else p.memory_available_bytes),
        bandwidth_Bps=p.bandwidth_Bps,
        rtt_s=p.rtt_s,
        host=p.host,
    )


def server_costs(p: ResourceProfile, threads: int) -> ServerCosts:
    """On a GPU the server's kernels for different clients queue up (parallel 1); on CPU it runs as many
    requests at once as its cores allow at ``threads`` intra-op threads each."""
    return ServerCosts(
        layer_time_s=p.layer_time_s,
        layer_cpu_s=0.0 if p.cuda else p.layer_cpu_s,
        head_time_s=p.head_time_s,
        head_cpu_s=0.0 if p.cuda else p.head_cpu_s,
        host=p.host,
        parallel=1.0 if p.cuda else max(1.0, p.usable_cores / max(1, threads)),
    )


class Scheduler:
    """Plans the cuts from the probes and decides, after each round, whether to move layers."""

    def __init__(
        self,
        cfg: Config,
        model: ModelCosts,
        clients: list[ResourceProfile],
        server: ResourceProfile,
        server_threads: int,
        workers: int | None = None,
    ):
        self.cfg, self.policy = cfg, cfg.policy
        # Clients that share workers (more clients than ``workers``) or a round that draws fewer than all:
        # only ``slots`` clients train at a time, so each is planned for its own time (``plan_shared``);
        # None: every client trains every round on a worker of its own, and the plan minimises the round.
        n, per_round = len(clients), cfg.train.clients_per_round or len(clients)
        at_once = min(per_round, workers if workers is not None else n)
        self.slots = at_once if at_once < n else None
        self.full_rank_model = model
        if cfg.lora.client_ranks == "auto":
            # A client may take a cut it can hold only at a lower rank: plan the cuts with rank-1 LoRA
            # state, then give each client the largest rank that fits (``client_ranks``).
            model = replace(model, lora_param_bytes=model.lora_param_bytes / cfg.lora.r)
        self.model = model
        self.clients = [client_costs(p) for p in clients]
        self.server = server_costs(server, server_threads)
        self.cores = {p.host: float(p.usable_cores) for p in (server, *clients) if not p.cuda}
        sp = cfg.split
        self.adaptive = (
            AdaptivePlanner(
                model,
                self.clients,
                self.server,
                self.cores,
                every=sp.replan_every,
                hysteresis=sp.hysteresis,
                smoothing=sp.smoothing,
                headroom=sp.memory_headroom,
                slots=self.slots,
            )
            if self.policy == "adaptive"
            else None
        )
        self.client_losses: list[list[float]] = [[] for _ in clients]  # training loss per round
        self.reason: dict | None = None  # why the last after_round moved (or did not): metrics.jsonl

    def initial(self) -> list[int]:
        """The first plan (raises ``PlanError`` naming a client that cannot hold its layers)."""
        for cuts in (self.cfg.split.schedule or {}).values():
            check_memory(self.model, self.clients, cuts, self.cfg.split.memory_headroom)
        if self.adaptive is not None:
            start = self.cfg.split.cut_layers
            if isinstance(start, list):  # adaptive from a given start (experiments), else from `resource`
                check_memory(self.model, self.clients, start, self.cfg.split.memory_headroom)
                return list(start)
            return self.adaptive.initial()
        if self.slots is not None and self.policy == "resource":
            return plan_shared(
                self.model, self.clients, self.server, self.cores, self.slots, self.cfg.split.memory_headroom
            )
        return plan(
            self.policy,
            self.model,
            self.clients,
            self.server,
            self.cores,
            cut_layers=self.cfg.split.cut_layers,
            headroom=self.cfg.split.memory_headroom,
        )

    def client_ranks(self, cuts: list[int]) -> list[int]:
        """``lora.client_ranks=auto``: each client's largest LoRA rank that fits its memory at its cut."""
        return [
            max(
                1,
                rank_for_memory(self.full_rank_model, c, k, self.cfg.lora.r, self.cfg.split.memory_headroom),
            )
            for c, k in zip(self.clients, cuts)
        ]

    def predict(self, cuts: list[int]) -> Prediction:
        """The predicted round under the current figures (refit from measurements under ``adaptive``)."""
        clients, server = self.figures
        if self.slots is None:
            return predict(self.model, clients, server, self.cores, cuts)
        # clients sharing workers: each client's time beside typical ones; a round is a draw of
        # clients_per_round spread evenly over the slots that train at once
        times = shared_times(self.model, clients, server, self.cores, self.slots, cuts)
        per_round = self.cfg.train.clients_per_round or len(clients)
        slowest = max(range(len(times)), key=times.__getitem__)
        return Prediction(
            round_time_s=sum(times) / len(times) * per_round / self.slots,
            client_time_s=tuple(times),
            memory_bytes=tuple(memory_need(self.model, k) for k in cuts),
            bottleneck=f"client {slowest + 1}",
        )

    @property
    def figures(self) -> tuple[list[ClientCosts], ServerCosts]:
        """The clients' and the server's figures: the probe's, refit from measurements under adaptive."""
        if self.adaptive is not None:
            return list(self.adaptive.clients), self.adaptive.server
        return list(self.clients), self.server

    def best(self) -> list[int]:
        """The best plan under the current figures (what a re-plan would propose before hysteresis)."""
        clients, server = self.figures
        headroom = self.cfg.split.memory_headroom
        if self.slots is not None:
            return plan_shared(self.model, clients, server, self.cores, self.slots, headroom)
        return plan_resource(self.model, clients, server, self.cores, headroom)

    def after_round(
        self, rnd: int, cuts: list[int], measured: list[Measured | None], eval_loss: float
    ) -> list[int] | None:
        """The cuts for the next round if they change (``measured``: each client's round, in client order;
        None for a client that sat it out, which only a non-adaptive policy allows).

        Sets ``reason``: the rule that moved (``schedule``, ``revert``, ``speed`` or ``progress``) and
        what it saw, or, under ``adaptive``, why nothing moved.
        """
        self.reason = None
        for history, m in zip(self.client_losses, measured):
            if m is not None:  # None: that client sat the round out (train.clients_per_round)
                history.append(float(m.train_loss))
        schedule = self.cfg.split.schedule or {}
        if rnd in schedule:
            new = list(schedule[rnd])
            if new == cuts:
                return None
            self.reason = {"rule": "schedule", "detail": f"split.schedule[{rnd}] = {new}"}
            return new
        if self.adaptive is None:
            return None
        a, sp = self.adaptive, self.cfg.split
        a.observe(cuts, measured, eval_loss)
        new = a.propose(rnd, cuts)
        trends = [loss_trend(h, sp.trend_window) for h in self.client_losses]
        self.reason = {
            **(a.reason or {"rule": None}),
            "client_layer_time_s": [c.layer_time_s for c in a.clients],
            "server_layer_time_s": a.server.layer_time_s,
            "loss_trend": trends,
        }
        if new is not None or rnd % a.every != 0 or a.pending or self.slots is not None:
            return new  # the progress rule needs every client's loss trend, every round
        deeper = deepen_plateaued(
            self.model,
            a.clients,
            a.server,
            self.cores,
            cuts,
            trends,
            sp.plateau,
            sp.hysteresis,
            sp.memory_headroom,
        )
        if deeper is None or a.forbidden(deeper[0]):
            return None
        new, which = deeper
        a.register(cuts, new)
        now, after = self.predict(cuts).round_time_s, self.predict(new).round_time_s
        self.reason.update(
            rule="progress",
            detail=", ".join(
                f"client {i + 1}'s training loss fell {trends[i]:.1%} a round "
                f"(< split.plateau {sp.plateau:.0%}): "
                f"cut {cuts[i]} -> {new[i]}"
                for i in which
            )
            + f"; predicted round {after / now - 1:+.0%} (within split.hysteresis {sp.hysteresis:.0%})",
            predicted_round_time_s={"current": now, "proposed": after},
        )
        return new

    def state_dict(self) -> dict:
        if self.adaptive is None:
            return {}
        return {**self.adaptive.state_dict(), "client_losses": [list(h) for h in self.client_losses]}

    def load_state_dict(self, state: dict) -> None:
        if self.adaptive is not None and state:
            self.adaptive.load_state_dict(state)
            self.client_losses = [
                [float(x) for x in h] for h in state.get("client_losses", self.client_losses)
            ]
