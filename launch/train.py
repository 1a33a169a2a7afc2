"""Split fine-tuning under torchrun: rank 0 is the server, ranks 1..N are clients.

One node, four clients (the demo)::

    torchrun --nproc_per_node=5 -m launch.train torchrun_configs/demo.yaml

Any config key can be overridden: ``train.rounds=3 split.cut_layers=[1,2,3,2]``.
Two nodes (run on each; Slurm: launch/slurm_multinode.sbatch)::

    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        -m launch.train torchrun_configs/gpt2_wikitext.yaml
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from models.lora import build_layout
from models.stages import checkpoint_mismatches
from runtime import checkpoint, outdir
from runtime.config import (
    Config,
    ConfigError,
    check_clients,
    check_world_size,
    config_from_dict,
    fingerprint,
    load_config,
    validate_for_world,
)
from runtime.faults import EXIT_USER_ERROR, Unrecoverable
from runtime.job import load_tokenizer, lora_spec, model_config, resolve_model_path, worker_data

# What a bad config, model folder or data file raises while it is checked (launch.run checks with these too).
INPUT_ERRORS = (ConfigError, FileNotFoundError, ValueError)  # outdir.OutputDirError is a ValueError


def parse(argv: list[str]) -> Config:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    path, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    return load_config(path, overrides)


def check_output_dir(cfg: Config, n_clients: int, lock: outdir.Lock | None = None) -> list[str]:
    """Checks ``runtime.resume`` and ``runtime.overwrite`` against what output_dir holds (rank 0 reads
    it again when it resumes); returns what a fresh start moves aside first ([]: nothing). Reads only.

    false refuses a checkpointed output_dir (it would be overwritten); true needs a checkpoint; a
    checkpoint that auto or true would continue must come from a run with the same settings. A fresh
    start refuses a folder that holds another run's results. ``runtime.overwrite=true`` turns each
    refusal of a fresh start into moving the old results aside. ``lock``: this process's hold on the
    folder; the files of an earlier attempt of the same torchrun job are not another run's.
    """
    out = Path(cfg.output_dir)
    root = out / "checkpoint"
    overwrite = cfg.runtime.overwrite
    found = checkpoint.latest(root, adapter=False)
    if found is not None:
        if cfg.resume == "false":
            if overwrite:
                return outdir.present(out)
            raise ConfigError(
                f"output_dir={cfg.output_dir!r} holds a checkpoint of an earlier run (round "
                f"{found[0]['round']}) and runtime.resume=false: set runtime.resume=auto to continue it, "
                "runtime.overwrite=true to start over in this folder (the old results are moved to "
                "previous-<time>/), or choose another output_dir"
            )
        try:
            checkpoint.check_fingerprint(root, found[0], fingerprint(cfg, n_clients))
        except checkpoint.CheckpointMismatch as e:
            if overwrite:
                return outdir.present(out)
            raise checkpoint.CheckpointMismatch(
                f"{e} (or set runtime.overwrite=true to move the old results to previous-<time>/ and start "
                "over in it)"
            ) from None
        return []  # resumed: what is there is this run's
    if cfg.resume == "true":
        raise ConfigError(
            f"runtime.resume=true but {str(root)!r} holds no complete checkpoint: check output_dir, or "
            "use runtime.resume=auto to start when there is none"
        )
    if lock is not None and outdir.previous_attempt_of_this_job(lock):
        return []  # what it wrote before its first checkpoint is this job's, made again
    there = outdir.results(out, started_here=_same_settings(out / "run_config.json", cfg, n_clients))
    if there and not overwrite:
        raise outdir.OutputDirError(
            f"output_dir={cfg.output_dir!r} holds results of another run ({', '.join(there)}) and no "
            "checkpoint this run can resume: choose another output_dir, or set runtime.overwrite=true to "
            "move them to previous-<time>/ there and start over (nothing was changed)"
        )
    return there


def _same_settings(saved: Path, cfg: Config, n_clients: int) -> bool:
    """Whether ``run_config.json`` is absent or was written with this run's settings (its fingerprint)."""
    if not saved.exists():
        return True
    try:
        return fingerprint(config_from_dict(json.loads(saved.read_text())), n_clients) == fingerprint(
            cfg, n_clients
        )
    except (ConfigError, ValueError, OSError, TypeError, AttributeError):
        return False


FAILED = ".splitft-failed.json"
"""In output_dir: the one line of a failure that a restart would repeat, the torchrun job it belongs
to and the settings it failed with. Read by rank 0 of the job's next attempt (``failed_before``)."""


def _settings_digest(cfg: Config, n_clients: int) -> str:
    return hashlib.sha256(
        json.dumps(fingerprint(cfg, n_clients), sort_keys=True, default=str).encode()
    ).hexdigest()


def record_failure(cfg: Config, n_clients: int, line: str) -> None:
    """Leaves ``line`` for the job's next attempt, which then stops at once with it instead of running
    into the same failure (``torchrun --max-restarts`` restarts any failed attempt). The job is the
    folder owner's (rank 0's, from the lock file): a client on another host of a shared folder writes
    its owner's. Where output_dir is not on this host, there is nothing to write: that attempt is
    retried as before."""
    folder = Path(cfg.output_dir)
    if not folder.is_dir():
        return
    try:
        owner = json.loads((folder / outdir.LOCK_NAME).read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        owner = None
    marker = {"line": line, "job": owner or outdir.job_id(), "settings": _settings_digest(cfg, n_clients)}
    tmp = folder / f"{FAILED}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(marker) + "\n")
        os.replace(tmp, folder / FAILED)
    except OSError:  # a full disk may be why it failed: the line is still said and in the error file
        tmp.unlink(missing_ok=True)


def failed_before(cfg: Config, n_clients: int) -> str | None:
    """Rank 0 under the folder's lock: the line of the failure an earlier attempt of this torchrun job
    recorded with these settings, or None. Any other marker (another launch: a new torchrun agent, or
    other settings, e.g. the fixed config) is removed: a deliberate relaunch is never refused."""
    path = Path(cfg.output_dir) / FAILED
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        marker = {}
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    job = outdir.job_id()
    if isinstance(marker, dict) and restarted and job and marker.get("job") == job:
        if marker.get("settings") == _settings_digest(cfg, n_clients) and marker.get("line"):
            return str(marker["line"])
    path.unlink(missing_ok=True)
    return None


def claim_output_dir(cfg: Config, n_clients: int) -> tuple[outdir.Lock, list[str]]:
    """Rank 0, before it reads the folder and before any process group: takes output_dir's lock (a
    running job's folder is refused, naming it), stops at once where an earlier attempt of this job
    failed in a way a restart repeats (``failed_before``), then checks it. Returns the lock, which this
    process holds until it ends, and what to move aside once every check has passed."""
    held = outdir.lock(cfg.output_dir)
    try:
        line = failed_before(cfg, n_clients)
        if line is not None:
            raise Repeated(line)
        return held, check_output_dir(cfg, n_clients, held)
    except BaseException:
        held.release(undo=True)  # a refused launch leaves the folder as it was
        raise


def check_device(cfg: Config) -> None:
    """``runtime.device=cuda`` needs a GPU this process can use (auto falls back to CPU by itself)."""
    import torch

    if cfg.runtime.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "runtime.device=cuda but this machine has no usable CUDA device (torch.cuda.is_available() is "
            "False): use runtime.device=cpu, or auto (CUDA where every rank has a GPU, else CPU)"
        )


def check_weights(model_path: Path) -> None:
    """Every weights file the model folder names opens and is whole (its safetensors header agrees
    with the file's size): a truncated or damaged file is named here, before any process group,
    rather than by the rank that would read its layers mid-start-up. Reads the headers only."""
    from safetensors import safe_open

    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(
                f"model.path={str(model_path)!r}: model.safetensors.index.json is damaged "
                f"({type(e).__name__}: {e}); save the model again with save_pretrained"
            ) from None
    elif (model_path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return  # no weights at all: model_config names what to do
    for name in files:
        path = model_path / name
        if not path.is_file():
            raise ConfigError(
                f"model.path={str(model_path)!r}: {name}, named by model.safetensors.index.json, is missing; "
                "copy the whole folder again or save the model again with save_pretrained"
            )
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as e:  # safetensors' own error type: a truncated file, a header that is not JSON
            raise ConfigError(
                f"model.path={str(model_path)!r}: {name} is damaged ({' '.join(str(e).split())[:200]}); "
                "it was probably cut short while copied or downloaded: copy it again"
            ) from None


LEARNED_POSITIONS = ("gpt2", "gpt_neo", "opt")
"""Families whose positions are an embedding table: a longer sequence indexes past it (rotary ones
only extrapolate)."""


def check_model_agrees(cfg: Config, model_path: Path, mcfg, tokenizer) -> None:
    """The model folder's files agree with each other, and the data fit the model: the weights have the
    shapes config.json implies, the tokenizer's ids fit the embedding, and a sequence fits a learned
    position table. Reads the weights' headers only."""
    where = f"model.path={str(model_path)!r}"
    found = checkpoint_mismatches(model_path)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ConfigError(
            f"{where}: the weights do not match config.json: {found[0]}{more}; use the config.json saved "
            "with these weights (save_pretrained writes both)"
        )
    vocab = getattr(mcfg, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab} "
            f"rows, so ids from {vocab} up would index past it; use the tokenizer saved with this model"
        )
    limit = getattr(mcfg, "max_position_embeddings", None)
    if mcfg.model_type in LEARNED_POSITIONS and limit is not None and cfg.data.max_seq_len > limit:
        raise ConfigError(
            f"data.max_seq_len={cfg.data.max_seq_len} is longer than the {limit} positions the model has "
            f"learned ({where}); set data.max_seq_len={limit} or less"
        )


def check(cfg: Config, world_size: int, output_dir: bool | None = None) -> Path:
    """What every rank can check before a process group exists: config, output_dir, device, model (a
    supported causal LM with weights and a tokenizer), LoRA targets.

    ``output_dir``: whether to check it (default: on rank 0 only, which reads and writes it; ``main``'s
    rank 0 checks it under the folder's lock instead).
    Returns the model folder (``builtin:tiny`` built if needed).
    """
    check_world_size(world_size)
    rank_0 = int(os.environ.get("RANK", "0")) == 0 if output_dir is None else output_dir
    if rank_0:
        outdir.probe(cfg.output_dir)  # a running job's folder (takes nothing: see launch.run)
    check_device(cfg)
    model_path = resolve_model_path(cfg)
    check_weights(model_path)
    mcfg = model_config(model_path)
    check_model_agrees(cfg, model_path, mcfg, load_tokenizer(model_path))
    cuts = validate_for_world(cfg, world_size, mcfg.num_hidden_layers)
    build_layout(mcfg, lora_spec(cfg, mcfg), cuts or [])  # unknown lora.targets fail here, on the meta device
    if rank_0:  # after the launch checks: a checkpoint is compared with a config that can run
        check_output_dir(cfg, cfg.n_clients(world_size))
    return model_path


class Repeated(Exception):
    """An earlier attempt of this torchrun job failed in a way this one would repeat: its line, as is."""


def user_error(kind: str, error: Exception, say: bool) -> SystemExit:
    """One line on stderr (from one rank) and in torchrun's error file, no traceback: relaunching will
    not help, the user has to change something. torchrun's failure summary shows the line where it
    would show a worker's traceback. Under launch.run (SPLITFT_FRONT_DOOR set) no rank prints it: the
    front door prints the first failed rank's error file, once."""
    message = (
        f"{error} (an earlier attempt of this torchrun job stopped so: not run again)"
        if isinstance(error, Repeated)
        else f"{kind} error: {error}"
    )
    if say and not os.environ.get("SPLITFT_FRONT_DOOR"):
        print(message, file=sys.stderr)
    # Every rank has the same error and puts it in its error file: torchrun's summary shows the first
    # rank to fail, and torchrun stops the others at once, so the rank that says it may not get the
    # chance (a rank with less to check often fails first). The line on stderr is printed once.
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        info = {"py_callstack": message, "timestamp": str(int(time.time()))}
        Path(error_file).write_text(json.dumps({"message": {"message": message, "extraInfo": info}}))
    return SystemExit(EXIT_USER_ERROR)


@record
def main(argv: list[str] | None = None) -> None:
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    held = None
    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
        if rank == 0:  # the folder's owner: its lock first, held for this process's life
            held, aside = claim_output_dir(cfg, check_clients(cfg, world_size))
        try:
            model_path = check(cfg, world_size, output_dir=False)
        except BaseException:
            if held is not None:
                held.release(undo=True)
            raise
    except Repeated as e:  # said once more, and not run again: torchrun's remaining restarts end at once
        raise user_error("", e, rank == 0) from None
    except outdir.OutputDirError as e:
        raise user_error("output_dir", e, rank == 0) from None
    except INPUT_ERRORS as e:
        raise user_error("config", e, rank == 0) from None  # every rank sees the same error: say it once
    if held is not None:  # rank 0's checks passed: the folder is this run's
        if aside:
            outdir.move_aside(cfg.output_dir, aside)
        held.checked()
    data = None
    if rank > 0:
        # Only clients read data (the server never needs the files); reading and partitioning it
        # before the process group starts makes a bad line stop the run at once.
        try:
            data = worker_data(cfg, model_path, rank, world_size)
        except INPUT_ERRORS as e:
            # clients read the same files and compute the same partition: one says it
            raise user_error("data", e, rank == 1) from None
    from partition.planner import PlanError
    from runtime.checkpoint import CheckpointMismatch
    from runtime.messages import Diverged
    from runtime.run import run

    def for_good(kind: str, error: Exception, mine: bool) -> SystemExit:
        """A failure a restart would repeat: said (by ``mine``, the rank that knows) and recorded."""
        if mine:
            record_failure(cfg, check_clients(cfg, world_size), f"{kind} error: {error}")
        return user_error(kind, error, mine)

    try:
        run(cfg, data)
    except PlanError as e:  # every rank gets the planner's verdict: say it once
        raise for_good("plan", e, rank == 0) from None
    except Diverged as e:  # every rank stops on the same round with the same message
        raise for_good("training", e, rank == 0) from None
    except CheckpointMismatch as e:
        raise for_good("checkpoint", e, rank == 0) from None
    except ConfigError as e:  # a placement the cluster cannot take (runtime.aggregation_backend=nccl)
        raise for_good("config", e, rank == 0) from None
    except Unrecoverable as e:  # out of memory, a full disk: only the rank it happened on knows
        raise for_good(e.kind, e, True) from None


if __name__ == "__main__":
    main()
