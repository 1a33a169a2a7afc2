"""The output folder a run owns: its lock, what results it holds, moving them aside, reading its metrics.

Lock. ``OUTPUT_DIR/.splitft.lock`` is ``flock``-ed (exclusive, non-blocking) by the process that
writes the folder (rank 0 of ``launch.train``, ``launch.train_local``) on a file descriptor it keeps
open for its whole life, before it reads anything there. The file says who holds it (host, pid,
Slurm job, start time, command), so a second launch into the folder is refused naming the running
job. The kernel releases the lock when the process dies, however it dies: a restarted rank 0
(``torchrun --max-restarts``) takes it again. The file stays; an unlocked one means nothing. On a
file system without ``flock`` (ENOLCK, EOPNOTSUPP) the run warns once and goes on unlocked.

Results. :func:`results` names what a run that starts afresh would overwrite (metrics rows, the
adapter, the side files, checkpoints); :func:`move_aside` moves them into ``previous-<time>/``
(``runtime.overwrite=true``): nothing is ever deleted.

Reading. :func:`read_metrics` reads ``metrics.jsonl`` while a run may be writing it: a half-written
last line is skipped with a warning. ``adapter/splitft.json`` says which round the exported adapter
holds (:func:`adapter_round`).

No torch here: the front door and the readers import it before anything heavy.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("splitft")

LOCK_NAME = ".splitft.lock"
ADAPTER_INFO = "splitft.json"  # in adapter/: {"round": N}
PREVIOUS = "previous-"
# What a run writes in its output_dir (runtime/server_role.py, runtime/local.py, launch.report), in the
# order they are named. checkpoint/ counts only when it holds round folders.
RESULTS = (
    "metrics.jsonl",
    "adapter",
    "checkpoint",
    "selection.json",
    "baseline.json",
    "profiles.json",
    "run_config.json",
    "report",
    "debug",
    "tensorboard",
)
# Written before round 1 ends: alone (with an empty metrics.jsonl) they hold no trained round.
START_UP = ("baseline.json", "profiles.json", "run_config.json")
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_warned_no_flock: set[str] = set()


class OutputDirError(ValueError):
    """The output folder is in use by another job or holds results this launch would overwrite."""


@dataclass
class Lock:
    """This process's hold on an output folder (``fd`` None where the file system has no flock)."""

    folder: Path
    fd: int | None
    previous: dict = field(default_factory=dict)  # what the file said before this process took it
    info: dict = field(default_factory=dict)
    created: list[Path] = field(default_factory=list)  # folders made to hold the lock file

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def checked(self) -> None:
        """Records that every check passed: from now on the folder's contents are this job's."""
        self.info["checked"] = True
        _write_info(self, self.info)

    def release(self, undo: bool = False) -> None:
        """Lets the folder go. ``undo`` (the launch was refused): removes the lock file and the folders
        made for it, so a refused launch leaves nothing behind."""
        _HELD.pop(str(self.folder), None)
        if undo:
            try:
                self.path.unlink()  # before the unlock: a waiter that opened this file tries again
            except OSError:
                pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if undo:
            for folder in reversed(self.created):
                try:
                    folder.rmdir()
                except OSError:
                    break


_HELD: dict[str, Lock] = {}


def job_id() -> dict:
    """What a torchrun attempt shares with the job's other attempts: the agent (its host, its pid: the
    workers' parent) and the run id. Empty outside torchrun."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return {}
    return {
        "host": socket.gethostname(),
        "agent_pid": os.getppid(),
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
    }


def previous_attempt_of_this_job(lock: Lock) -> bool:
    """The last holder was an earlier attempt of this torchrun job that passed its checks: what the
    folder holds beyond a checkpoint is this job's own (a round written before its checkpoint)."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    job = job_id()
    return bool(restarts > 0 and job and lock.previous.get("job") == job and lock.previous.get("checked"))


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode(errors="replace")
        info = json.loads(text) if text.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_info(lock: Lock, info: dict) -> None:
    data = (json.dumps(info) + "\n").encode()
    try:
        if lock.fd is not None:
            os.ftruncate(lock.fd, 0)
            os.pwrite(lock.fd, data, 0)
        else:
            lock.path.write_bytes(data)
    except OSError as e:
        log.warning(
            "cannot write %s (%s): a second launch will not be told who holds the folder", lock.path, e
        )


def describe(info: dict) -> str:
    """The holder, for a message: ``host h, pid 12, Slurm job 34, since 2024-05-01 12:00:00: python ...``."""
    if not info:
        return "its details are not written yet"
    parts = [f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}"]
    if info.get("slurm_job_id"):
        parts.append(f"Slurm job {info['slurm_job_id']}")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    text = ", ".join(parts)
    return f"{text}: {info['command']}" if info.get("command") else text


def _busy(folder: Path, info: dict) -> OutputDirError:
    return OutputDirError(
        f"output_dir={str(folder)!r} is in use by a running job ({describe(info)}): wait for it to end "
        "or stop it, or choose another output_dir"
    )


def _no_flock(path: Path, e: OSError) -> None:
    if str(path) not in _warned_no_flock:
        _warned_no_flock.add(str(path))
        log.warning(
            "cannot lock %s (%s): this file system has no flock, so a second launch into this output_dir "
            "is not refused; going on",
            path,
            e.strerror or e,
        )


def lock(folder: str | Path) -> Lock:
    """Takes ``folder``'s lock for this process's life (the folder is made if needed), or raises
    OutputDirError naming the job that holds it."""
    folder = Path(folder)
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    created.reverse()
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            for made in reversed(created):
                try:
                    made.rmdir()
                except OSError:
                    break
            raise _busy(folder, info) from None
        except OSError as e:
            if e.errno not in NO_FLOCK:
                os.close(fd)
                raise
            _no_flock(path, e)
            held = Lock(folder, None, _read_info(fd), created=created)
            os.close(fd)
            break
        try:  # the file this fd locks must still be the one at the path (a refused launch removes it)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            held = Lock(folder, fd, _read_info(fd), created=created)
            break
        os.close(fd)
    held.info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv])[:500],
        "job": job_id(),
        "checked": False,
    }
    _write_info(held, held.info)
    _HELD[str(folder)] = held
    return held


def probe(folder: str | Path) -> None:
    """Raises OutputDirError if a running job holds ``folder``'s lock; takes nothing, writes nothing."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(Path(folder), _read_info(fd)) from None
    except OSError as e:
        if e.errno not in NO_FLOCK:
            raise
        _no_flock(path, e)
    finally:
        os.close(fd)  # closing releases a lock taken here


def release(folder: str | Path) -> None:
    """Lets go of ``folder``'s lock if this process holds it (tests; a process that ends lets go anyway)."""
    held = _HELD.get(str(Path(folder)))
    if held is not None:
        held.release()


# ---------------------------------------------------------------------------------------- results
def _has_rounds(checkpoint_dir: Path) -> bool:
    return checkpoint_dir.is_dir() and any(
        p.is_dir() and p.name.startswith("round-") for p in checkpoint_dir.iterdir()
    )


def present(folder: str | Path, checkpoint: bool = True) -> list[str]:
    """What of a run's results ``folder`` holds (folders with a trailing /); ``checkpoint``: whether
    checkpoint/ counts (when it holds round folders)."""
    folder = Path(folder)
    names = []
    for name in RESULTS:
        p = folder / name
        if not p.exists() or (name == "checkpoint" and (not checkpoint or not _has_rounds(p))):
            continue
        names.append(f"{name}/" if p.is_dir() else name)
    return names


def results(folder: str | Path, started_here: bool) -> list[str]:
    """The results in ``folder`` that a run starting afresh would overwrite, or [] if there are none
    worth keeping: ``started_here`` says the start-up files are this run's own (its settings), so with
    no round recorded (no metrics row, no adapter, no round folder) they are only a start that never
    finished a round, which this one makes again."""
    folder = Path(folder)
    names = present(folder)
    rows = "metrics.jsonl" in names and read_metrics(folder / "metrics.jsonl", quiet=True)
    rounds = rows or any(n not in (*START_UP, "metrics.jsonl") for n in names)
    return names if rounds or not started_here else []


def move_aside(folder: str | Path, names: list[str]) -> Path:
    """Moves ``names`` (from :func:`present`) into a new ``folder/previous-<time>/``; returns it."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = folder / f"{PREVIOUS}{stamp}", 1
    while target.exists():
        n += 1
        target = folder / f"{PREVIOUS}{stamp}-{n}"
    target.mkdir()
    for name in names:
        os.rename(folder / name.rstrip("/"), target / name.rstrip("/"))
    log.warning("runtime.overwrite=true: moved %s of the earlier run to %s", ", ".join(names), target)
    return target


# ---------------------------------------------------------------------------------------- reading
def read_metrics(path: str | Path, quiet: bool = False) -> list[dict]:
    """The records of a ``metrics.jsonl``. A last line that is not complete JSON (a run writing it, or
    killed while writing it) is skipped with a warning; a bad line before the last raises ValueError
    naming it."""
    path = Path(path)
    lines = path.read_text(errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except ValueError as e:
            if k == len(numbered) - 1:
                if not quiet:
                    log.warning(
                        "%s: line %d is not complete (a run writing it, or killed while writing it): skipped",
                        path,
                        i,
                    )
                break
            raise ValueError(f"{path}:{i}: not a JSON record ({e})") from None
        records.append(record)
    return records


def write_adapter_info(adapter_dir: str | Path, rnd: int | None) -> None:
    """``adapter/splitft.json``: the round the adapter holds (PEFT ignores the file)."""
    (Path(adapter_dir) / ADAPTER_INFO).write_text(json.dumps({"round": rnd}) + "\n")


def adapter_round(adapter_dir: str | Path) -> int | None:
    """The round ``adapter/`` holds (``splitft.json``), or None where it does not say."""
    try:
        rnd = json.loads((Path(adapter_dir) / ADAPTER_INFO).read_text()).get("round")
    except (OSError, ValueError, AttributeError):
        return None
    return rnd if isinstance(rnd, int) else None
