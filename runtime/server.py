"""The server side of the split: one frozen base, one LoRA replica per client.

The base layers ``min(k)..L-1``, final norm and head are loaded once and shared (frozen). Each
client gets a ``ServerReplica``: a shallow copy of the base holding only layers ``k_i..L-1``,
with its own LoRA weights and optimizer. Concurrent clients therefore never step weights
another client's graph still needs (the "modified by an inplace operation" hazard), and no
module-global PEFT state (``set_adapter``) is touched from RPC threads. (U-shaped split: the base
ends below the clients' tail layers and holds no norm or head.)

A replica's optimizer step costs no call: the replica's part of the distributed backward is a local
backward (``runtime.compute.split_graph``), which leaves its LoRA gradients on ``.grad``, and the
step is applied at the replica's next forward call, or when the round ends (``flush``): after every
``train.grad_accum`` forwards, unscaled (float16) and clipped by the chain's norm, whose client share
arrives with that next call.

Every tensor op of the replicas runs on the server's compute threads (``runtime.compute``): on CPU at
more than one intra-op thread as few as keep OpenMP's workers within the cores (one here), else
the calling thread (an RPC thread, or distributed autograd's for a backward).
"""

from __future__ import annotations

import copy
import logging
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed.rpc as rpc
from torch import nn

from models.aggregation import StackLayout, merge_delta
from models.importance import Sensitivity
from models.lora import (
    AdapterLayout,
    LoraSpec,
    add_lora,
    global_view,
    lora_parameters,
    named_lora_parameters,
    strip_layers,
    write_adapter,
)
from models.loss import target_loss, target_stats
from models.moves import restage
from models.stages import DTYPES, Stage, build_layers, build_stage, load_config, read_tensors
from models.wire import decode, encode
from partition.sampling import WorkQueue
from runtime import faults
from runtime.compute import ComputeThreads, split_graph
from runtime.config import Config
from runtime.job import (
    LossScale,
    autocast,
    check_autocast,
    exchanges_norms,
    learning_rate,
    loss_logits,
    make_optimizer,
    scale_grads,
    set_learning_rate,
    squared_grad_norm,
    stage_kwargs,
    step_factor,
)
from runtime.simulate import Throttle

log = logging.getLogger("splitft")


class _Mark(torch.autograd.Function):
    """Identity whose backward notes when it ran: on the loss it marks the start of the server's part of
    the backward, on the incoming hidden states its end."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, marks: dict, key: str) -> torch.Tensor:
        ctx.marks, ctx.key = marks, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.marks[ctx.key] = time.perf_counter()
        return grad, None, None


class _Report(torch.autograd.Function):
    """Identity on the hidden states that arrived, with the client's probe (a float64 scalar) as a second
    input. Its backward runs when the replica's own backward is done (the hidden states' gradient is its
    last product), so the replica's LoRA gradients are all on ``.grad``: it takes their squared norm and
    sends it back as the probe's gradient, with the gradient at the cut, in the same round trip."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, probe: torch.Tensor, replica: ServerReplica) -> torch.Tensor:
        ctx.replica = replica
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        replica = ctx.replica
        replica.server_sq = replica.compute.run(lambda: squared_grad_norm(replica.params))
        return grad, torch.tensor(replica.server_sq, dtype=torch.float64), None


class ServerReplica:
    """Layers ``cut..L-1`` + head for one client. Called over RPC through an RRef, one call at a time."""

    def __init__(
        self,
        base: Stage,
        cut: int,
        spec: LoraSpec,
        device: torch.device,
        cfg: Config,
        stopping: Callable[[], bool] = lambda: False,
        throttle: Throttle | None = None,
        compute: ComputeThreads | None = None,
    ):
        self.compute = compute or ComputeThreads(enabled=False, threads=1)
        hf = _share(base.hf)  # new modules, same frozen tensors
        layers = base.family.layers
        owned = hf.get_submodule(layers)
        for index in range(base.start, cut):
            del owned[str(index)]
        self.stage = Stage(hf, base.family, base.config, cut, base.end, base.head)
        self.stage.checkpointing = cfg.train.activation_checkpointing
        add_lora(self.stage, spec, cut_rank=False)
        self.stage.to(device)
        self.device = device
        self.stage_dtype = DTYPES[cfg.model.dtype]
        self.cfg, self.spec = cfg, spec
        self.params: list[nn.Parameter] = []
        self.watch_parameters()
        self.optimizer = make_optimizer(self.params, cfg)
        self.pending = False  # gradients of the last step are on .grad, not yet applied
        self.micro = 0  # forwards this round (train.grad_accum of them make a step)
        # train.max_grad_norm: the squared norms of the pending step's gradients, this replica's (from its
        # backward) and its client's (with the client's next call): the chain's norm is their sum
        self.server_sq: float | None = None
        self.client_sq: float | None = None
        # train.autocast=float16: the chain's loss scale (kept across rounds; the checkpoint keeps it)
        self.loss_scale = LossScale() if cfg.train.autocast == "float16" else None
        self.calls = Counter()  # RPCs served this round, by method (round trips per step, tested)
        self.wire_dtype = cfg.wire.dtype
        self.hidden_size = base.config.hidden_size
        self.lock = threading.Lock()  # guards against a misbehaving client issuing calls in parallel
        self.marks: dict[str, float] = {}
        self.step_times: list[float] = []  # this round's server compute (forward + backward) per step
        self.steps = 0  # forwards served this round
        self.stepped = 0  # optimizer steps applied this round
        self.round = 0  # the round in progress (0: the importance warm-up): its steps' learning rates
        self.stopping = stopping
        self.global_adapter: tuple[AdapterLayout, torch.Tensor] | None = None  # what evaluate measures
        self.scorer: Sensitivity | None = None  # lora.selection=importance: scores during the warm-up
        # runtime.debug: a summary of every tensor that arrived and that left, to show what crosses the wire.
        self.received: set[str] | None = set() if cfg.runtime.debug else None
        self.sent: set[str] = set()
        self.throttle, self._throttled = throttle, []  # simulate.server_slowdown
        self.throttle_layers()

    def throttle_layers(self) -> None:
        """Hooks the simulated server slowdown on this replica's decoder layers (again after a move)."""
        Throttle.detach(self._throttled)
        layers = range(self.stage.start, self.stage.end) if self.throttle is not None else []
        self._throttled = [h for j in layers for h in self.throttle.attach(self.stage.layers[str(j)])]

    def watch_parameters(self) -> None:
        """Takes the current LoRA parameters (the optimizer's, whose ``.grad`` the backward fills)."""
        self.params = lora_parameters(self.stage.hf)

    def new_round(self) -> None:
        for p in self.params:
            p.grad = None
        self.pending = False
        self.micro = 0
        self.server_sq = self.client_sq = None
        self.optimizer = make_optimizer(self.params, self.cfg)
        self.steps = 0
        self.stepped = 0
        self.calls.clear()

    def flush(self) -> None:
        """Applies the last step's gradients if they are still pending (the round's last step)."""
        with self.lock:
            self.compute.run(self._apply_step)

    def _apply_step(self) -> None:
        if not self.pending:
            return
        m = self.marks
        if "start" in m:  # the distributed backward of the last step reached this replica
            self.calls["backward"] += 1
        if {"start", "end", "forward_s"} <= m.keys():
            self.step_times.append(m["forward_s"] + m["end"] - m["start"])
        m.clear()
        skip = exchanges_norms(self.cfg) and not self._scale_step()
        if self.scorer is not None and not skip:
            self.scorer.update(named_lora_parameters(self.stage.hf))
        self.stepped += 1  # steps are applied in order: this is the client's step of that number
        set_learning_rate(self.optimizer, learning_rate(self.cfg, self.round, self.stepped))
        if not skip:
            self.optimizer.step()
        for p in self.params:
            p.grad = None
        self.pending = False

    def _scale_step(self) -> bool:
        """Unscales (float16) and clips (train.max_grad_norm) this replica's gradients by the factor of the
        chain's norm, as its client does; False: the step overflowed and is skipped on both sides."""
        if self.server_sq is None or self.client_sq is None:
            raise RuntimeError(
                "the step's squared gradient norms have not both arrived "
                f"(replica {self.server_sq}, client {self.client_sq})"
            )
        scale = self.loss_scale.scale if self.loss_scale is not None else 1.0
        factor = step_factor(self.server_sq + self.client_sq, scale, self.cfg.train.max_grad_norm)
        self.server_sq = self.client_sq = None
        if self.loss_scale is not None:
            self.loss_scale.update(found_inf=factor is None)
        if factor is not None:
            scale_grads(self.params, factor)
        return factor is not None

    def _scale_reply(self, flag: torch.Tensor) -> torch.Tensor:
        """The stop flag, and under float16 the loss scale the client multiplies this step's loss by."""
        if self.loss_scale is None:
            return flag
        return torch.stack([flag, flag.new_tensor(self.loss_scale.scale)])

    def chain_norm(self, client_sq: float) -> None:
        """RPC (train.max_grad_norm): the client's squared gradient norm of its round's last step, which no
        later forward brings; the round's flush applies that step with it."""
        with self.lock:
            self.calls["chain_norm"] += 1  # once a round, not a step
            self.client_sq = client_sq

    def _arrived(
        self, sent: torch.Tensor, probe: torch.Tensor | None, client_sq: float | None
    ) -> torch.Tensor:
        """Takes what a training call brings besides the hidden states: the client's squared gradient
        norm of the previous step, and a probe whose gradient carries this replica's back."""
        if client_sq is not None:
            self.client_sq = client_sq
        return sent if probe is None else _Report.apply(sent, probe, self)

    def _counted(self) -> None:
        """One more forward; the step is due (pending) after every train.grad_accum of them."""
        self.micro += 1
        self.pending = self.micro % self.cfg.train.grad_accum == 0

    def relora(self, spec: LoraSpec) -> None:
        """Replaces this replica's LoRA by ``spec``'s (after the importance selection)."""
        with self.lock:
            strip_layers(self.stage, list(range(self.stage.start, self.stage.end)))
            self.spec = spec
            add_lora(self.stage, spec, cut_rank=False)
            self.watch_parameters()
            self.new_round()

    def take_step_time(self) -> float | None:
        """Median server compute per step this round (None if no step ran), and a fresh record."""
        times, self.step_times = self.step_times, []
        return statistics.median(times) if times else None

    def move(
        self, cut: int, base: Stage, layout: AdapterLayout, flat: torch.Tensor, arriving_ranks: dict[int, int]
    ) -> None:
        """Moves this replica's first layer to ``cut`` (layers arriving are shared from ``base``)."""
        with self.lock:
            restage(
                self.stage,
                self.spec,
                cut,
                self.stage.end,
                None,
                lambda lo, hi: {j: _share(base.layers[str(j)]) for j in range(lo, hi)},
                layout,
                flat.to(self.device),
                self.cfg.seed,
                arriving_ranks,
            )
            self.watch_parameters()
            self.throttle_layers()
            self.new_round()

    def train_forward(
        self,
        sent: torch.Tensor,
        mask: torch.Tensor | None,
        targets: torch.Tensor,
        probe: torch.Tensor | None = None,
        client_sq: float | None = None,
    ):
        """Applies the previous step (lazily), runs the rest of the model and returns (loss, [tokens,
        stopping]); autograd spans the RPC. ``sent`` is the hidden states in the wire's format,
        ``targets`` the shifted labels (int32). ``stopping`` tells the client that the server was asked
        to stop (a signal). A step is this call and the distributed backward: two round trips.
        train.max_grad_norm: ``client_sq`` is the client's squared gradient norm of the previous step,
        and ``probe``'s gradient brings this replica's of this step back (:class:`_Report`)."""
        with self.lock:
            self.calls["train_forward"] += 1
            self.steps += 1
            faults.injector.hit("step", self.steps)
            if self.received is not None:
                self.received.update(_describe(t) for t in (sent, mask, targets))
                sent.register_hook(lambda g: self.sent.add("grad:" + _describe(g)))

            def layers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                self._apply_step()
                t0 = time.perf_counter()
                hidden = decode(x, self.wire_dtype, self.hidden_size, self.stage_dtype)
                with autocast(self.cfg, self.device):
                    logits = self.stage(hidden=_Mark.apply(hidden, self.marks, "end"), attention_mask=mask)
                loss, n_tokens = target_loss(loss_logits(self.cfg, logits), targets)
                self.marks["forward_s"] = time.perf_counter() - t0
                return _Mark.apply(loss, self.marks, "start"), n_tokens

            loss, n_tokens = split_graph(self.compute, layers, self._arrived(sent, probe, client_sq))
            self._counted()
            flag = n_tokens.new_tensor(float(self.stopping()), dtype=torch.float64)
            stats = torch.cat([n_tokens.double().reshape(1), self._scale_reply(flag).reshape(-1)])
            if self.received is not None:
                self.sent.update(_describe(t) for t in (loss, stats))
            return loss, stats

    def u_forward(
        self,
        sent: torch.Tensor,
        mask: torch.Tensor | None,
        probe: torch.Tensor | None = None,
        client_sq: float | None = None,
    ):
        """U-shaped split: applies the previous step, runs this replica's layers and returns their output in
        the wire's format (and the stopping flag); the client's tail and head compute the loss, so nothing
        here sees labels, token ids or logits. Two round trips a step, as in the standard split."""
        with self.lock:
            self.calls["u_forward"] += 1
            self.steps += 1
            faults.injector.hit("step", self.steps)

            def layers(x: torch.Tensor) -> tuple[torch.Tensor]:
                self._apply_step()
                t0 = time.perf_counter()
                hidden = decode(x, self.wire_dtype, self.hidden_size, self.stage_dtype)
                with autocast(self.cfg, self.device):
                    out = self.stage(hidden=_Mark.apply(hidden, self.marks, "end"), attention_mask=mask)
                self.marks["forward_s"] = time.perf_counter() - t0
                return (encode(_Mark.apply(out, self.marks, "start"), self.wire_dtype),)

            (back,) = split_graph(self.compute, layers, self._arrived(sent, probe, client_sq))
            self._counted()
            if self.received is not None:
                self.received.update(_describe(t) for t in (sent, mask))
                self.sent.add(_describe(back))
                back.register_hook(lambda g: self.received.add("grad:" + _describe(g)))
                sent.register_hook(lambda g: self.sent.add("grad:" + _describe(g)))
            return back, self._scale_reply(torch.tensor(float(self.stopping()), dtype=torch.float64))

    def u_evaluate(self, sent: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        def job() -> torch.Tensor:
            hidden = decode(sent, self.wire_dtype, self.hidden_size, self.stage_dtype)
            with autocast(self.cfg, self.device):
                out = self.stage(hidden=hidden, attention_mask=mask)
            return encode(out, self.wire_dtype)

        return self._evaluating(job)

    def evaluate(self, sent: torch.Tensor, mask: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        def job() -> torch.Tensor:
            hidden = decode(sent, self.wire_dtype, self.hidden_size, self.stage_dtype)
            with autocast(self.cfg, self.device):
                logits = self.stage(hidden=hidden, attention_mask=mask)
            loss_sum, n_tokens, correct = target_stats(loss_logits(self.cfg, logits), targets)
            return torch.stack([loss_sum.double(), n_tokens.double(), correct.double()])

        return self._evaluating(job)

    def next_tokens(self, sent: torch.Tensor, mask: torch.Tensor | None, last: torch.Tensor) -> torch.Tensor:
        """eval.generate: the argmax token after position ``last[i]`` of every row (ids, not logits)."""

        def job() -> torch.Tensor:
            hidden = decode(sent, self.wire_dtype, self.hidden_size, self.stage_dtype)
            with autocast(self.cfg, self.device):
                logits = self.stage(hidden=hidden, attention_mask=mask)
            return logits[torch.arange(len(last), device=logits.device), last].argmax(-1)

        return self._evaluating(job)

    def _evaluating(self, job: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``job()`` through the global adapter, in eval mode, without grad, on the compute thread."""

        def run() -> torch.Tensor:
            with torch.no_grad(), global_view([self.stage.hf], *self.global_adapter):
                self.stage.eval()
                try:
                    return job()
                finally:
                    self.stage.train()

        with self.lock:
            return self.compute.run(run)


def _share(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are the original (frozen) tensors."""
    return copy.deepcopy(module, memo={id(t): t for t in (*module.parameters(), *module.buffers())})


def _describe(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{t.dtype}:{t.dim()}d:last={t.shape[-1] if t.dim() == 3 else '-'}"


class Server:
    """Holds the shared base and a replica per client rank.

    Under ``train.aggregation=stack`` it is also the keeper of the merged weights: every round's
    exact delta is merged into the shared base (so into every replica at once), and the server
    holds the merged target weights of the layers below its base too (``shadow``), because the
    all-reduce gives it every chain's blocks. A holder that gains a layer in a move, and every
    holder on resume, takes that layer's merged weights from here; the checkpoint stores them.
    So every holder of a layer has the same merged weights, bit for bit, whoever held it before.
    """

    def __init__(
        self,
        model_path,
        cuts: dict[int, int],
        spec: LoraSpec,
        device: torch.device,
        cfg: Config,
        stopping: Callable[[], bool] = lambda: False,
        throttle: Throttle | None = None,
        compute: ComputeThreads | None = None,
        base_start: int | None = None,
    ):
        n_layers = load_config(model_path).num_hidden_layers
        check_autocast(cfg, device)
        self.compute = compute or ComputeThreads(enabled=False, threads=1)
        self.model_path, self.device, self.cfg = model_path, device, cfg
        # split.mode=u_shape: the top split.tail_layers layers and the head stay on the clients
        top = n_layers - cfg.split.tail_layers if cfg.split.mode == "u_shape" else n_layers
        base = build_stage(
            model_path,
            min(cuts.values()) if base_start is None else base_start,
            top,
            device=device,
            head=cfg.split.mode != "u_shape",
            **stage_kwargs(cfg),
        )
        self.base = base
        self.replicas = {
            rank: ServerReplica(base, k, spec, device, cfg, stopping, throttle, self.compute)
            for rank, k in cuts.items()
        }
        self.merging = cfg.train.aggregation == "stack"
        self.merge_lock = threading.Lock()  # a client's fetch never sees a layer half moved or merged
        self.shadow: dict[str, torch.Tensor] = {}
        self.layout: AdapterLayout | None = None  # the global adapter's layout (set by the server role)
        # Clients sharing workers (split.clients > workers): replicas are keyed by worker, and each
        # serves its worker's clients one after another; what each client left is kept here.
        self.contributions: dict[int, torch.Tensor] = {}  # client -> its replica part's share of the sum
        self.copy_vector: Callable[[int, list[nn.Module], float], torch.Tensor] | None = None  # the role's
        self.finished: dict[int, tuple[float | None, dict[str, int]]] = {}  # client -> (step s, calls)
        self.warmup_scores: dict[int, dict[str, float]] = {}  # lora.selection=importance: client -> scores
        # split.assignment=dynamic: the round's clients as workers take them
        self.work: WorkQueue | None = None
        self.work_lock = threading.Lock()
        self.work_started = 0.0

    def start_work(self, work: WorkQueue) -> None:
        """The round's queue (before the assignment reaches the workers); its clock starts now."""
        with self.work_lock:
            self.work, self.work_started = work, time.perf_counter()

    def next_client(self, worker: int) -> tuple[int | None, float]:
        """``worker`` is free: the client it trains next (``WorkQueue.take``)."""
        with self.work_lock:
            moved = len(self.work.moved)
            taken = self.work.take(worker, time.perf_counter() - self.work_started)
            if len(self.work.moved) > moved:
                c, frm, _ = self.work.moved[-1]
                log.info("worker %d takes client %d, queued on worker %d, which runs late", worker, c, frm)
            return taken

    def serve(self, worker: int, cut: int, moved: tuple[int, int] | None = None) -> None:
        """Replica ``worker`` takes its next client: that client's cut and the global adapter, a fresh
        optimizer. Layers it gains are shared from the base, which holds every client's layers. ``moved``:
        the client's (cut, cut rank) before a move this round; the replica takes the old cut and moves
        from it, as the client's own replica did when the move was decided."""
        rep = self.replicas[worker]
        layout, flat = rep.global_adapter
        if moved is not None:
            old, old_rank = moved
            self.serve(worker, old)
            rep.move(cut, self.base, layout, flat, {old - 1: old_rank})
        elif cut != rep.stage.start:
            rep.move(cut, self.base, layout, flat, {})  # loads the global adapter into every layer
        else:
            with rep.lock:
                self.compute.run(lambda: write_adapter(rep.stage.hf, layout, flat))
                rep.new_round()

    def finish(self, worker: int, client: int, weight: float) -> None:
        """Replica ``worker`` is done with ``client``: its last step applied, its weighted copy kept for
        the round's aggregate, its step time and calls kept for the record."""
        rep = self.replicas[worker]
        rep.flush()
        with rep.lock:
            self.contributions[client] = self.compute.run(
                lambda: self.copy_vector(client, [rep.stage.hf], weight)
            )
            self.finished[client] = (rep.take_step_time(), dict(rep.calls))

    def finish_warmup(self, worker: int, client: int) -> None:
        """Replica ``worker`` is done with ``client``'s importance warm-up: its last step applied and
        scored, that client's scores kept, a fresh scorer for the worker's next client."""
        rep = self.replicas[worker]
        rep.flush()
        with rep.lock:
            self.warmup_scores[client] = rep.scorer.scores()
            rep.scorer = Sensitivity()
            rep.take_step_time()

    def init_shadow(self, layout: AdapterLayout) -> None:
        """stack: the base weights of the target modules outside the shared base (below it, and a U-shaped
        split's tail above it), read from the checkpoint."""
        outside = [s.name for s in layout.slots if not self.base.start <= s.layer < self.base.end]
        self.shadow = read_tensors(self.model_path, outside, self.cfg.model.dtype, self.device)

    def target_weight(self, name: str, layer: int) -> torch.Tensor:
        if self.base.start <= layer < self.base.end:
            return self.base.hf.get_submodule(name).weight
        return self.shadow[name]

    def merge(self, layout: AdapterLayout, stack: StackLayout, summed: torch.Tensor) -> None:
        """stack: adds this round's exact delta to the merged weights of every module."""
        with self.merge_lock:
            for s in layout.slots:
                merge_delta(
                    self.target_weight(s.name, s.layer), *stack.factors(summed, s.name), s.fan_in_fan_out
                )

    def merged_weights(self, layout: AdapterLayout, names: list[str]) -> dict[str, torch.Tensor]:
        def copies() -> dict[str, torch.Tensor]:
            return {n: self.target_weight(n, layout.by_name[n].layer).detach().cpu().clone() for n in names}

        with self.merge_lock:
            return self.compute.run(copies)

    def load_merged(self, layout: AdapterLayout, weights: dict[str, torch.Tensor]) -> None:
        with self.merge_lock, torch.no_grad():
            for s in layout.slots:
                self.target_weight(s.name, s.layer).copy_(weights[s.name])

    def move(
        self, cuts: dict[int, int], old: dict[int, tuple[int, int]], layout: AdapterLayout, flat: torch.Tensor
    ) -> None:
        """Applies new cuts (``old``: each client's previous (cut, cut rank)). The shared base gains the
        layers some replica now needs (only their tensors are read) and drops those none needs."""
        with self.merge_lock:
            self._move(cuts, old, layout, flat)

    def cover(self, low: int, layout: AdapterLayout) -> None:
        """The shared base gains the layers from ``low`` up that it lacks (clients sharing workers: a
        re-plan gave some client a lower cut; each replica re-cuts when its worker serves that client)."""
        with self.merge_lock:
            self._cover(low, layout)

    def _cover(self, low: int, layout: AdapterLayout) -> None:
        if low >= self.base.start:
            return
        gained = build_layers(
            self.model_path, low, self.base.start, device=self.device, **stage_kwargs(self.cfg)
        )
        self.base.add_layers(gained)
        with torch.no_grad():  # stack: the merged weights, not the checkpoint's, for these layers
            for s in layout.slots:
                if s.name in self.shadow and self.base.start <= s.layer < self.base.end:
                    self.base.hf.get_submodule(s.name).weight.copy_(self.shadow.pop(s.name))

    def _move(self, cuts, old, layout: AdapterLayout, flat: torch.Tensor) -> None:
        low = min(cuts.values())
        self._cover(low, layout)
        for rank, k in cuts.items():
            old_k, old_rank = old[rank]
            if k != old_k:
                self.replicas[rank].move(k, self.base, layout, flat, {old_k - 1: old_rank})
        if low > self.base.start:
            if self.merging:
                for s in layout.slots:
                    if self.base.start <= s.layer < low:
                        self.shadow[s.name] = self.base.hf.get_submodule(s.name).weight.detach()
            self.base.drop_layers(list(range(self.base.start, low)))


# The RPC entry point: clients call rpc_sync(SERVER, replica_rref, (rank,)) and get an RRef to their replica.
_SERVER: Server | None = None


def install(server: Server) -> None:
    global _SERVER
    _SERVER = server


def sink(tensor: torch.Tensor) -> None:
    """RPC target of the clients' link probe: receives a payload and answers nothing."""


def merged_weights(names: list[str]) -> dict[str, torch.Tensor]:
    """RPC target (stack): the current merged weights of the named target modules."""
    return _SERVER.merged_weights(_SERVER.layout, names)


def serve_client(worker: int, cut: int, moved: tuple[int, int] | None = None) -> None:
    """RPC target: worker ``worker`` goes on to a client cut at ``cut`` (``Server.serve``)."""
    _SERVER.serve(worker, cut, moved)


def next_client(worker: int) -> tuple[int | None, float]:
    """RPC target: worker ``worker`` is free; what it does next (``Server.next_client``)."""
    return _SERVER.next_client(worker)


def finish_client(worker: int, client: int, weight: float) -> None:
    """RPC target: worker ``worker`` finished ``client``'s steps (``Server.finish``)."""
    _SERVER.finish(worker, client, weight)


def finish_warmup(worker: int, client: int) -> None:
    """RPC target: worker ``worker`` finished ``client``'s importance warm-up (``Server.finish_warmup``)."""
    _SERVER.finish_warmup(worker, client)


def replica_rref(rank: int) -> rpc.RRef:
    """An RRef, owned by the server, to the replica the server built for client ``rank``."""
    if _SERVER is None:
        raise RuntimeError("the server has not finished building its replicas")
    return rpc.RRef(_SERVER.replicas[rank])
