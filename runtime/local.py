"""The unsplit reference: the same model, LoRA, data and rounds in one process, with no cut.

This is the papers' "no cut" baseline and the split run's parity reference: the model is the
ordinary HF model from ``from_pretrained`` with PEFT's ``get_peft_model``, trained on what a
single client would hold (the whole training set), batch for batch in the same order, with
the same LoRA initialisation and an optimizer made afresh each round.

Dropout (GPT-2 and OPT checkpoints carry 0.1; ``lora.dropout``) draws random masks. In a split
run the layers below the cut draw from the client's generator and the rest from the server's,
each reseeded every round from (seed, rank, round). ``DropoutStreams`` makes this one process
draw the same way for the cut in ``split.cut_layers``, so a one-client split run at that cut
matches it step for step with dropout on (on CPU: only the CPU generator is switched).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from peft import get_peft_model

from models.datasets import BatchStream, eval_batches
from models.families import family_of, get_module
from models.generate import score_responses
from models.lora import (
    build_layout,
    initial_adapter,
    lora_config,
    lora_parameters,
    read_adapter,
    write_adapter,
)
from models.loss import mean_loss, token_stats
from models.stages import checkpoint_layers, full_model
from runtime import checkpoint
from runtime.config import Config
from runtime.job import (
    ClientData,
    autocast,
    check_autocast,
    client_data,
    clip_factor,
    data_seed,
    default_threads,
    learning_rate,
    load_tokenizer,
    lora_spec,
    loss_logits,
    make_optimizer,
    micro_weights,
    model_config,
    resolve_model_path,
    round_seed,
    scale_grads,
    set_learning_rate,
    squared_grad_norm,
    tune_malloc,
)
from runtime.messages import EvalDetails, GenerationScore
from runtime.metrics import (
    CpuUsage,
    MetricsWriter,
    TensorBoardLog,
    eval_fields,
    header,
    peak_rss_mb,
    round_record,
    row,
    write_baseline,
)

log = logging.getLogger("splitft")


class DropoutStreams:
    """Random draws split at decoder layer ``cut`` as a one-client split run makes them: the embeddings
    and layers ``0..cut-1`` draw from the client's stream (rank 1), layers ``cut..L-1`` from the
    server's (rank 0), each seeded every round with ``round_seed``. Forward hooks switch the
    process's CPU generator between the two states at the cut and back after the last layer."""

    def __init__(self, layers: torch.nn.ModuleList, cut: int, seed: int):
        self.seed = seed
        self.client_state = self.server_state = torch.get_rng_state()
        layers[cut].register_forward_pre_hook(self._to_server)
        layers[len(layers) - 1].register_forward_hook(self._to_client)

    def start_round(self, rnd: int) -> None:
        torch.manual_seed(round_seed(self.seed, 0, rnd))
        self.server_state = torch.get_rng_state()
        torch.manual_seed(round_seed(self.seed, 1, rnd))

    def _to_server(self, *args) -> None:
        self.client_state = torch.get_rng_state()
        torch.set_rng_state(self.server_state)

    def _to_client(self, *args) -> None:
        self.server_state = torch.get_rng_state()
        torch.set_rng_state(self.client_state)


def reference_cut(cfg: Config, n_layers: int) -> int | None:
    """The cut whose random draws the unsplit run reproduces: ``split.cut_layers`` when it names one cut."""
    cuts = cfg.split.cut_layers
    cut = cuts if isinstance(cuts, int) else cuts[0] if len(cuts) == 1 else None
    return cut if cut is not None and 1 <= cut < n_layers else None


def run_local(cfg: Config, data: ClientData | None = None) -> list[dict]:
    """Trains ``cfg.train.rounds`` rounds; writes metrics.jsonl and adapter/ and returns the records."""
    tune_malloc(cfg.runtime.malloc_arenas, cfg.runtime.malloc_keep_mb)
    torch.set_num_threads(cfg.runtime.intra_op_threads or default_threads(1))
    torch.manual_seed(cfg.seed)
    model_path = resolve_model_path(cfg)
    mcfg = model_config(model_path)
    spec = lora_spec(cfg, mcfg)
    layout = build_layout(mcfg, spec, [])
    if data is None:
        data = client_data(cfg, model_path, 0, 1)
    base = full_model(model_path, cfg.model.dtype, cfg.model.attn_implementation)
    model = get_peft_model(base, lora_config(spec, family_of(mcfg)))
    hf = model.base_model.model  # module names here are the full model's, as in the layout
    cut = reference_cut(cfg, mcfg.num_hidden_layers)
    layers = get_module(hf, family_of(mcfg).layers)
    streams = None if cut is None else DropoutStreams(layers, cut, cfg.seed)
    cpu = torch.device("cpu")
    check_autocast(cfg, cpu)
    # activation checkpointing: each layer recomputes in the backward, so no layer caches keys and values
    forward_kwargs = {"use_cache": False} if cfg.train.activation_checkpointing else {}
    if cfg.train.activation_checkpointing:
        checkpoint_layers(layers)
    # float16: GradScaler's dynamic loss scale, kept across rounds as a split run's replica keeps it
    scaler = torch.amp.GradScaler("cpu") if cfg.train.autocast == "float16" else None
    write_adapter(hf, layout, initial_adapter(layout, cfg.seed))
    params = lora_parameters(hf)
    stream = BatchStream(data.examples, data.shard, cfg.train.batch_size, data_seed(cfg, 0), data.pad_id)
    evals = eval_batches(data.eval_examples, data.eval_indices, cfg.train.eval_batch_size, data.pad_id)
    out = Path(cfg.output_dir)
    writer = MetricsWriter(out / "metrics.jsonl", [])
    tensorboard = TensorBoardLog(out / "tensorboard", 1) if cfg.runtime.tensorboard else None

    def micro_batch(b: dict[str, torch.Tensor], weight: float | None) -> tuple[float, float]:
        """One micro-batch's forward and backward, its loss scaled by its share of the step's tokens."""
        with autocast(cfg, cpu):
            logits = model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], **forward_kwargs
            ).logits
        loss, n_tokens = mean_loss(loss_logits(cfg, logits), b["labels"])
        root = loss if weight is None else loss * weight
        (root if scaler is None else scaler.scale(root)).backward()
        return float(loss.detach()), float(n_tokens)

    heldout = eval_batches(data.examples, data.heldout, cfg.train.eval_batch_size, data.pad_id)
    tokenizer = load_tokenizer(model_path) if cfg.eval.generate else None

    def evaluate() -> tuple[tuple[float, float, float], EvalDetails]:
        """As the split run evaluates (``Role.evaluate_all``), with the whole model in this process."""
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            evaluation = _loss(model, evals, cfg, cpu)
            details = EvalDetails(time_s=time.perf_counter() - t0)
            if heldout:  # the one client of this run: client 1, as in a one-client split run
                details.clients[1] = _loss(model, heldout, cfg, cpu)
            if tokenizer is not None:
                t1 = time.perf_counter()
                totals = _generate(
                    model, cfg, [data.eval_examples[i] for i in data.generate_indices], tokenizer
                )
                details.generation = GenerationScore.summed(totals, time.perf_counter() - t1)
        model.train()
        return evaluation, details

    write_baseline(out, *evaluate())
    log.info(header())
    records = []
    t_start = time.perf_counter()
    for rnd in range(1, cfg.train.rounds + 1):
        t_round = time.perf_counter()
        if streams is not None:
            streams.start_round(rnd)
        optimizer = make_optimizer(params, cfg)
        usage = CpuUsage()
        losses, tokens, weighted, input_tokens, norms = [], 0.0, 0.0, 0.0, []
        t_steps = time.perf_counter()
        n = cfg.train.grad_accum
        for step in range(1, cfg.train.local_steps + 1):
            batches = [stream.next() for _ in range(n)]
            step_sum = step_tokens = 0.0
            for b, weight in zip(batches, micro_weights(batches)):
                loss, n_tokens = micro_batch(b, weight)
                step_sum += loss * n_tokens
                step_tokens += n_tokens
                input_tokens += float(b["attention_mask"].sum())
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.train.max_grad_norm is not None:
                squared = squared_grad_norm(params)
                if math.isfinite(squared):  # else float16 overflowed: the scaler skips the step
                    norms.append(math.sqrt(squared))
                    scale_grads(params, clip_factor(squared, cfg.train.max_grad_norm))
            set_learning_rate(optimizer, learning_rate(cfg, rnd, step))
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_sum / max(step_tokens, 1.0) if n > 1 else loss)
            tokens += step_tokens
            weighted += losses[-1] * step_tokens
        cores_used = usage.stop()["train_cores_used"]
        train_time = time.perf_counter() - t_steps
        evaluation, details = None, None  # eval.every: a round not evaluated measures nothing
        if rnd % cfg.eval.every == 0 or rnd == cfg.train.rounds:
            evaluation, details = evaluate()
        now = time.perf_counter()
        train_loss = weighted / max(tokens, 1.0)
        record = round_record(
            rnd,
            now - t_start,
            now - t_round,
            train_loss,
            evaluation,
            input_tokens,
            cut_layers={},
            comm_bytes={},
            lr=learning_rate(cfg, rnd, cfg.train.local_steps),  # at the round's last step
            clients={
                "local": {
                    "weight": 1.0,
                    "train_loss": train_loss,
                    "step_losses": losses,
                    "peak_rss_mb": peak_rss_mb(),
                    "train_cores_used": cores_used,
                    "train_time_s": train_time,
                    **({"grad_norms": norms} if norms else {}),
                }
            },
        )
        record.update(eval_fields(details))
        writer.write(record)
        if tensorboard is not None:
            tensorboard.write(record)
        records.append(record)
        log.info(row(record))
    if tensorboard is not None:
        tensorboard.close()
    flat = torch.zeros(layout.numel)
    read_adapter(hf, layout, flat, 1.0)
    checkpoint.export_adapter(out, layout, flat, spec, mcfg, model_path)
    return records


def _loss(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], cfg: Config, device: torch.device
) -> tuple[float, float, float]:
    """(loss, token accuracy, tokens) of ``model`` over ``batches`` (under ``train.autocast``, the loss in
    float32)."""
    totals = torch.zeros(3, dtype=torch.float64)
    for b in batches:
        with autocast(cfg, device):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        totals += torch.stack([t.double() for t in token_stats(loss_logits(cfg, logits), b["labels"])])
    loss_sum, tokens, correct = totals.tolist()
    return loss_sum / max(tokens, 1.0), correct / max(tokens, 1.0), tokens


def _generate(model: torch.nn.Module, cfg: Config, examples: list, tokenizer) -> torch.Tensor:
    """[exact matches, ROUGE-L sum, samples] of greedy decoding, as ``Client.generate`` scores it."""

    def next_tokens(ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        with autocast(cfg, ids.device):
            logits = model(input_ids=ids, attention_mask=mask).logits
        return logits[torch.arange(len(last)), last].argmax(-1)

    e = cfg.eval
    return score_responses(
        next_tokens,
        examples,
        tokenizer,
        tokenizer.pad_token_id,
        cfg.train.eval_batch_size,
        e.max_new_tokens,
        cfg.data.max_seq_len,
    )
