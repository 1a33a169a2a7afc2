"""The server side of the split: one frozen base, one LoRA replica per client.

The base layers ``min(k)..L-1``, final norm and head are loaded once and shared (frozen). Each
client gets a ``ServerReplica``: a shallow copy of the base holding only layers ``k_i..L-1``,
with its own LoRA weights and optimizer. Concurrent clients therefore never step weights
another client's graph still needs (the "modified by an inplace operation" hazard), and no
module-global PEFT state (``set_adapter``) is touched from RPC threads.
"""

from __future__ import annotations

import copy
import threading

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc

from models.lora import LoraSpec, add_lora, lora_parameters
from models.loss import mean_loss, token_stats
from models.stages import Stage, build_stage, load_config
from runtime.config import Config
from runtime.job import make_optimizer


class ServerReplica:
    """Layers ``cut..L-1`` + head for one client. Called over RPC through an RRef, one call at a time."""

    def __init__(self, base: Stage, cut: int, spec: LoraSpec, device: torch.device, cfg: Config):
        shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
        hf = copy.deepcopy(base.hf, memo=shared)  # new modules, same frozen tensors
        layers = base.family.layers
        owned = hf.get_submodule(layers)
        for index in range(base.start, cut):
            del owned[str(index)]
        self.stage = Stage(hf, base.family, base.config, cut, base.end)
        add_lora(self.stage, spec, cut_rank=False)
        self.stage.to(device)
        self.device = device
        self.cfg = cfg
        self.params = lora_parameters(self.stage.hf)
        self.optimizer = make_optimizer(self.params, cfg)
        self.lock = threading.Lock()  # guards against a misbehaving client issuing calls in parallel
        # runtime.debug: a summary of every tensor that arrived, to show what crosses the wire.
        self.received: set[str] | None = set() if cfg.runtime.debug else None

    def new_round(self) -> None:
        self.optimizer = make_optimizer(self.params, self.cfg)

    def train_forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor):
        """Runs the rest of the model and returns (loss, [tokens, correct]); autograd spans the RPC."""
        with self.lock:
            if self.received is not None:
                self.received.update(_describe(t) for t in (hidden, mask, labels))
            logits = self.stage(hidden=hidden, attention_mask=mask)
            loss, n_tokens, correct = mean_loss(logits, labels)
            return loss, torch.stack([n_tokens, correct]).to(torch.float64)

    def step(self, context_id: int) -> None:
        """Applies this replica's gradients from the client's distributed-autograd context."""
        with self.lock:
            grads = dist_autograd.get_gradients(context_id)
            for p in self.params:
                p.grad = grads.get(p)
            self.optimizer.step()
            for p in self.params:
                p.grad = None

    @torch.no_grad()
    def evaluate(self, hidden: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.stage.eval()
            try:
                logits = self.stage(hidden=hidden, attention_mask=mask)
                loss_sum, n_tokens, correct = token_stats(logits, labels)
            finally:
                self.stage.train()
            return torch.stack([loss_sum.double(), n_tokens.double(), correct.double()])


def _describe(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{t.dtype}:{t.dim()}d:last={t.shape[-1] if t.dim() == 3 else '-'}"


class Server:
    """Holds the shared base and a replica per client rank."""

    def __init__(self, model_path, cuts: dict[int, int], spec: LoraSpec, device: torch.device, cfg: Config):
        n_layers = load_config(model_path).num_hidden_layers
        base = build_stage(
            model_path,
            min(cuts.values()),
            n_layers,
            device=device,
            dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
        )
        self.base = base
        self.replicas = {rank: ServerReplica(base, k, spec, device, cfg) for rank, k in cuts.items()}


# The RPC entry point: clients call rpc_sync(SERVER, replica_rref, (rank,)) and get an RRef to their replica.
_SERVER: Server | None = None


def install(server: Server) -> None:
    global _SERVER
    _SERVER = server


def replica_rref(rank: int) -> rpc.RRef:
    """An RRef, owned by the server, to the replica the server built for client ``rank``."""
    if _SERVER is None:
        raise RuntimeError("the server has not finished building its replicas")
    return rpc.RRef(_SERVER.replicas[rank])
