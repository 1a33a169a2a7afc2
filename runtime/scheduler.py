"""The scheduler on rank 0: measured profiles -> cost figures -> each client's cut layer, round after round.

``partition.planner`` holds the cost model and the policies (pure). This module turns what the
processes measured (``runtime.probe.ResourceProfile``) and what the model is (its config, dtype, the
adapter layout, the run's batch and sequence length) into the planner's figures, makes the first
plan, and after every round feeds the measured step times and the eval loss back (``adaptive``) or
applies a forced move (``split.schedule``).
"""

from __future__ import annotations

from dataclasses import replace

from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, PretrainedConfig

from models.aggregation import wire_numel
from models.families import family_of, get_module
from models.lora import AdapterLayout
from models.stages import DTYPES
from partition.planner import (
    AdaptivePlanner,
    ClientCosts,
    Measured,
    ModelCosts,
    Prediction,
    ServerCosts,
    check_memory,
    plan,
    predict,
    rank_for_memory,
)
from runtime.config import Config
from runtime.probe import ResourceProfile

# A client's memory grows by about this many times the bytes one layer saves for backward: the
# saved tensors, their gradients during the backward, and allocator slack (VmData measured at
# 3.0x on CPU in benchmarks/RESULTS.md, "memory model").
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
    hidden = tokens * mcfg.hidden_size * width
    return ModelCosts(
        n_layers=mcfg.num_hidden_layers,
        steps=cfg.train.local_steps,
        layer_param_bytes=float(layer),
        embed_param_bytes=float(embed),
        lora_param_bytes=layout.numel * 4 / mcfg.num_hidden_layers,
        activation_bytes=float(activation_bytes) * ACTIVATION_FACTOR,
        payload_bytes=float(hidden + tokens * (1 + 4)),  # hidden states, bool mask, int32 labels
        gradient_bytes=float(hidden),
        adapter_bytes=float(wire_numel(cfg.train.aggregation, layout, n_clients) * 4),
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
    ):
        self.cfg, self.policy = cfg, cfg.policy
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
            )
            if self.policy == "adaptive"
            else None
        )

    def initial(self) -> list[int]:
        """The first plan (raises ``PlanError`` naming a client that cannot hold its layers)."""
        for cuts in (self.cfg.split.schedule or {}).values():
            check_memory(self.model, self.clients, cuts, self.cfg.split.memory_headroom)
        if self.adaptive is not None:
            return self.adaptive.initial()
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
        clients, server = (
            (self.adaptive.clients, self.adaptive.server) if self.adaptive else (self.clients, self.server)
        )
        return predict(self.model, clients, server, self.cores, cuts)

    def after_round(self, rnd: int, cuts: list[int], stats: list[dict], eval_loss: float) -> list[int] | None:
        """The cuts for the next round if they change (``stats``: each client's round figures, in order)."""
        schedule = self.cfg.split.schedule or {}
        if rnd in schedule:
            return list(schedule[rnd]) if list(schedule[rnd]) != cuts else None
        if self.adaptive is None:
            return None
        measured = [
            Measured(
                compute_s=s["compute_s"],
                step_s=s["step_time_s"],
                train_time_s=s["train_time_s"],
                train_loss=s["train_loss"],
                server_s=s.get("server_s"),
            )
            for s in stats
        ]
        self.adaptive.observe(cuts, measured, eval_loss)
        return self.adaptive.propose(rnd, cuts)

    def state_dict(self) -> dict:
        return self.adaptive.state_dict() if self.adaptive else {}

    def load_state_dict(self, state: dict) -> None:
        if self.adaptive is not None and state:
            self.adaptive.load_state_dict(state)
