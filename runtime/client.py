"""The client side of the split: embeddings + layers ``0..k-1`` with LoRA, its own data, its optimizer.

One training step (the train phase of runtime.protocol), two round trips::

    with dist_autograd.context() as ctx:
        h = encode(stage(input_ids))                           # layers 0..k-1 here, in wire.dtype
        sent = Catch(h.detach())                               # its backward keeps dL/dh
        loss = replica.rpc_sync().train_forward(sent, mask, targets)  # layers k..L-1 + head on the server
        dist_autograd.backward(ctx, [loss])                    # the server's backward; dL/dh comes back
        h.backward(dL/dh)                                      # this stage's backward, here
        optimizer step                                         # the server steps at its next call

U-shaped (``split.mode=u_shape``) the client also keeps the top ``split.tail_layers`` layers, the
norm and the head: ``h2 = replica.u_forward(sent, mask)`` comes back down, the loss and the tail's
backward are computed here, and ``dist_autograd.backward`` starts from ``dL/dh2`` (:class:`_Inject`).
``input_ids`` never leave the client; in the U-shaped split neither do the labels or the logits.

An optimizer step is ``train.grad_accum`` such forward/backward pairs, each micro-batch's loss weighted
by its share of the step's target tokens. Clipping (``train.max_grad_norm``) and float16's loss scale
need the chain's gradient norm on both sides, with no extra round trip: a probe sent with the forward
brings the replica's squared norm back as its gradient, and the client's goes up with its next forward
(``docs/performance.md``, "Training recipes").

Every tensor op of a client runs on its main thread: distributed autograd only carries gradients
across the wire (``runtime.compute`` says why one thread matters on CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc

from models.aggregation import StackLayout, merge_delta
from models.datasets import BatchStream, Example, eval_batches
from models.generate import score_responses
from models.importance import Sensitivity
from models.lora import (
    AdapterLayout,
    LoraSpec,
    global_view,
    inject_layers,
    lora_modules,
    lora_parameters,
    named_lora_parameters,
    strip_layers,
    target_ranks,
    write_adapter,
)
from models.loss import shift_targets, target_loss, target_stats
from models.moves import restage
from models.stages import DTYPES, Stage, build_layers, build_stage, stage_parameter_bytes
from models.wire import decode, encode
from runtime import faults
from runtime.config import Config
from runtime.dist import SERVER
from runtime.job import (
    ClientData,
    autocast,
    check_autocast,
    data_seed,
    exchanges_norms,
    learning_rate,
    loss_logits,
    make_optimizer,
    micro_weights,
    scale_grads,
    set_learning_rate,
    squared_grad_norm,
    stage_kwargs,
    step_factor,
)
from runtime.messages import ClientRound, CommBytes, Divergence, RoundStats
from runtime.metrics import peak_rss_mb
from runtime.progress import StepBar
from runtime.server import merged_weights, replica_rref
from runtime.simulate import Link, Throttle, vmdata_bytes


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _Catch(torch.autograd.Function):
    """Identity on the hidden states sent at the cut (a leaf: detached from the client's stage). Its
    backward runs when their gradient has come back over the wire: it counts the bytes
    (``gradients_down``), charges the simulated link for them and keeps the gradient in
    ``client.caught``, for the client's own backward on its main thread."""

    @staticmethod
    def forward(ctx, sent: torch.Tensor, client: Client) -> torch.Tensor:
        ctx.client = client
        return sent.view_as(sent)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        client = ctx.client
        client.comm.gradients_down += nbytes(grad)
        client.link.delay(nbytes(grad))
        client.caught = grad
        return None, None


class _Inject(torch.autograd.Function):
    """U-shaped split: a scalar root for ``dist_autograd.backward`` whose backward hands the gradient
    of the hidden states that came back down (computed by the client's tail) to the wire: it counts
    the bytes (``gradients_up``) and charges the simulated link for them."""

    @staticmethod
    def forward(ctx, back: torch.Tensor, grad: torch.Tensor, client: Client) -> torch.Tensor:
        ctx.grad, ctx.client = grad, client
        return back.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, _: torch.Tensor):
        ctx.client.comm.gradients_up += nbytes(ctx.grad)
        ctx.client.link.delay(nbytes(ctx.grad))
        return ctx.grad, None, None


def server_payload(batch: dict[str, torch.Tensor], sent: torch.Tensor, u_shape: bool = False) -> tuple:
    """What one step sends up: the hidden states in the wire's format, the padding mask (bool, None if
    no padding) and, in the standard split, the targets (the labels shifted by one, int32: what each
    position must predict). In the U-shaped split the targets stay here."""
    mask = batch["attention_mask"]
    mask = None if bool(mask.all()) else mask.bool()
    if u_shape:
        return sent, mask
    return sent, mask, shift_targets(batch["labels"])


@dataclass
class _Forward:
    """One step's forward across the cut: what its backward needs."""

    wire: torch.Tensor  # the hidden states at the cut as sent (this stage's graph hangs from them)
    loss: torch.Tensor
    stats: torch.Tensor  # [target tokens, the server's stop flag]
    compute_s: float  # client-side compute so far
    back: torch.Tensor | None = None  # U-shape: the server's top hidden states, as they came back
    arrived: torch.Tensor | None = None  # U-shape: their leaf on this side
    probe: torch.Tensor | None = None  # its gradient is the replica's squared norm (exchanges_norms)


@dataclass
class _Tally:
    """A round's running figures."""

    start: float
    loss_sum: float = 0.0
    tokens: float = 0.0
    input_tokens: float = 0.0
    step_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # train.max_grad_norm: each step's, before clipping
    step_times: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)

    def add_step(self, loss: float, tokens: float, wall_s: float) -> None:
        self.step_losses.append(loss)
        self.loss_sum += loss * tokens
        self.tokens += tokens
        self.step_times.append(wall_s)


class Client:
    def __init__(
        self,
        rank: int,
        cut: int,
        cut_rank: int,
        cfg: Config,
        model_path,
        spec: LoraSpec,
        data: ClientData,
        device: torch.device,
        throttle: Throttle,
        link: Link,
        cap: int | None = None,
    ):
        self.rank, self.cut, self.cut_rank, self.cfg, self.device = rank, cut, cut_rank, cfg, device
        self.cap = cap  # this client's own LoRA rank (lora.client_ranks); None: lora.r
        self.model_path, self.spec = model_path, spec
        self.timeout_s = cfg.runtime.rpc_timeout_s
        self.wire_dtype = cfg.wire.dtype
        self.throttle, self.link = throttle, link
        self.stage = build_stage(model_path, 0, cut, device=device, **stage_kwargs(self.cfg))
        self.stage.checkpointing = cfg.train.activation_checkpointing
        check_autocast(cfg, device)
        inject_layers(self.stage, spec, target_ranks(0, cut, spec, cut_rank, cap))
        self._hooks = {j: throttle.attach(self.stage.layers[str(j)]) for j in range(cut)}
        # split.mode=u_shape: the top split.tail_layers layers, the final norm and the head stay here
        self.tail: Stage | None = None
        self.u_shape = cfg.split.mode == "u_shape"
        if self.u_shape:
            n = self.stage.config.num_hidden_layers
            self.tail = build_stage(
                model_path, n - cfg.split.tail_layers, n, device=device, **stage_kwargs(cfg)
            )
            inject_layers(self.tail, spec, self._tail_ranks(spec))
            self.tail.checkpointing = cfg.train.activation_checkpointing
            for j in range(self.tail.start, self.tail.end):
                throttle.attach(self.tail.layers[str(j)])
        self.hidden_size = self.stage.config.hidden_size
        self.stage_dtype = DTYPES[cfg.model.dtype]
        self.params = self._lora_parameters()
        self.caught: torch.Tensor | None = None  # the gradient at the cut, back from the server
        # train.max_grad_norm or float16 autocast: this client's squared gradient norm of its last step,
        # for its replica (sent with the next forward, or at the round's end)
        self.unsent_sq: float | None = None
        self.server_sq = 0.0  # ... and its replica's, of the step in progress (the probe's gradient)
        self.loss_scale = 1.0  # train.autocast=float16: the step's, as its replica sent it
        self.n_samples = len(data.shard)
        self.stream = BatchStream(
            data.examples, data.shard, cfg.train.batch_size, data_seed(cfg, rank - 1), data.pad_id
        )
        self.eval_set = eval_batches(
            data.eval_examples, data.eval_indices, cfg.train.eval_batch_size, data.pad_id
        )
        self.comm = CommBytes()
        self.replica: rpc.RRef | None = None
        self.global_adapter: tuple[AdapterLayout, torch.Tensor] | None = None  # what evaluate measures

    def connect(self) -> None:
        """Gets an RRef to this client's replica on the server (after the server has built them)."""
        self.replica = rpc.rpc_sync(SERVER, replica_rref, args=(self.rank,), timeout=self.timeout_s)

    def move(self, cut: int, cut_rank: int, layout: AdapterLayout, flat: torch.Tensor) -> None:
        """Moves this client's cut to ``cut``: loads or drops exactly the layers concerned, with the
        global adapter's current state for them (the model stays the same function)."""
        added, dropped = restage(
            self.stage,
            self.spec,
            0,
            cut,
            cut_rank,
            lambda lo, hi: build_layers(
                self.model_path, lo, hi, device=self.device, **stage_kwargs(self.cfg)
            ),
            layout,
            flat.to(self.device),
            self.cfg.seed,
            cap=self.cap,
        )
        if self.cfg.train.aggregation == "stack" and added:
            self.fetch_merged(layout, added)
        self._rehook(dropped, added)
        self.cut, self.cut_rank = cut, cut_rank
        self.params = self._lora_parameters()

    def recut(
        self, cut: int, cut_rank: int, layout: AdapterLayout, flat: torch.Tensor, cap: int | None = None
    ) -> None:
        """Takes another client's cut and ranks (``cap``: its own LoRA rank, ``lora.client_ranks``; None:
        ``lora.r``), holding the global adapter at those ranks: what a worker does when it goes on to the
        next of its clients (``split.clients`` > workers). The stage is then what one built for that
        client would be; unlike :meth:`move`, the model need not stay the same function (the previous
        client's trained adapter is dropped), so any cut rank and cap are allowed. U-shaped, the tail
        takes the global adapter too, at the new cap."""
        old = self.cut
        if (cut, cut_rank, cap) == (old, self.cut_rank, self.cap):
            for model in self.models:
                write_adapter(model, layout, flat.to(self.device))
            return
        retail = self.tail is not None and cap != self.cap  # the tail's layers take the new client's rank
        self.cap = cap
        if retail:
            strip_layers(self.tail, list(range(self.tail.start, self.tail.end)))
            inject_layers(self.tail, self.spec, self._tail_ranks(self.spec))
        strip_layers(self.stage, list(range(old)))
        if cut < old:
            self.stage.drop_layers(list(range(cut, old)))
        elif cut > old:
            self.stage.add_layers(
                build_layers(self.model_path, old, cut, device=self.device, **stage_kwargs(self.cfg))
            )
        self._rehook(list(range(cut, old)), list(range(old, cut)))
        inject_layers(self.stage, self.spec, target_ranks(0, cut, self.spec, cut_rank, self.cap))
        for model in self.models:
            write_adapter(model, layout, flat.to(self.device))
        self.cut, self.cut_rank = cut, cut_rank
        self.params = self._lora_parameters()
        if self.cfg.train.aggregation == "stack" and cut > old:  # the layers read from disk: merged weights
            self.fetch_merged(layout, list(range(old, cut)))

    def _rehook(self, dropped: list[int], added: list[int]) -> None:
        """The simulated slowdown's hooks follow the layers this stage dropped and gained."""
        for j in dropped:
            for handle in self._hooks.pop(j):
                handle.remove()
        for j in added:
            self._hooks[j] = self.throttle.attach(self.stage.layers[str(j)])

    @property
    def models(self) -> list[torch.nn.Module]:
        """The HF modules this client adapts: its bottom stage and, U-shaped, its tail."""
        return [self.stage.hf] + ([self.tail.hf] if self.tail is not None else [])

    @property
    def layers(self) -> list[int]:
        tail = range(self.tail.start, self.tail.end) if self.tail is not None else range(0)
        return [*range(self.cut), *tail]

    def _lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.models for p in lora_parameters(m)]

    def _tail_ranks(self, spec: LoraSpec) -> dict[int, int]:
        return {j: self.cap or spec.r for j in range(self.tail.start, self.tail.end)}

    def merge(self, layout: AdapterLayout, stack: StackLayout, summed: torch.Tensor) -> None:
        """stack: adds this round's exact delta to the frozen weights of every module this client adapts."""
        for model in self.models:
            for name, m in lora_modules(model).items():
                s = layout.by_name[name]
                merge_delta(m.get_base_layer().weight, *stack.factors(summed, name), s.fan_in_fan_out)

    def fetch_merged(self, layout: AdapterLayout, layers: list[int]) -> None:
        """stack: takes the merged weights of ``layers`` from the server (after a move or on resume)."""
        names = [s.name for s in layout.slots if s.layer in set(layers)]
        weights = rpc.rpc_sync(SERVER, merged_weights, args=(names,), timeout=self.timeout_s)
        self.comm.adapters_down += sum(nbytes(t) for t in weights.values())
        modules = {n: m for model in self.models for n, m in lora_modules(model).items()}
        with torch.no_grad():
            for name, w in weights.items():
                modules[name].get_base_layer().weight.copy_(w)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def relora(self, spec: LoraSpec) -> None:
        """Replaces this client's LoRA by ``spec``'s (after the importance selection)."""
        strip_layers(self.stage, list(range(self.cut)))
        self.spec = spec
        inject_layers(self.stage, spec, target_ranks(0, self.cut, spec, self.cut_rank, self.cap))
        if self.tail is not None:
            strip_layers(self.tail, list(range(self.tail.start, self.tail.end)))
            inject_layers(self.tail, spec, self._tail_ranks(spec))
        self.params = self._lora_parameters()

    def train_round(
        self, steps: int, stop: Callable[[], bool], scorer: Sensitivity | None = None, rnd: int = 0
    ) -> ClientRound:
        """Runs ``steps`` split steps; returns the round's :class:`RoundStats`, or None if a stop was
        requested (checked before every step: this rank's signal, or the server's, which comes back
        with every step's reply), or a :class:`Divergence` at the first NaN or infinite loss (nothing
        is stepped with it). Step ``s`` steps at ``learning_rate(cfg, rnd, s)`` (round 0: the warm-up's
        constant ``train.lr``)."""
        optimizer = make_optimizer(self.params, self.cfg)
        self.unsent_sq = None  # the replica starts its round afresh
        tally = _Tally(time.perf_counter())
        server_stopping = False
        bar = StepBar(f"client{self.rank} training", steps) if self.rank == 1 else None
        for step in range(1, steps + 1):
            if server_stopping or stop():
                self._settle()
                return None
            t0 = time.perf_counter()
            done = self._accumulate(tally, step)
            if isinstance(done, Divergence):
                return done
            loss, tokens, compute_s, server_stopping = done
            tally.compute_s.append(compute_s)
            # The server steps lazily (at its next forward): no call of its own, no wait here.
            self._step(optimizer, scorer, learning_rate(self.cfg, rnd, step), tally)
            tally.add_step(loss, tokens, time.perf_counter() - t0)
            if bar is not None:
                bar.update(step)
            faults.progress.mark(step=step)
            faults.injector.hit("step", step)
        self._settle()
        return self._round_stats(steps, tally)

    def _accumulate(self, tally: _Tally, step: int) -> tuple[float, float, float, bool] | Divergence:
        """The forwards and backwards of one optimizer step: ``train.grad_accum`` micro-batches, each
        one's loss weighted by its share of the step's target tokens, so their gradients add up to those
        of one batch of all of them. Returns (the step's loss, its target tokens, client-side compute,
        the server's stop flag), or a Divergence at the first NaN or infinite loss."""
        n = self.cfg.train.grad_accum
        cpu_batches = [self.stream.next() for _ in range(n)]
        loss_sum = tokens = compute_s = 0.0
        stopping = False
        for i, (cpu_batch, weight) in enumerate(zip(cpu_batches, micro_weights(cpu_batches))):
            tally.input_tokens += float(cpu_batch["attention_mask"].sum())  # on CPU: no device sync
            batch = self._to_device(cpu_batch)
            with dist_autograd.context() as ctx:
                fwd = self._forward(batch, last=i == n - 1)
                loss = float(fwd.loss.detach())
                if not math.isfinite(loss):
                    return Divergence(step=step, loss=loss)
                compute_s += self._backward(ctx, fwd, weight)
            n_tokens = float(fwd.stats[0])
            loss_sum += loss * n_tokens
            tokens += n_tokens
            stopping = stopping or bool(fwd.stats[1])
        return loss_sum / max(tokens, 1.0) if n > 1 else loss, tokens, compute_s, stopping

    def _settle(self) -> None:
        """Sends the round's last squared norm (exchanges_norms), which no later forward carries."""
        if self.unsent_sq is not None:
            self.replica.rpc_sync(timeout=self.timeout_s).chain_norm(self.unsent_sq)
            self.unsent_sq = None

    def _forward(self, batch: dict[str, torch.Tensor], last: bool = True) -> _Forward:
        """This stage's forward, the send across the cut and the server's forward (and, U-shaped, the
        tail's forward here): the step's loss and ``stats`` = [target tokens, the server's stop flag].
        Clipping or float16: the call also carries the previous step's squared norm of this side and, on
        a step's ``last`` micro-batch, a probe that brings the replica's back (``_Forward.probe``)."""
        t0 = time.perf_counter()
        with autocast(self.cfg, self.device):
            hidden = self.stage(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        wire = encode(hidden, self.wire_dtype)
        # a leaf: the server's gradient for it lands in self.caught (none if no LoRA below the cut)
        sent = _Catch.apply(wire.detach().requires_grad_(wire.requires_grad), self)
        payload = server_payload(batch, sent, self.u_shape)
        nsent = sum(nbytes(t) for t in payload)
        compute_s = time.perf_counter() - t0  # on a GPU: queued kernels finish during the send
        self.comm.activations_up += nsent
        self.link.delay(nsent)
        extra, probe = self._norm_extras(last)
        if not self.u_shape:
            loss, stats = self.replica.rpc_sync(timeout=self.timeout_s).train_forward(*payload, **extra)
            return _Forward(wire, loss, stats, compute_s, probe=probe)
        back, flag = self.replica.rpc_sync(timeout=self.timeout_s).u_forward(*payload, **extra)
        self.comm.activations_down += nbytes(back)
        self.link.delay(nbytes(back))
        t_tail = time.perf_counter()
        arrived = back.detach().requires_grad_()
        h2 = decode(arrived, self.wire_dtype, self.hidden_size, self.stage_dtype)
        with autocast(self.cfg, self.device):
            logits = self.tail(hidden=h2, attention_mask=batch["attention_mask"])
        loss, n_tokens = target_loss(loss_logits(self.cfg, logits), shift_targets(batch["labels"]))
        stats = torch.cat([n_tokens.double().reshape(1), flag.double().reshape(-1)])
        return _Forward(wire, loss, stats, compute_s + time.perf_counter() - t_tail, back, arrived, probe)

    def _norm_extras(self, last: bool) -> tuple[dict, torch.Tensor | None]:
        """train.max_grad_norm or float16 autocast (``runtime.job.exchanges_norms``): what a training call
        carries besides the payload (the previous step's squared norm of this side; on a step's last
        micro-batch a probe leaf, whose gradient is the replica's squared norm), and the probe."""
        if not exchanges_norms(self.cfg):
            return {}, None
        extra: dict = {}
        if self.unsent_sq is not None:
            extra["client_sq"], self.unsent_sq = self.unsent_sq, None
        probe = torch.zeros((), dtype=torch.float64, requires_grad=True) if last else None
        if probe is not None:
            extra["probe"] = probe
        return extra, probe

    def _backward(self, ctx: int, fwd: _Forward, weight: float | None = None) -> float:
        """The server's backward (distributed autograd brings the gradient at the cut back), then this
        stage's; returns the step's client-side compute time. ``weight``: the micro-batch's share of
        the step's target tokens (train.grad_accum), by which its loss is scaled."""
        compute_s = fwd.compute_s
        loss = fwd.loss if weight is None else fwd.loss * weight
        if len(fwd.stats) > 2:  # train.autocast=float16: the loss scale of this step, from the replica
            self.loss_scale = float(fwd.stats[2])
            loss = loss * self.loss_scale
        if self.u_shape:
            t_tail = time.perf_counter()
            loss.backward()  # the tail's backward, here; arrived.grad goes up
            root = _Inject.apply(fwd.back, fwd.arrived.grad, self)
            compute_s += time.perf_counter() - t_tail
        else:
            root = loss
        self.caught = None
        dist_autograd.backward(ctx, [root])  # the server's part; the gradient at the cut comes back
        if fwd.probe is not None:
            self.server_sq = float(dist_autograd.get_gradients(ctx)[fwd.probe])
        t_stage = time.perf_counter()
        if self.caught is not None and self.caught.is_cuda:  # it came on RPC's stream
            torch.cuda.synchronize(self.caught.device)
        if fwd.wire.requires_grad:
            fwd.wire.backward(self.caught)  # this stage's backward, here
        self.caught = None
        return compute_s + time.perf_counter() - t_stage

    def _step(
        self, optimizer: torch.optim.Optimizer, scorer: Sensitivity | None, lr: float, tally: _Tally
    ) -> None:
        if exchanges_norms(self.cfg) and not self._scale_step(tally):
            for p in self.params:  # float16 overflowed on the chain: no step, here or on the replica
                p.grad = None
            return
        set_learning_rate(optimizer, lr)
        if scorer is not None:
            for model in self.models:
                scorer.update(named_lora_parameters(model))
        optimizer.step()
        for p in self.params:
            p.grad = None

    def _scale_step(self, tally: _Tally) -> bool:
        """Unscales (float16) and clips (train.max_grad_norm) this side's gradients by the factor of the
        chain's squared norm (this side's and the replica's, ``self.server_sq``), which the replica
        takes too when this side's share reaches it; False: the step overflowed and is skipped."""
        own = squared_grad_norm(self.params)
        chain = own + self.server_sq
        self.unsent_sq = own
        if self.cfg.train.max_grad_norm is not None and math.isfinite(chain):
            tally.grad_norms.append(math.sqrt(chain) / self.loss_scale)
        factor = step_factor(chain, self.loss_scale, self.cfg.train.max_grad_norm)
        if factor is not None:
            scale_grads(self.params, factor)
        return factor is not None

    def _round_stats(self, steps: int, t: _Tally) -> RoundStats:
        median = lambda xs: sorted(xs)[len(xs) // 2]
        return RoundStats(
            steps=steps,
            train_loss=t.loss_sum / max(t.tokens, 1.0),
            train_tokens=t.tokens,
            input_tokens=t.input_tokens,
            train_time_s=time.perf_counter() - t.start,
            step_time_s=median(t.step_times),
            compute_s=median(t.compute_s),
            step_losses=t.step_losses,
            grad_norms=t.grad_norms,
            peak_rss_mb=peak_rss_mb(),
            vmdata_mb=vmdata_bytes() / 2**20,
            stage_param_mb=sum(stage_parameter_bytes(st) for st in (self.stage, self.tail) if st) / 2**20,
            lora_bytes=sum(nbytes(p) for p in self.params),
        )

    @contextmanager
    def _global_eval(self):
        """The global adapter, in eval mode, without grad (what every evaluation measures)."""
        for model in self.models:
            model.eval()
        try:
            with torch.no_grad(), global_view(self.models, *self.global_adapter):
                yield
        finally:
            for model in self.models:
                model.train()

    def evaluate(self, batches: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """[loss_sum, tokens, correct] of the global model over ``batches`` (None: this client's share of
        the held-out set)."""
        totals = torch.zeros(3, dtype=torch.float64)
        with self._global_eval():
            for batch in self.eval_set if batches is None else batches:
                faults.progress.mark()
                batch = self._to_device(batch)
                with autocast(self.cfg, self.device):
                    hidden = self.stage(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                payload = server_payload(batch, encode(hidden, self.wire_dtype), self.u_shape)
                self.comm.eval_activations_up += sum(nbytes(t) for t in payload)
                self.link.delay(sum(nbytes(t) for t in payload))
                if not self.u_shape:
                    totals += self.replica.rpc_sync(timeout=self.timeout_s).evaluate(*payload).cpu()
                    continue
                back = self.replica.rpc_sync(timeout=self.timeout_s).u_evaluate(*payload)
                self.link.delay(nbytes(back))
                h2 = decode(back, self.wire_dtype, self.hidden_size, self.stage_dtype)
                with autocast(self.cfg, self.device):
                    logits = self.tail(hidden=h2, attention_mask=batch["attention_mask"])
                stats = target_stats(loss_logits(self.cfg, logits), shift_targets(batch["labels"]))
                totals += torch.stack([t.double() for t in stats]).cpu()
        return totals

    def next_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Greedy decoding's step through the split: the argmax token after position ``last[i]`` of every
        row (the server returns only those ids; U-shaped, the tail here computes the logits)."""
        faults.progress.mark()
        input_ids, mask, last = input_ids.to(self.device), mask.to(self.device), last.to(self.device)
        with autocast(self.cfg, self.device):
            hidden = self.stage(input_ids=input_ids, attention_mask=mask)
        sent = encode(hidden, self.wire_dtype)
        m = None if bool(mask.all()) else mask.bool()
        n = nbytes(sent) + nbytes(m)
        self.comm.eval_activations_up += n
        self.link.delay(n)
        if not self.u_shape:
            return self.replica.rpc_sync(timeout=self.timeout_s).next_tokens(sent, m, last)
        back = self.replica.rpc_sync(timeout=self.timeout_s).u_evaluate(sent, m)
        self.link.delay(nbytes(back))
        h2 = decode(back, self.wire_dtype, self.hidden_size, self.stage_dtype)
        with autocast(self.cfg, self.device):
            logits = self.tail(hidden=h2, attention_mask=mask)
        return logits[torch.arange(len(last), device=logits.device), last].argmax(-1)

    def generate(self, examples: list[Example], tokenizer, pad_id: int) -> torch.Tensor:
        """eval.generate: [exact matches, ROUGE-L sum, samples] of the global model's greedy responses to
        ``examples``' prompts, decoded ``train.eval_batch_size`` prompts at a time."""
        with self._global_eval():
            return score_responses(
                self.next_tokens,
                examples,
                tokenizer,
                pad_id,
                self.cfg.train.eval_batch_size,
                self.cfg.eval.max_new_tokens,
                self.cfg.data.max_seq_len,
            )

    def take_comm(self) -> CommBytes:
        """This round's byte counts (reset afterwards)."""
        out, self.comm = self.comm, CommBytes()
        return out
