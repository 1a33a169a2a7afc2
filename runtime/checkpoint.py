"""Round checkpoints (what resuming needs) and the exported PEFT adapter.

A checkpoint is one directory per completed round, ``checkpoint/round-000007/``, holding

- ``global_adapter.safetensors``: the aggregated adapter every holder loaded after the round;
- ``merged_weights.safetensors`` (``train.aggregation=stack`` only): the merged weight of every
  adapted module, i.e. the frozen base plus every round's exact delta so far;
- ``state.json``: the round, elapsed time, the run's fingerprint, the plan in force during the round
  and the plan after any move decided at its end, the scheduler's state, each client's data
  position, and the metrics records so far.

It is written whole under a temporary name (``.round-000007.tmp``), every file and the directory
are fsynced, and only then is it renamed into place, so a directory named ``round-*`` is always
complete: a kill at any instant leaves the newest complete one (or the previous one) loadable.
The newest ``runtime.keep_checkpoints`` are kept. Nothing in a checkpoint is ever replaced in
place.

Rank 0 writes each round's checkpoint, and the exported adapter, on a thread of its own
(:class:`Saver`) while the next round trains, so no rank waits for the disk: fsync on a cluster's
shared file system, or ``stack``'s merged weights of a large model, can take seconds. The round's
state is serialized, and the adapter copied, before the next round starts. A run that stops
(finished, preempted, failed) waits for the write in flight first, so the last complete round is on
disk; a rank killed during a write leaves the round before it as the newest complete one, and a
relaunch repeats the round whose write was cut off.

Optimizers restart every round and the data order and random streams are functions of (seed,
client, round), so the adapter plus the plan reproduce the state at the start of the next round
exactly; a move decided at the end of the round is replayed on resume by the same code that made
it live.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models.lora import peft_adapter, write_peft_adapter
from runtime import faults, outdir

log = logging.getLogger("splitft")

ADAPTER_FILE = "global_adapter.safetensors"
MERGED_FILE = "merged_weights.safetensors"
STATE_FILE = "state.json"
PREFIX = "round-"
ROUND_NAME = re.compile(r"round-\d{6,}")
_WARNED: set[tuple[Path, tuple[str, ...]]] = set()  # stray entries already named, once per process


class CheckpointMismatch(ValueError):
    """The checkpoint was written by a run with other settings; the message names the field."""


def round_dir(root: Path, rnd: int) -> Path:
    return root / f"{PREFIX}{rnd:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    root: Path,
    rnd: int,
    flat: torch.Tensor,
    state: dict,
    keep: int,
    merged: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes round ``rnd``'s checkpoint atomically and prunes all but the newest ``keep``."""
    return _write(root, rnd, flat, json.dumps(state, indent=1), keep, merged)


def _write(
    root: Path,
    rnd: int,
    flat: torch.Tensor,
    state_text: str,
    keep: int,
    merged: dict[str, torch.Tensor] | None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = round_dir(root, rnd)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():  # left by a run killed while writing
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({"flat": flat.detach().cpu().contiguous()}, str(tmp / ADAPTER_FILE))
    files = [ADAPTER_FILE, STATE_FILE]
    if merged is not None:
        save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp / MERGED_FILE))
        files.append(MERGED_FILE)
    faults.injector.hit("checkpoint", rnd=rnd)
    (tmp / STATE_FILE).write_text(state_text)
    for f in files:
        _fsync(tmp / f)
    _fsync(tmp)
    if final.exists():  # this round was checkpointed by an attempt that died before finishing the next
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    _prune(root, rnd, keep)
    return final


def _prune(root: Path, newest: int, keep: int) -> None:
    """Deletes all but the ``keep`` newest readable rounds up to ``newest`` (the one just written). A round
    that cannot be read is never counted as kept, nor deleted: it is not this run's to judge."""
    readable = [p for p in rounds(root) if round_of(p) <= newest and _readable(p)]
    for old in readable[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _readable(path: Path) -> bool:
    try:
        json.loads((path / STATE_FILE).read_text())
        with safe_open(str(path / ADAPTER_FILE), "pt") as f:
            return "flat" in f.keys()
    except (OSError, ValueError, SafetensorError):
        return False


class Saver:
    """Writes round checkpoints (and the exported adapter) on a thread of its own, one at a time.

    ``submit`` takes the round's snapshot on the caller's thread: the state serialized, the adapter
    copied and, through ``export`` (from :func:`prepare_export`), the PEFT tensors made. It waits for
    the write before it and starts this one. ``wait`` waits for the write in flight. A failed write (a
    full disk, a removed folder) is raised by the next ``submit`` or ``wait``, naming its round:
    nothing is lost silently. The writing thread runs no tensor op, so it never starts an OpenMP team
    beside the server's compute threads (``runtime.compute``).
    """

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._round = 0

    def submit(
        self,
        rnd: int,
        flat: torch.Tensor,
        state: dict,
        merged: dict[str, torch.Tensor] | None = None,
        export: Callable[[], None] | None = None,
    ) -> None:
        """Round ``rnd``'s checkpoint; ``export()`` runs first. ``merged`` must be the caller's own copies."""
        text = json.dumps(state, indent=1)
        flat = flat.detach().to("cpu", copy=True).contiguous()
        merged = None if merged is None else {k: v.contiguous() for k, v in merged.items()}
        self.wait()
        self._round = rnd
        self._thread = threading.Thread(
            target=self._run, args=(rnd, flat, text, merged, export), name="splitft-checkpoint", daemon=True
        )
        self._thread.start()

    def _run(self, rnd, flat, text, merged, export) -> None:
        try:
            if export is not None:
                export()
            _write(self.root, rnd, flat, text, self.keep, merged)
        except BaseException as e:  # raised on the caller's thread by the next submit or wait
            self._error = e

    def wait(self) -> None:
        """Returns once no write is in flight; raises the error of a write that failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(
                f"writing the checkpoint of round {self._round} under {str(self.root)!r} failed ({error}); "
                "the rounds before it are kept: free space or fix the folder's permissions and launch "
                "again to continue from them"
            ) from error


def round_of(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def rounds(root: Path) -> list[Path]:
    """The complete round directories under ``root``, oldest first. Anything else there (a file, a folder
    not named ``round-NNNNNN``) is not a checkpoint: it is named in a warning and left alone; the
    temporary folders of writes in progress (``.round-*.tmp``) are passed over in silence."""
    if not root.is_dir():
        return []
    found, stray = [], []
    for p in root.iterdir():
        if p.is_dir() and ROUND_NAME.fullmatch(p.name):
            found.append(p)
        elif not (p.name.startswith(".") and p.name.endswith(".tmp")):
            stray.append(p.name)
    if stray and (root, tuple(sorted(stray))) not in _WARNED:
        _WARNED.add((root, tuple(sorted(stray))))
        log.warning(
            "%s holds %s, which %s not a round checkpoint: ignored (checkpoints are round-NNNNNN folders)",
            root,
            ", ".join(sorted(stray)),
            "is" if len(stray) == 1 else "are",
        )
    return sorted(found, key=round_of)


def latest(root: Path, adapter: bool = True) -> tuple[dict, torch.Tensor | None] | None:
    """(state, flat adapter) of the newest readable round checkpoint, or None if there is none.

    A directory that cannot be read (a disk error, a file removed by hand) is reported and skipped
    in favour of the one before it. ``adapter=False`` reads only the adapter's header (the check
    before launch), so the choice of checkpoint is the same without loading the tensor.
    """
    for path in reversed(rounds(root)):
        try:
            state = json.loads((path / STATE_FILE).read_text())
            if adapter:
                flat = load_file(str(path / ADAPTER_FILE))["flat"]
            else:
                with safe_open(str(path / ADAPTER_FILE), "pt") as f:
                    if "flat" not in f.keys():
                        raise KeyError("flat")
                flat = None
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            log.warning("checkpoint %s is unreadable (%s); trying the one before it", path, e)
            continue
        return state, flat
    return None


def merged_weights(root: Path, rnd: int) -> dict[str, torch.Tensor]:
    """The merged weights (``stack``) of round ``rnd``'s checkpoint."""
    path = round_dir(root, rnd) / MERGED_FILE
    if not path.is_file():
        raise CheckpointMismatch(f"{str(path)!r} is missing: the checkpoint was not written by a stack run")
    return load_file(str(path))


def check_fingerprint(root: Path, state: dict, expect: dict) -> None:
    """Raises CheckpointMismatch naming the first setting that differs between the checkpoint and this run."""
    saved = state.get("fingerprint", {})
    for key in sorted(set(saved) | set(expect)):
        if saved.get(key) != expect.get(key):
            raise CheckpointMismatch(
                f"the checkpoint in {str(root)!r} was written with {key}={saved.get(key)!r} but this run has "
                f"{key}={expect.get(key)!r}: restore that setting to continue it, or choose a new "
                "output_dir to start over"
            )


def export_adapter(
    out: Path,
    layout,
    flat: torch.Tensor,
    spec,
    model_config,
    model_path: Path,
    selection: dict | None = None,
    rnd: int | None = None,
) -> None:
    """Writes ``out/adapter`` (PEFT format) via a temporary folder, so a crash keeps the last one.

    With an importance selection, ``selection.json`` beside it gives every weight's score and rank.
    ``adapter/splitft.json`` says which round it holds: ``rnd``, by default metrics.jsonl's last record
    (the callers write the round's line just before)."""
    prepare_export(out, layout, flat, spec, model_config, model_path, selection, rnd)()


def prepare_export(
    out: Path,
    layout,
    flat: torch.Tensor,
    spec,
    model_config,
    model_path: Path,
    selection: dict | None = None,
    rnd: int | None = None,
) -> Callable[[], None]:
    """:func:`export_adapter` in two parts: the adapter's tensors are copied (and the round read) now,
    and the function returned writes them (no tensor op: it can run on any thread)."""
    cfg, tensors = peft_adapter(layout, flat.cpu(), spec, model_config, str(Path(model_path).resolve()))
    if rnd is None:
        metrics = out / "metrics.jsonl"
        records = outdir.read_metrics(metrics, quiet=True) if metrics.is_file() else []
        rnd = records[-1].get("round") if records else None

    def write() -> None:
        tmp = out / "adapter.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        write_peft_adapter(cfg, tensors, tmp)
        outdir.write_adapter_info(tmp, rnd)
        if selection is not None:
            (tmp / "selection.json").write_text(json.dumps(selection, indent=1))
        replace_dir(tmp, out / "adapter")

    return write


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves a fully written folder into place, keeping the old one until the new one is there."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
