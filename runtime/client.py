"""The client side of the split: embeddings + layers ``0..k-1`` with LoRA, its own data, its optimizer.

One training step (the round protocol of runtime.split)::

    with dist_autograd.context() as ctx:
        h = stage(input_ids)                                   # layers 0..k-1 here
        loss = replica.rpc_sync().train_forward(h, mask, labels)  # layers k..L-1 on the server
        dist_autograd.backward(ctx, [loss])                    # dL/dh comes back over RPC
        server step (async) + local step, both from get_gradients(ctx)

Only hidden states, the padding mask and the labels cross the wire; ``input_ids`` never do.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc

from models.aggregation import StackLayout, merge_delta
from models.datasets import BatchStream, eval_batches
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
)
from models.moves import restage
from models.stages import build_layers, build_stage, stage_parameter_bytes
from runtime import faults
from runtime.config import Config
from runtime.dist import SERVER
from runtime.job import ClientData, data_seed, make_optimizer, stage_kwargs
from runtime.metrics import peak_rss_mb
from runtime.progress import StepBar
from runtime.server import merged_weights, replica_rref
from runtime.simulate import Link, Throttle, vmdata_bytes

COMM_KEYS = ("activations_up", "gradients_down", "adapters_up", "adapters_down")


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _GradArrives(torch.autograd.Function):
    """Identity at the cut: its backward runs when the server's gradient arrives. It counts the gradient's
    bytes, charges the simulated link for them and marks when the client's own backward starts."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, client: Client) -> torch.Tensor:
        ctx.client = client
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        client = ctx.client
        client.comm["gradients_down"] += nbytes(grad)
        client.link.delay(nbytes(grad))
        client.grad_arrived = time.perf_counter()
        return grad, None


def server_payload(batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> tuple:
    """What one step sends up: hidden states, the padding mask (bool, None if no padding), labels (int32)."""
    mask = batch["attention_mask"]
    mask = None if bool(mask.all()) else mask.bool()
    return hidden, mask, batch["labels"].to(torch.int32)


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
        self.throttle, self.link = throttle, link
        self.stage = build_stage(model_path, 0, cut, device=device, **stage_kwargs(self.cfg))
        inject_layers(self.stage, spec, target_ranks(0, cut, spec, cut_rank, cap))
        self._hooks = {j: throttle.attach(self.stage.layers[str(j)]) for j in range(cut)}
        self.params = lora_parameters(self.stage.hf)
        self.grad_arrived = 0.0
        self.n_samples = len(data.shard)
        self.stream = BatchStream(
            data.examples, data.shard, cfg.train.batch_size, data_seed(cfg, rank - 1), data.pad_id
        )
        self.eval_set = eval_batches(
            data.eval_examples, data.eval_indices, cfg.train.eval_batch_size, data.pad_id
        )
        self.comm: Counter = Counter()
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
        for j in dropped:
            for handle in self._hooks.pop(j):
                handle.remove()
        for j in added:
            self._hooks[j] = self.throttle.attach(self.stage.layers[str(j)])
        self.cut, self.cut_rank = cut, cut_rank
        self.params = lora_parameters(self.stage.hf)

    def merge(self, layout: AdapterLayout, stack: StackLayout, summed: torch.Tensor) -> None:
        """stack: adds this round's exact delta to the frozen weights of every module this client adapts."""
        for name, m in lora_modules(self.stage.hf).items():
            s = layout.by_name[name]
            merge_delta(m.get_base_layer().weight, *stack.factors(summed, name), s.fan_in_fan_out)

    def fetch_merged(self, layout: AdapterLayout, layers: list[int]) -> None:
        """stack: takes the merged weights of ``layers`` from the server (after a move or on resume)."""
        names = [s.name for s in layout.slots if s.layer in set(layers)]
        weights = rpc.rpc_sync(SERVER, merged_weights, args=(names,), timeout=self.timeout_s)
        self.comm["adapters_down"] += sum(nbytes(t) for t in weights.values())
        with torch.no_grad():
            for name, w in weights.items():
                self.stage.hf.get_submodule(name).get_base_layer().weight.copy_(w)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def relora(self, spec: LoraSpec) -> None:
        """Replaces this client's LoRA by ``spec``'s (after the importance selection)."""
        strip_layers(self.stage, list(range(self.cut)))
        self.spec = spec
        inject_layers(self.stage, spec, target_ranks(0, self.cut, spec, self.cut_rank, self.cap))
        self.params = lora_parameters(self.stage.hf)

    def train_round(
        self, steps: int, stop: Callable[[], bool], scorer: Sensitivity | None = None
    ) -> dict | None:
        """Runs ``steps`` split steps; returns the round's loss, token and timing figures, or None if a
        stop was requested (checked before every step: this rank's signal, or the server's, which
        comes back with every step's reply), or ``{"diverged": {step, loss}}`` at the first NaN or
        infinite loss (nothing is stepped with it)."""
        optimizer = make_optimizer(self.params, self.cfg)
        loss_sum = tokens = correct = input_tokens = 0.0
        step_times, step_losses, compute_times = [], [], []
        start = time.perf_counter()
        server_stopping = False
        bar = StepBar(f"client{self.rank} training", steps) if self.rank == 1 else None
        for step in range(1, steps + 1):
            if server_stopping or stop():
                return None
            t0 = time.perf_counter()
            cpu_batch = self.stream.next()
            input_tokens += float(cpu_batch["attention_mask"].sum())  # on CPU: no device sync
            batch = self._to_device(cpu_batch)
            with dist_autograd.context() as ctx:
                hidden = self.stage(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                hidden = _GradArrives.apply(hidden, self)
                payload = server_payload(batch, hidden)
                sent = sum(nbytes(t) for t in payload)
                forward_s = time.perf_counter() - t0  # on a GPU: queued kernels finish during the send
                self.comm["activations_up"] += sent
                self.link.delay(sent)
                loss, stats = self.replica.rpc_sync(timeout=self.timeout_s).train_forward(*payload)
                if not math.isfinite(float(loss.detach())):
                    return {"diverged": {"step": step, "loss": float(loss.detach())}}
                dist_autograd.backward(ctx, [loss])
                compute_times.append(forward_s + time.perf_counter() - self.grad_arrived)
                server_step = self.replica.rpc_async(timeout=self.timeout_s).step(ctx)
                grads = dist_autograd.get_gradients(ctx)
                for p in self.params:
                    p.grad = grads.get(p)
                if scorer is not None:
                    scorer.update(named_lora_parameters(self.stage.hf))
                optimizer.step()
                for p in self.params:
                    p.grad = None
                server_step.wait()
            n = float(stats[0])
            step_losses.append(float(loss.detach()))
            loss_sum += step_losses[-1] * n
            tokens += n
            correct += float(stats[1])
            server_stopping = bool(stats[2])
            step_times.append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(step)
            faults.injector.hit("step", step)
        return {
            "steps": steps,
            "train_loss": loss_sum / max(tokens, 1.0),
            "train_tokens": tokens,
            "input_tokens": input_tokens,
            "train_token_accuracy": correct / max(tokens, 1.0),
            "train_time_s": time.perf_counter() - start,
            "step_time_s": sorted(step_times)[len(step_times) // 2],
            "compute_s": sorted(compute_times)[len(compute_times) // 2],
            "step_losses": step_losses,
            "peak_rss_mb": peak_rss_mb(),
            "vmdata_mb": vmdata_bytes() / 2**20,  # what simulate.memory_limit_gb (RLIMIT_DATA) caps
            "stage_param_mb": stage_parameter_bytes(self.stage) / 2**20,
        }

    @torch.no_grad()
    def evaluate(self) -> torch.Tensor:
        """[loss_sum, tokens, correct] of the current model over this client's share of the held-out set."""
        totals = torch.zeros(3, dtype=torch.float64)
        self.stage.eval()
        try:
            with global_view([self.stage.hf], *self.global_adapter):
                for batch in self.eval_set:
                    batch = self._to_device(batch)
                    hidden = self.stage(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    payload = server_payload(batch, hidden)
                    self.comm["eval_activations_up"] += sum(nbytes(t) for t in payload)
                    self.link.delay(sum(nbytes(t) for t in payload))
                    totals += self.replica.rpc_sync(timeout=self.timeout_s).evaluate(*payload).cpu()
        finally:
            self.stage.train()
        return totals

    def take_comm(self) -> dict[str, int]:
        """This round's byte counts (reset afterwards)."""
        out = {k: int(self.comm.get(k, 0)) for k in (*COMM_KEYS, "eval_activations_up")}
        self.comm.clear()
        return out
