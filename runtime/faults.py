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
- **Progress** (``Progress``, ``Heartbeat``): a beat only says a process is alive; a rank whose main
  thread is stuck (a deadlock, a blocked read) keeps beating. So the main thread also records what
  it does (its phase, round and step, and every collective it enters and leaves: ``progress``),
  the heartbeat publishes that, and every rank watches every rank's record. When no rank's record
  has moved for ``runtime.stall_timeout_s`` the job is stalled: every rank names the rank furthest
  behind in the protocol (the one that has not reached the collective the others wait in) and where
  it was, and exits with ``EXIT_STALLED``. A job-wide rule, so a rank that is merely waiting for a
  slow peer is never blamed, and a long phase counts as long only while no rank moves.
- **Failures a restart would repeat** (``Unrecoverable``): an out-of-memory or a full disk is named
  with its rank, what that rank holds and the fix, and leaves with ``EXIT_USER_ERROR``;
  ``launch.train`` records it so the job's later attempts stop at once.
- **Injected faults** (``SPLITFT_FAULT``, tests only): ``POINT@RANK:ROUND[:STEP]`` sends SIGKILL
  (or ``SPLITFT_FAULT_SIGNAL``, e.g. STOP for a silent peer) to that rank at that point, on the
  first attempt only (``TORCHELASTIC_RESTART_COUNT=0``); ``hang@RANK:ROUND`` and ``startup@RANK``
  block the rank's main thread instead (its other threads run on).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("splitft")

EXIT_USER_ERROR = 2  # a config, data, model or plan error: relaunching will not help
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR1 (EX_TEMPFAIL): relaunch to continue
EXIT_PEER_LOST = 76  # a peer stopped answering: relaunch to continue
EXIT_STALLED = 77  # no rank made progress for runtime.stall_timeout_s, or a rank never joined: relaunch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_GRACE_S = 20.0


class Preempted(Exception):
    """A stop was requested by a signal; the last complete round's checkpoint is kept."""


class Unrecoverable(Exception):
    """A failure that a restart would only repeat (out of memory, a full disk): said in one line with
    the fix, exit 2, and recorded so that torchrun's next attempts stop at once (``launch.train``)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _chain(error: BaseException) -> list[BaseException]:
    """The error and every error it was raised from or during."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def unrecoverable(error: BaseException, rank: int, place) -> Unrecoverable | None:
    """An out-of-memory (CPU ``MemoryError``, ``torch.OutOfMemoryError``, or either as a peer's error
    over RPC) or a full disk (ENOSPC) anywhere in ``error``'s chain, named with its rank, what that
    rank holds (``place(rank)``: its cut) and the fix; else None."""
    chain = _chain(error)
    for e in chain:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return Unrecoverable(
                "disk",
                f"the disk is full on rank {rank} ({_name(rank)}): {e}; free space there (or lower "
                "runtime.keep_checkpoints) and launch the same command again: every complete round is kept",
            )
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    oom = any(isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" for e in chain)
    if not (oom or "MemoryError" in text or "out of memory" in text.lower()):
        return None
    if not oom and ("name=server" in text or "WorkerInfo(id=0" in text):
        rank = 0  # the server ran out while serving this rank's call
    detail = " ".join(str(chain[0]).split())[:300]
    if rank == 0:
        fix = (
            "raise the cuts (split.cut_layers: the server then holds fewer layers), lower train.batch_size "
            "or data.max_seq_len, or give the server more memory (the job's memory limit, e.g. Slurm --mem)"
        )
    else:
        fix = (
            "lower its cut (split.cut_layers, or split.policy=resource to fit the cuts to each process's "
            "memory), lower train.batch_size or data.max_seq_len, or give the process more memory (the "
            "job's memory limit, e.g. Slurm --mem)"
        )
    return Unrecoverable("memory", f"out of memory on rank {rank} ({place(rank)}): {detail}; {fix}")


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


class Progress:
    """What this rank's main thread is doing: its phase, round and step, and the collective it waits in.

    The main thread writes it (``mark``, ``begin_round``, ``collective``); the heartbeat thread reads a
    ``snapshot`` each beat and publishes it. ``count`` moves with every mark: a rank whose count stands
    still made no progress. Collectives are numbered (``seq``): every rank runs the same sequence of
    them, so the rank with the lowest number, outside a collective, is the one the others wait for.
    """

    def __init__(self) -> None:
        self.count, self.seq, self.round, self.step = 0, 0, 0, 0
        self.phase, self.waiting = "start-up", ""

    def mark(self, phase: str | None = None, step: int | None = None) -> None:
        """Progress: a new phase, a step done (``step``), or any unit of work (neither)."""
        if phase is not None:
            self.phase = phase
        if step is not None:
            self.step = step
        self.count += 1

    def begin_round(self, rnd: int) -> None:
        self.round, self.step = rnd, 0
        self.mark(f"round {rnd}")

    @contextmanager
    def collective(self, name: str):
        """Entering and leaving a collective are both progress; the wait in between is not this rank's."""
        self.seq += 1
        self.waiting = name
        self.count += 1
        try:
            yield
        finally:
            self.waiting = ""
            self.count += 1

    def snapshot(self) -> dict:
        return {
            "n": self.count,
            "phase": self.phase,
            "round": self.round,
            "step": self.step,
            "seq": self.seq,
            "in": self.waiting,
        }


def where(state: dict) -> str:
    """``round 2, training, step 3, outside any collective`` from a published ``Progress.snapshot``."""
    prefix = f"round {state['round']}"
    parts = [prefix] if state["round"] else []
    phase = state["phase"].removeprefix(f"{prefix}: ") if state["round"] else state["phase"]
    if phase != prefix:
        parts.append(phase)
    if state["step"]:
        parts.append(f"step {state['step']}")
    inside = (
        f"waiting in {state['in']} (collective #{state['seq']})" if state["in"] else "outside any collective"
    )
    return ", ".join([*parts, inside])


def behind(states: dict[int, dict]) -> list[int]:
    """The ranks furthest behind in the protocol: the fewest collectives entered, and outside one
    before inside one (a rank that has not reached the collective the others wait in)."""
    key = {r: (s["seq"], 1 if s["in"] else 0) for r, s in states.items()}
    low = min(key.values())
    return [r for r in sorted(key) if key[r] == low]


def stall_message(states: dict[int, dict], quiet_s: float, timeout_s: float) -> str:
    """One line naming the rank(s) furthest behind and where each was; the others' wait, if different."""
    late = behind(states)
    named = "; ".join(f"rank {r} ({_name(r)}) at {where(states[r])}" for r in late)
    others = [r for r in states if r not in late]
    waits = sorted({where(states[r]) for r in others})
    tail = f"; the others wait: {' | '.join(waits)}" if others else ""
    return (
        f"stalled: no rank made progress for {quiet_s:.0f}s (runtime.stall_timeout_s={timeout_s:g}); "
        f"furthest behind: {named}{tail}"
    )


# This process's record (set by the protocol, read by the heartbeat).
progress = Progress()


class Heartbeat:
    """Liveness and progress through the rendezvous store (torchrun's, at MASTER_ADDR:MASTER_PORT)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        token: str,
        peer_timeout_s: float,
        stall_timeout_s: float | None = None,
        record: Progress | None = None,
    ):
        """``stall_timeout_s``: None watches liveness only; ``record``: the progress to publish (this
        process's ``progress`` by default)."""
        self.rank, self.peer_timeout_s, self.stall_timeout_s = rank, peer_timeout_s, stall_timeout_s
        self.progress = record if record is not None else progress
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
        self.ranks = list(range(world_size))
        self.published = -1
        self.publish()
        now = time.monotonic()
        self.last_seen = {r: ("", now) for r in self.watched}
        self.states: dict[int, dict] = {}
        self.moved = {r: ("", now) for r in self.ranks}  # rank -> (its progress record, when it last changed)
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
            stalled = self.stalled()
            if stalled:
                self._exit(stalled, EXIT_STALLED)

    def publish(self) -> None:
        """This rank's progress record, when it changed since the last beat."""
        state = self.progress.snapshot()
        if state["n"] != self.published:
            self.store.set(f"progress/{self.rank}", json.dumps(state))
            self.published = state["n"]

    def beat(self) -> None:
        """Bumps this rank's counter, publishes its progress, reads the watched ranks' counters and every
        rank's progress."""
        self.count += 1
        self.store.set(str(self.rank), str(self.count))
        if self.stall_timeout_s is not None:
            self.publish()
        keys = [str(r) for r in self.watched]
        if self.stall_timeout_s is not None:
            keys += [f"progress/{r}" for r in self.ranks]
        values = self.store.multi_get(keys)
        now = time.monotonic()
        for r, v in zip(self.watched, values):
            if v != self.last_seen[r][0]:
                self.last_seen[r] = (v, now)
        for r, v in zip(self.ranks, values[len(self.watched) :]):
            if v != self.moved[r][0]:
                self.moved[r] = (v, now)
                self.states[r] = json.loads(v)

    def stalled(self) -> str | None:
        """The stall message when no rank's progress has moved for ``stall_timeout_s``, else None."""
        if self.stall_timeout_s is None or len(self.states) < len(self.ranks):
            return None
        quiet = time.monotonic() - max(t for _, t in self.moved.values())
        if quiet <= self.stall_timeout_s:
            return None
        return stall_message(self.states, quiet, self.stall_timeout_s)

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
        self._exit(why, EXIT_PEER_LOST)

    def _exit(self, why: str, code: int) -> None:
        log.error("%s; stopping this rank (torchrun restarts the job if --max-restarts allows)", why)
        logging.shutdown()
        os._exit(code)

    def close(self) -> None:
        self._stop.set()


def _name(rank: int) -> str:
    return "server" if rank == 0 else f"client{rank}"


BLOCKING_POINTS = ("hang", "startup")
EVERY_ATTEMPT = ("oom",)  # a failure that comes back on every attempt, as a real one would


class FaultInjector:
    """``SPLITFT_FAULT=POINT@RANK:ROUND[:STEP]`` sends this rank SIGKILL (or ``SPLITFT_FAULT_SIGNAL``)
    when it reaches that point.

    Points: ``step`` (a client after its STEP-th step of the round; the server when one of its
    replicas has served its STEP-th forward of the round) and ``checkpoint`` (rank 0 between
    writing the adapter and the state of round ROUND's checkpoint). Two points block the main
    thread for good instead, while the process's other threads (the heartbeat) run on: ``hang``
    (``hang@RANK:ROUND``: as round ROUND's training starts, a stuck rank) and ``startup``
    (``startup@RANK``: before the rank joins the attempt's rendezvous, a rank that never arrives).
    Only the first attempt of a torchrun job is hit, so a restarted job runs through; except ``oom``
    (``oom@RANK:ROUND[:STEP]``, at the ``step`` point: raises ``MemoryError``), hit on every attempt.
    """

    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("SPLITFT_FAULT", "") if spec is None else spec
        self.rank, self.round = rank, 0
        self.target: tuple[str, int, int, int | None] | None = None
        first = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        if spec and (first or spec.split("@")[0] in EVERY_ATTEMPT):
            point, where = spec.split("@")
            parts = [int(x) for x in where.split(":")]
            rnd = parts[1] if len(parts) > 1 else 0  # startup@RANK: before round 1
            self.target = (point, parts[0], rnd, parts[2] if len(parts) > 2 else None)

    def hit(self, point: str, step: int | None = None, rnd: int | None = None) -> None:
        """``rnd``: the round the point belongs to, where it is not the one running (the checkpoint
        writer's thread writes a round while the next one trains)."""
        if self.target is None:
            return
        t_point, t_rank, t_round, t_step = self.target
        rnd = self.round if rnd is None else rnd
        if (
            t_point == "oom"
            and point == "step"
            and (self.rank, rnd) == (t_rank, t_round)
            and t_step in (None, step)
        ):
            log.warning(
                "SPLITFT_FAULT: raising MemoryError on rank %d at round %d, step %s", self.rank, rnd, step
            )
            raise MemoryError(f"injected by SPLITFT_FAULT at round {rnd}, step {step}")
        if (point, self.rank, rnd) == (t_point, t_rank, t_round) and t_step in (None, step):
            if point in BLOCKING_POINTS:
                log.warning(
                    "SPLITFT_FAULT: blocking rank %d's main thread at %s, round %d", self.rank, point, rnd
                )
                for handler in logging.getLogger().handlers:
                    handler.flush()
                _block()  # for good under torchrun (it ends the process with its agent)
                return
            sig = signal.Signals[f"SIG{os.environ.get('SPLITFT_FAULT_SIGNAL', 'KILL')}"]
            verb = "killing" if sig == signal.SIGKILL else f"sending {sig.name} to"
            log.warning(
                "SPLITFT_FAULT: %s rank %d at %s, round %d, step %s", verb, self.rank, point, rnd, step
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), sig)


def _block() -> None:
    """Blocks the calling thread for good (the process's other threads run on), but ends the process
    once its parent (the torchrun agent) is gone, so an injected hang never outlives its job."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


# Set once per process by runtime.run (the checkpoint writer and the server replicas consult it).
injector = FaultInjector(0, "")
