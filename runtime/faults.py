"""Staying alive and stopping well: preemption signals, peer liveness, exit codes, injected faults.

The fault model is torchelastic's. When a worker dies its agent stops every worker of that agent,
the other agents re-rendezvous, and with ``torchrun --max-restarts=N`` all workers start again
with the same arguments; each then finds the newest complete round checkpoint by itself
(``runtime.resume=auto``). So a rank never tries to repair a broken group: it stops promptly,
says why, and leaves the checkpoint as it was.

- **Signals** (``StopSignals``): SIGTERM (Slurm preemption; the agent stopping its workers) and
  SIGUSR1 (Slurm's time-limit warning; torchrun forwards it when it is in
  ``--signals-to-handle``, i.e. ``PET_SIGNALS_TO_HANDLE``, which the sbatch scripts set) ask for
  a stop. Clients stop at the next step boundary and every rank leaves the round together; the
  round in progress is dropped, since its optimizer and server-replica state are not saved, and
  the last complete round's checkpoint is what the next launch continues from. A rank blocked in
  a collective cannot run Python signal handlers, so a thread woken through
  ``signal.set_wakeup_fd`` sees the signal and, if the rank has not left within
  ``STOP_GRACE_S``, ends the process (still before torchrun's own 30 s SIGKILL).
- **Liveness** (``Heartbeat``): a dead peer closes its connections and collectives fail at once,
  but a silent one (a hung node, a network partition) would hold a collective for its whole
  timeout, which must be as long as a round. So every rank bumps a counter in the rendezvous
  store each second; clients watch the server and the server watches every client, and a peer
  whose counter has not moved for ``runtime.peer_timeout_s`` is declared lost: the watching rank
  logs its name and exits, and torchrun restarts or stops the job.
- **Injected faults** (``SPLITFT_FAULT``, tests only): ``POINT@RANK:ROUND[:STEP]`` sends SIGKILL
  (or ``SPLITFT_FAULT_SIGNAL``, e.g. STOP for a silent peer) to that rank at that point, on the
  first attempt only (``TORCHELASTIC_RESTART_COUNT=0``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("splitft")

EXIT_USER_ERROR = 2  # a config, data, model or plan error: relaunching will not help
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR1 (EX_TEMPFAIL): relaunch to continue
EXIT_PEER_LOST = 76  # a peer stopped answering: relaunch to continue

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_GRACE_S = 20.0


class Preempted(Exception):
    """A stop was requested by a signal; the last complete round's checkpoint is kept."""


class StopSignals:
    """Turns SIGTERM/SIGUSR1 into a stop request that the round loop polls (``requested``)."""

    def __init__(self, grace_s: float = STOP_GRACE_S):
        self.grace_s = grace_s
        self.signal: signal.Signals | None = None
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write = write
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        threading.Thread(target=self._watch, name="splitft-signals", daemon=True).start()

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _on_signal(self, signum, frame) -> None:
        # Runs in the main thread whenever it next executes Python; the watcher has usually acted already.
        self._request(signal.Signals(signum))

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in {int(s) for s in STOP_SIGNALS}:
                    self._request(signal.Signals(signum))

    def _request(self, sig: signal.Signals) -> None:
        if self.signal is not None:
            return
        self.signal = sig
        log.warning(
            "%s received: stopping at the next step boundary (the last complete round is kept)", sig.name
        )
        timer = threading.Timer(self.grace_s, self._force_exit)
        timer.daemon = True
        timer.start()

    def _force_exit(self) -> None:
        log.warning("still running %.0fs after %s: exiting now", self.grace_s, self.signal.name)
        logging.shutdown()
        os._exit(EXIT_PREEMPTED)

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)  # ends the watcher thread


class Heartbeat:
    """Liveness through the rendezvous store (torchrun's, at MASTER_ADDR:MASTER_PORT)."""

    def __init__(self, rank: int, world_size: int, token: str, peer_timeout_s: float):
        self.rank, self.peer_timeout_s = rank, peer_timeout_s
        self.interval = min(1.0, peer_timeout_s / 10)
        # A connection of its own: the store client of the process group is not meant to be shared
        # with a thread that polls it while the main thread waits in a collective.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=peer_timeout_s),
        )
        self.store = dist.PrefixStore(f"splitft/heartbeat/{token}/", store)
        self.watched = list(range(1, world_size)) if rank == 0 else [0]
        self.count = 0
        self.store.set(str(rank), "0")
        now = time.monotonic()
        self.last_seen = {r: ("", now) for r in self.watched}
        self._stop = threading.Event()

    def start(self) -> None:
        """Call after every rank has set its first beat (a barrier), so every watched key exists."""
        threading.Thread(target=self._run, name="splitft-heartbeat", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as e:  # the store is gone: its host (torchrun on the first node) died
                self._lost(f"the rendezvous store at {os.environ.get('MASTER_ADDR')} stopped answering ({e})")
            stale = [(r, age) for r, age in self.ages().items() if age > self.peer_timeout_s]
            if stale:
                r, age = stale[0]
                self._lost(f"lost rank {r} ({_name(r)}): no heartbeat for {age:.0f}s")

    def beat(self) -> None:
        """Bumps this rank's counter and reads the watched ranks' counters."""
        self.count += 1
        self.store.set(str(self.rank), str(self.count))
        values = self.store.multi_get([str(r) for r in self.watched])
        now = time.monotonic()
        for r, v in zip(self.watched, values):
            if v != self.last_seen[r][0]:
                self.last_seen[r] = (v, now)

    def ages(self) -> dict[int, float]:
        """Seconds since each watched rank's counter last moved (as seen by this rank)."""
        now = time.monotonic()
        return {r: now - seen for r, (_, seen) in self.last_seen.items()}

    def silent(self, wait_s: float) -> list[int]:
        """Watched ranks whose counter has not moved for ``3 * interval``, waiting up to ``wait_s`` for
        one to show: used after a connection failed, to name the rank that went away."""
        deadline = time.monotonic() + wait_s
        while True:
            quiet = [r for r, age in self.ages().items() if age > 3 * self.interval]
            if quiet or time.monotonic() >= deadline:
                return quiet
            time.sleep(self.interval / 2)

    def _lost(self, why: str) -> None:
        log.error("%s; stopping this rank (torchrun restarts the job if --max-restarts allows)", why)
        logging.shutdown()
        os._exit(EXIT_PEER_LOST)

    def close(self) -> None:
        self._stop.set()


def _name(rank: int) -> str:
    return "server" if rank == 0 else f"client{rank}"


class FaultInjector:
    """``SPLITFT_FAULT=POINT@RANK:ROUND[:STEP]`` sends this rank SIGKILL (or ``SPLITFT_FAULT_SIGNAL``)
    when it reaches that point.

    Points: ``step`` (a client after its STEP-th step of the round; the server when one of its
    replicas has served its STEP-th forward of the round) and ``checkpoint`` (rank 0 between
    writing the adapter and the state of round ROUND's checkpoint). Only the first attempt of a
    torchrun job is hit, so a restarted job runs through.
    """

    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("SPLITFT_FAULT", "") if spec is None else spec
        self.rank, self.round = rank, 0
        self.target: tuple[str, int, int, int | None] | None = None
        if spec and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
            point, where = spec.split("@")
            parts = [int(x) for x in where.split(":")]
            self.target = (point, parts[0], parts[1], parts[2] if len(parts) > 2 else None)

    def hit(self, point: str, step: int | None = None, rnd: int | None = None) -> None:
        """``rnd``: the round the point belongs to, where it is not the one running (the checkpoint
        writer's thread writes a round while the next one trains)."""
        if self.target is None:
            return
        t_point, t_rank, t_round, t_step = self.target
        rnd = self.round if rnd is None else rnd
        if (point, self.rank, rnd) == (t_point, t_rank, t_round) and t_step in (None, step):
            sig = signal.Signals[f"SIG{os.environ.get('SPLITFT_FAULT_SIGNAL', 'KILL')}"]
            verb = "killing" if sig == signal.SIGKILL else f"sending {sig.name} to"
            log.warning(
                "SPLITFT_FAULT: %s rank %d at %s, round %d, step %s", verb, self.rank, point, rnd, step
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), sig)


# Set once per process by runtime.run (the checkpoint writer and the server replicas consult it).
injector = FaultInjector(0, "")
