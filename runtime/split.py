"""The split run: every rank's life from start-up to shutdown (DESIGN.md, "round protocol").

Per round: clients train concurrently through their server replicas; all ranks aggregate the
adapters in one all-reduce; the global model is evaluated on the held-out set; rank 0 logs,
exports the adapter and checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.lora import (
    AdapterLayout,
    build_layout,
    initial_adapter,
    lora_modules,
    write_adapter,
)
from runtime import checkpoint, dist
from runtime.aggregate import aggregate
from runtime.client import COMM_KEYS, Client
from runtime.config import Config, validate_for_world
from runtime.job import (
    ClientData,
    client_data,
    default_threads,
    limit_malloc_arenas,
    lora_spec,
    model_config,
    resolve_model_path,
)
from runtime.metrics import MetricsWriter, header, peak_rss_mb, round_record, row
from runtime.server import Server, install

log = logging.getLogger("splitft")


def setup_logging(rank: int) -> None:
    role = "server" if rank == 0 else f"client{rank}"
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank} {role}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run(cfg: Config, data: ClientData | None = None) -> None:
    """Runs this rank's role to the end; ``data`` is a client's already-loaded data (loaded here if None)."""
    world = None
    try:
        rt = cfg.runtime
        limit_malloc_arenas(rt.malloc_arenas)
        world = dist.start(rt.device, rt.timeout_s, rt.rpc_threads, rt.rpc_transports)
        setup_logging(world.rank)
        torch.set_num_threads(cfg.runtime.intra_op_threads or default_threads(world.local_world_size))
        _run(cfg, world, data)
        dist.stop(world)
    except BaseException:
        log.exception("run failed")
        dist.stop(world, graceful=False)
        raise


def _run(cfg: Config, world: dist.World, data: ClientData | None) -> None:
    torch.manual_seed(cfg.seed)
    model_path = resolve_model_path(cfg)
    mcfg = model_config(model_path)
    cuts = validate_for_world(cfg, world.world_size, mcfg.num_hidden_layers)
    cut_map = {rank: cuts[rank - 1] for rank in range(1, world.world_size)}
    spec = lora_spec(cfg, mcfg)
    layout = build_layout(mcfg, spec, cuts)
    out = Path(cfg.output_dir)

    server = client = None
    if world.is_server:
        server = Server(model_path, cut_map, spec, world.device, cfg)
        install(server)
        n_local = 0
    else:
        if data is None:
            data = client_data(cfg, model_path, world.rank - 1, world.n_clients)
        client = Client(
            world.rank, cut_map[world.rank], cfg, model_path, spec, data, world.device, cfg.runtime.timeout_s
        )
        n_local = client.n_samples
    counts = dist.gather_objects(world, n_local)
    total = sum(counts)
    weights = {rank: counts[rank] / total for rank in range(1, world.world_size)}
    if world.is_server:
        holders = [(server.replicas[r].stage.hf, weights[r]) for r in sorted(server.replicas)]
        log.info(
            "model %s, %d layers; cuts %s; samples %s; adapter %d params",
            model_path,
            mcfg.num_hidden_layers,
            cut_map,
            counts[1:],
            layout.numel,
        )
    else:
        holders = [(client.stage.hf, weights[world.rank])]
    dist.barrier(world)  # replicas exist before any client asks for its RRef
    if client is not None:
        client.connect()

    # Round 0: the initial adapter, or the checkpoint's when resuming (rank 0 reads, everyone gets it).
    start_round, elapsed0, flat = 0, 0.0, initial_adapter(layout, cfg.seed)
    ckpt_dir = out / "checkpoint"
    if world.is_server and cfg.runtime.resume:
        loaded = checkpoint.load(ckpt_dir, _fingerprint(cfg, model_path, cut_map, layout))
        if loaded is None:
            log.info("runtime.resume: no checkpoint in %s yet, starting at round 1", ckpt_dir)
        else:
            state, flat = loaded
            start_round, elapsed0 = state["round"], state["elapsed_s"]
            log.info("resuming after round %d from %s", start_round, ckpt_dir)
    start_round, elapsed0, flat = dist.broadcast_object(world, (start_round, elapsed0, flat))
    for model, _ in holders:
        write_adapter(model, layout, flat.to(world.device))
    if client is not None:
        client.stream.skip(start_round * cfg.train.local_steps)
    dist.barrier(world)

    writer = MetricsWriter(out / "metrics.jsonl", start_round) if world.is_server else None
    if start_round == 0:
        baseline = _evaluate(world, client)
        if world.is_server:
            log.info("before training: eval_loss %.4f, token accuracy %.4f", baseline[0], baseline[1])
            (out / "baseline.json").write_text(
                json.dumps(
                    {"eval_loss": baseline[0], "eval_token_accuracy": baseline[1], "eval_tokens": baseline[2]}
                )
            )
            log.info(header())

    t_start = time.perf_counter() - elapsed0
    for rnd in range(start_round + 1, cfg.train.rounds + 1):
        t_round = time.perf_counter()
        stats = client.train_round(cfg.train.local_steps) if client is not None else {}
        # The server reads its replicas' adapters, so every client's last step must be done first.
        dist.barrier(world)
        if cfg.runtime.debug:
            _dump_copies(out / "debug" / f"round{rnd}", world, server, client, weights)
        flat = aggregate(holders, layout, world.device, world.aggregation)
        if client is not None:
            client.comm["adapters_up"] += flat.numel() * flat.element_size()
            client.comm["adapters_down"] += flat.numel() * flat.element_size()
        else:
            for replica in server.replicas.values():
                replica.new_round()
        dist.barrier(world)  # every holder has the global adapter before anyone evaluates
        evaluation = _evaluate(world, client)
        if client is None:
            stats = {"peak_rss_mb": peak_rss_mb()}
        report = {"stats": stats, "comm": client.take_comm() if client else {}}
        reports = dist.gather_objects(world, report)
        if world.is_server:
            now = time.perf_counter()
            record = _record(rnd, now - t_start, now - t_round, reports, evaluation, cut_map, weights)
            writer.write(record)
            log.info(row(record))
            _save(out, flat, layout, spec, mcfg, model_path, cfg, cut_map, rnd, now - t_start)
    if world.is_server and cfg.runtime.debug:
        (out / "debug" / "wire.json").write_text(
            json.dumps({r: sorted(rep.received) for r, rep in server.replicas.items()}, indent=1)
        )
    dist.barrier(world)


def _evaluate(world: dist.World, client: Client | None) -> tuple[float, float, float]:
    totals = client.evaluate() if client is not None else torch.zeros(3, dtype=torch.float64)
    totals = torch.stack(dist.gather_objects(world, totals)).sum(0)
    loss_sum, tokens, correct = totals.tolist()
    return loss_sum / max(tokens, 1.0), correct / max(tokens, 1.0), tokens


def _record(rnd, elapsed, round_time, reports, evaluation, cut_map, weights) -> dict:
    clients = {rank: reports[rank]["stats"] for rank in cut_map}
    comm = {rank: reports[rank]["comm"] for rank in cut_map}
    tokens = sum(c["train_tokens"] for c in clients.values())
    return round_record(
        rnd,
        elapsed,
        round_time,
        sum(c["train_loss"] * c["train_tokens"] for c in clients.values()) / max(tokens, 1.0),
        evaluation,
        sum(c["input_tokens"] for c in clients.values()),
        cut_layers={str(r): k for r, k in cut_map.items()},
        comm_bytes={str(r): {k: c[k] for k in COMM_KEYS} for r, c in comm.items()},
        eval_comm_bytes={str(r): c["eval_activations_up"] for r, c in comm.items()},
        server={"peak_rss_mb": reports[0]["stats"]["peak_rss_mb"]},
        clients={
            str(r): {
                "weight": weights[r],
                **{
                    k: c[k]
                    for k in (
                        "steps",
                        "train_loss",
                        "train_time_s",
                        "step_time_s",
                        "step_losses",
                        "peak_rss_mb",
                        "stage_param_mb",
                    )
                },
            }
            for r, c in clients.items()
        },
    )


def _fingerprint(cfg: Config, model_path: Path, cut_map: dict[int, int], layout: AdapterLayout) -> dict:
    return {
        "model_path": str(model_path),
        "cut_layers": {str(r): k for r, k in cut_map.items()},
        "adapter_numel": layout.numel,
        "seed": cfg.seed,
        "local_steps": cfg.train.local_steps,
    }


def _save(out, flat, layout, spec, mcfg, model_path, cfg, cut_map, rnd, elapsed) -> None:
    checkpoint.export_adapter(out, layout, flat, spec, mcfg, model_path)
    state = {"round": rnd, "elapsed_s": elapsed, **_fingerprint(cfg, model_path, cut_map, layout)}
    checkpoint.save(out / "checkpoint", flat, state)


def _dump_copies(
    folder: Path, world: dist.World, server: Server | None, client: Client | None, weights: dict[int, float]
) -> None:
    """Writes every holder's pre-aggregation LoRA weights (runtime.debug; used by the tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = (
        {f"client{world.rank}": client.stage.hf}
        if client
        else {f"server_for{r}": rep.stage.hf for r, rep in server.replicas.items()}
    )
    for name, model in copies.items():
        tensors = {}
        for module, m in lora_modules(model).items():
            tensors[f"{module}.A"] = m.lora_A["default"].weight.detach().cpu().contiguous()
            tensors[f"{module}.B"] = m.lora_B["default"].weight.detach().cpu().contiguous()
        rank = world.rank if client else int(name.removeprefix("server_for"))
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"weight": repr(weights[rank])})
