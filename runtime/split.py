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
import torch.distributed.rpc as rpc
from safetensors.torch import save_file

from models.datasets import typical_seq_len
from models.lora import (
    AdapterLayout,
    LoraSpec,
    build_layout,
    initial_adapter,
    lora_modules,
    reducible,
    write_adapter,
)
from models.stages import DTYPES
from partition.planner import PlanError
from runtime import checkpoint, dist
from runtime.aggregate import aggregate
from runtime.client import COMM_KEYS, Client
from runtime.config import Config, validate_for_world
from runtime.dist import SERVER
from runtime.job import (
    ClientData,
    client_data,
    data_seed,
    default_threads,
    limit_malloc_arenas,
    lora_spec,
    model_config,
    resolve_model_path,
)
from runtime.metrics import MetricsWriter, header, peak_rss_mb, round_record, row
from runtime.probe import ResourceProfile, probe
from runtime.scheduler import Scheduler, model_costs
from runtime.server import Server, install, sink
from runtime.simulate import Link, Throttle, apply_memory_limit

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
    except PlanError:  # a user error (a client cannot hold its layers), not a crash: no traceback
        dist.stop(world, graceful=False)
        raise
    except BaseException:
        log.exception("run failed")
        dist.stop(world, graceful=False)
        raise


def _run(cfg: Config, world: dist.World, data: ClientData | None) -> None:
    torch.manual_seed(cfg.seed)
    model_path = resolve_model_path(cfg)
    mcfg = model_config(model_path)
    validate_for_world(cfg, world.world_size, mcfg.num_hidden_layers)
    spec = lora_spec(cfg, mcfg)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoint"
    throttle, link = Throttle(1.0), Link(None)
    if not world.is_server:
        slowdown, memory_gb, bandwidth = cfg.simulate.for_client(world.rank - 1)
        apply_memory_limit(memory_gb, world.device)
        throttle, link = Throttle(slowdown), Link(bandwidth)
        if data is None:
            data = client_data(cfg, model_path, world.rank - 1, world.n_clients)

    # Resume: rank 0 reads the checkpoint; its plan replaces planning.
    resumed = None
    if world.is_server and cfg.runtime.resume:
        resumed = checkpoint.load(ckpt_dir, _fingerprint(cfg, model_path, world.n_clients))
        if resumed is None:
            log.info("runtime.resume: no checkpoint in %s yet, starting at round 1", ckpt_dir)

    # Probe every process (one at a time, so they do not disturb each other's timings), then plan.
    full_layout = build_layout(mcfg, spec, [])
    seqs = dist.gather_objects(
        world,
        typical_seq_len(data.examples, data.shard, cfg.train.batch_size, data_seed(cfg, world.rank - 1))
        if data
        else 0,
    )
    seq = max(1, round(sum(seqs[1:]) / world.n_clients))
    profile = _probe(cfg, world, model_path, spec, mcfg, seqs[world.rank] or seq, throttle, link)
    profiles = dist.gather_objects(world, profile)
    scheduler, decision = None, None
    if world.is_server:
        out.mkdir(parents=True, exist_ok=True)
        (out / "profiles.json").write_text(json.dumps({str(r): p.to_dict() for r, p in enumerate(profiles)}))
        try:
            costs = model_costs(mcfg, cfg, full_layout, seq, max(p.activation_bytes for p in profiles[1:]))
            scheduler = Scheduler(cfg, costs, profiles[1:], profiles[0], torch.get_num_threads())
            if resumed is None:
                decision = {r: (k, spec.r_cut) for r, k in enumerate(scheduler.initial(), start=1)}
            else:
                decision = {int(r): tuple(v) for r, v in resumed[0]["plan"].items()}
                scheduler.load_state_dict(resumed[0]["scheduler"])
        except PlanError as e:
            decision = str(e)
    decision = dist.broadcast_object(world, decision)
    if isinstance(decision, str):
        raise PlanError(decision)
    plan: dict[int, tuple[int, int]] = decision
    cut_map = {r: k for r, (k, _) in plan.items()}
    layout = full_layout if cfg.moves_cuts else build_layout(mcfg, spec, list(cut_map.values()))

    server = client = None
    if world.is_server:
        server = Server(model_path, cut_map, spec, world.device, cfg)
        install(server)
        n_local = 0
    else:
        k, cut_rank = plan[world.rank]
        client = Client(world.rank, k, cut_rank, cfg, model_path, spec, data, world.device, throttle, link)
        n_local = client.n_samples
    counts = dist.gather_objects(world, n_local)
    total = sum(counts)
    weights = {rank: counts[rank] / total for rank in range(1, world.world_size)}
    if world.is_server:
        holders = [(server.replicas[r].stage.hf, weights[r]) for r in sorted(server.replicas)]
        first = scheduler.predict([cut_map[r] for r in sorted(cut_map)])
        log.info(
            "model %s, %d layers; policy %s, cuts %s (predicted round %.2fs, bound by %s); samples %s",
            model_path,
            mcfg.num_hidden_layers,
            cfg.policy,
            cut_map,
            first.round_time_s,
            first.bottleneck,
            counts[1:],
        )
    else:
        holders = [(client.stage.hf, weights[world.rank])]
    dist.barrier(world)  # replicas exist before any client asks for its RRef
    if client is not None:
        client.connect()

    # Round 0: the initial adapter, or the checkpoint's when resuming (rank 0 reads, everyone gets it).
    start_round, elapsed0, flat = 0, 0.0, initial_adapter(layout, cfg.seed)
    if resumed is not None:
        state, flat = resumed
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
        prediction = scheduler.predict([cut_map[r] for r in sorted(cut_map)]) if scheduler else None
        stats = client.train_round(cfg.train.local_steps) if client is not None else {}
        # The server reads its replicas' adapters, so every client's last step must be done first.
        dist.barrier(world)
        if cfg.runtime.debug:
            _dump_copies(out / "debug" / f"round{rnd}", world, server, client, weights)
        flat = aggregate(holders, layout, world.device, world.aggregation)
        if client is not None:
            adapter_bytes = flat.numel() * flat.element_size()
            client.comm["adapters_up"] += adapter_bytes
            client.comm["adapters_down"] += adapter_bytes
            client.link.delay(2 * adapter_bytes)
        else:
            for replica in server.replicas.values():
                replica.new_round()
        dist.barrier(world)  # every holder has the global adapter before anyone evaluates
        evaluation = _evaluate(world, client)
        if client is None:
            stats = {"peak_rss_mb": peak_rss_mb()}
            stats["server_s"] = {r: rep.take_step_time() for r, rep in server.replicas.items()}
        report = {"stats": stats, "comm": client.take_comm() if client else {}}
        reports = dist.gather_objects(world, report)

        # Re-plan: rank 0 decides, every process moves the layers concerned.
        new_plan = None
        if world.is_server and rnd < cfg.train.rounds:
            order = sorted(cut_map)
            cuts = scheduler.after_round(
                rnd,
                [cut_map[r] for r in order],
                [{**reports[r]["stats"], "server_s": stats["server_s"][r]} for r in order],
                evaluation[0],
            )
            if cuts is not None:
                new_plan = {
                    r: plan[r] if k == cut_map[r] else (k, _cut_rank(layout, flat, k, spec))
                    for r, k in zip(order, cuts)
                }
        new_plan = dist.broadcast_object(world, new_plan)
        after_move = None
        if new_plan is not None:
            t_move = time.perf_counter()
            if client is not None:
                k, cut_rank = new_plan[world.rank]
                if k != client.cut:
                    client.move(k, cut_rank, layout, flat)
            else:
                server.move({r: k for r, (k, _) in new_plan.items()}, plan, layout, flat)
            dist.barrier(world)
            move_s = time.perf_counter() - t_move
            if cfg.runtime.debug:  # the model must be the same function after the move
                after_move = _evaluate(world, client)[0]
        if world.is_server:
            now = time.perf_counter()
            record = _record(rnd, now - t_start, now - t_round, reports, evaluation, cut_map, weights)
            record["plan"] = _plan_record(
                cfg, plan, new_plan, prediction, after_move, move_s if new_plan else 0.0
            )
            for i, r in enumerate(sorted(cut_map)):
                record["clients"][str(r)]["predicted_time_s"] = prediction.client_time_s[i]
                record["clients"][str(r)]["server_s"] = stats["server_s"][r]
            writer.write(record)
            log.info(row(record))
            if new_plan is not None:
                log.info(
                    "re-plan after round %d: cuts %s -> %s",
                    rnd,
                    cut_map,
                    {r: v[0] for r, v in new_plan.items()},
                )
        if new_plan is not None:
            plan = new_plan
            cut_map = {r: k for r, (k, _) in plan.items()}
        if world.is_server:
            _save(out, flat, layout, spec, mcfg, model_path, cfg, plan, scheduler, rnd, now - t_start)
    if world.is_server and cfg.runtime.debug:
        (out / "debug" / "wire.json").write_text(
            json.dumps({r: sorted(rep.received) for r, rep in server.replicas.items()}, indent=1)
        )
    dist.barrier(world)


def _cut_rank(layout: AdapterLayout, flat: torch.Tensor, k: int, spec: LoraSpec) -> int:
    """The reduced rank on a new cut layer where that changes nothing, else the full rank (models.moves)."""
    return spec.r_cut if reducible(layout, flat, k - 1, spec.r_cut) else spec.r


def _plan_record(cfg, plan, new_plan, prediction, after_move, move_s) -> dict:
    record = {
        "policy": cfg.policy,
        "cut_ranks": {str(r): v[1] for r, v in plan.items()},
        "predicted_round_time_s": prediction.round_time_s,
        "bottleneck": prediction.bottleneck,
        "next_cut_layers": None if new_plan is None else {str(r): v[0] for r, v in new_plan.items()},
        "move_s": move_s,
    }
    if after_move is not None:
        record["eval_loss_after_move"] = after_move
    return record


def _probe(cfg, world, model_path, spec, mcfg, seq, throttle, link) -> ResourceProfile:
    """Every rank's ResourceProfile, measured one rank at a time (barriers in between)."""
    width = DTYPES[cfg.model.dtype].itemsize
    payload = cfg.train.batch_size * seq * mcfg.hidden_size * width
    profile = None
    for turn in range(world.world_size):
        if turn == world.rank:
            profile = probe(
                model_path,
                spec,
                cfg.train.batch_size,
                seq,
                world.device,
                cfg.model.dtype,
                cfg.model.attn_implementation,
                throttle,
                send=None if world.is_server else lambda t: rpc.rpc_sync(SERVER, sink, args=(t,)),
                payload_bytes=payload,
                link=link,
                server=world.is_server,
            )
        dist.barrier(world)
    return profile


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
                        "compute_s",
                        "step_losses",
                        "peak_rss_mb",
                        "vmdata_mb",
                        "stage_param_mb",
                    )
                },
            }
            for r, c in clients.items()
        },
    )


def _fingerprint(cfg: Config, model_path: Path, n_clients: int) -> dict:
    """What a resumed run must share with the checkpoint (the plan itself comes from the checkpoint)."""
    return {
        "model_path": str(model_path),
        "clients": n_clients,
        "policy": cfg.policy,
        "cut_layers": cfg.split.cut_layers if cfg.policy in ("fixed", "manual") else None,
        "lora": [cfg.lora.r, cfg.lora.r_cut],
        "seed": cfg.seed,
        "local_steps": cfg.train.local_steps,
    }


def _save(out, flat, layout, spec, mcfg, model_path, cfg, plan, scheduler, rnd, elapsed) -> None:
    checkpoint.export_adapter(out, layout, flat, spec, mcfg, model_path)
    state = {
        "round": rnd,
        "elapsed_s": elapsed,
        **_fingerprint(cfg, model_path, len(plan)),
        "plan": {str(r): list(v) for r, v in plan.items()},
        "scheduler": scheduler.state_dict(),
    }
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
