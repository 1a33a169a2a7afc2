"""A rank's whole life in the split run: start-up, its role (``runtime.protocol``), and how it ends.

Rank 0 plays ``ServerRole``, every other rank ``ClientRole``. Failure handling has one home,
:func:`run`: a stop request leaves after the last complete round with ``EXIT_PREEMPTED``; a lost
peer is named and leaves with ``EXIT_PEER_LOST``; a rank that never joined is named and every rank
leaves with ``EXIT_STALLED`` (so does a stalled job, from the heartbeat's thread); a user error
(``runtime.messages.USER_ERRORS``) is raised on every rank with no traceback; an out-of-memory or a
full disk is named with the rank and the fix (``faults.Unrecoverable``); everything else is logged
once and re-raised.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from runtime import dist, faults
from runtime.client_role import ClientRole
from runtime.compute import for_process
from runtime.config import Config, ConfigError
from runtime.job import ClientData, default_threads, tune_malloc
from runtime.logs import setup_logging
from runtime.messages import USER_ERRORS
from runtime.server_role import ServerRole

log = logging.getLogger("splitft")


def run(cfg: Config, data: ClientData | None = None) -> None:
    """Runs this rank's role to the end; ``data`` is a client's already-loaded data (loaded here if None).

    Raises ``SystemExit(EXIT_PREEMPTED)`` after a stop signal, ``SystemExit(EXIT_PEER_LOST)`` when a
    peer went away (named in the log), ``PlanError``/``CheckpointMismatch``/``Diverged`` for user
    errors (every rank), ``ConfigError`` for a placement the cluster cannot take, and re-raises
    anything else after logging it once.
    """
    rt = cfg.runtime
    tune_malloc(rt.malloc_arenas, rt.malloc_keep_mb)
    stop = faults.StopSignals()
    world = heartbeat = compute = role = None
    try:
        setup_logging(dist.env_world()[0])  # before start: it logs the placement and the backend
        faults.injector = faults.FaultInjector(dist.env_world()[0])
        world = dist.start(
            rt.device,
            rt.rpc_timeout_s,
            rt.round_timeout_s,
            rt.rpc_threads,
            rt.rpc_transports,
            server_gpu=rt.server_gpu,
            aggregation_backend=rt.aggregation_backend,
            join_timeout_s=rt.join_timeout_s,
            stopping=lambda: stop.requested,
        )
        threads = rt.intra_op_threads or default_threads(world.local_world_size)
        compute = for_process(world.device, threads, world.is_server, rt.compute_threads)
        if compute.enabled:
            log.info(
                "the replicas compute on %d thread(s) of %d intra-op threads; the main thread is serial "
                "(runtime.compute_threads)",
                compute.workers,
                threads,
            )
        token = dist.broadcast_object(world, uuid.uuid4().hex)  # heartbeat keys of this attempt only
        heartbeat = faults.Heartbeat(
            world.rank, world.world_size, token, rt.peer_timeout_s, stall_timeout_s=rt.stall_timeout_s
        )
        dist.barrier(world)
        heartbeat.start()
        role = (
            ServerRole(cfg, world, stop, compute)
            if world.is_server
            else ClientRole(cfg, world, stop, compute, data)
        )
        role.run()
        dist.stop(world)
    except faults.Preempted:
        log.warning(
            "stopped by %s; the last complete round's checkpoint in %s is kept: launch the same command "
            "again to continue (runtime.resume=auto)",
            stop.signal.name if stop.signal else "a peer's stop request",
            Path(cfg.output_dir) / "checkpoint",
        )
        dist.stop(world, graceful=False)
        raise SystemExit(faults.EXIT_PREEMPTED) from None
    except dist.NotJoined as e:  # start-up never completed: named, no traceback
        log.error("%s; stopping this rank (torchrun restarts the job if --max-restarts allows)", e)
        dist.stop(world, graceful=False)
        raise SystemExit(faults.EXIT_STALLED) from None
    except (*USER_ERRORS.values(), ConfigError):  # a user error, not a crash: no traceback
        dist.stop(world, graceful=False)
        raise
    except BaseException as e:
        fatal = faults.unrecoverable(
            e, world.rank if world else dist.env_world()[0], lambda r: _place(role, r)
        )
        if fatal is not None:  # a restart would fail the same way: one line with the fix, no traceback
            log.error("%s", fatal)
            dist.stop(world, graceful=False)
            raise fatal from None
        lost = heartbeat.silent(wait_s=4 * heartbeat.interval) if heartbeat else []
        code = None
        if lost:
            log.error(
                "lost %s: it stopped answering (%s: %s). Every complete round is checkpointed in %s; "
                "launch the same command again to continue (runtime.resume=auto), or use "
                "torchrun --max-restarts=N to have torchrun do it",
                ", ".join(f"rank {r} ({dist.worker_name(r)})" for r in lost),
                type(e).__name__,
                e,
                Path(cfg.output_dir) / "checkpoint",
            )
            code = faults.EXIT_PEER_LOST
        elif stop.requested:  # torchrun stopping the workers after another one failed, or a preemption
            log.warning("stopping on %s (%s: %s)", stop.signal.name, type(e).__name__, e)
            code = faults.EXIT_PREEMPTED
        else:
            log.exception("run failed")
        dist.stop(world, graceful=False)
        if code is None:
            raise
        raise SystemExit(code) from None
    finally:
        if role is not None:
            role.close()
        if heartbeat is not None:
            heartbeat.close()
        if compute is not None:
            compute.close()
        stop.close()


def _place(role: ServerRole | ClientRole | None, rank: int) -> str:
    """``client2, cut 3`` or ``server, cuts [1, 3]``: what a rank held, for an out-of-memory message."""
    cuts = role.cut_map if role is not None else {}
    if rank == 0:
        return f"server, cuts {[cuts[r] for r in sorted(cuts)]}" if cuts else "server"
    return f"client{rank}, cut {cuts[rank]}" if rank in cuts else f"client{rank}"
