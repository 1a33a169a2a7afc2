"""Split fine-tuning under torchrun: rank 0 is the server, ranks 1..N are clients.

One node, four clients (the demo)::

    torchrun --nproc_per_node=5 -m launch.train torchrun_configs/demo.yaml

Any config key can be overridden: ``train.rounds=3 split.cut_layers=[1,2,3,2]``.
Two nodes (run on each; Slurm: launch/slurm_multinode.sbatch)::

    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        -m launch.train torchrun_configs/gpt2_wikitext.yaml
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from models.lora import build_layout
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
from runtime.faults import EXIT_USER_ERROR
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


def claim_output_dir(cfg: Config, n_clients: int) -> tuple[outdir.Lock, list[str]]:
    """Rank 0, before it reads the folder and before any process group: takes output_dir's lock (a
    running job's folder is refused, naming it), then checks it. Returns the lock, which this process
    holds until it ends, and what to move aside once every check has passed."""
    held = outdir.lock(cfg.output_dir)
    try:
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
    mcfg = model_config(model_path)
    load_tokenizer(model_path)
    cuts = validate_for_world(cfg, world_size, mcfg.num_hidden_layers)
    build_layout(mcfg, lora_spec(cfg, mcfg), cuts or [])  # unknown lora.targets fail here, on the meta device
    if rank_0:  # after the launch checks: a checkpoint is compared with a config that can run
        check_output_dir(cfg, cfg.n_clients(world_size))
    return model_path


def user_error(kind: str, error: Exception, say: bool) -> SystemExit:
    """One line on stderr (from one rank) and in torchrun's error file, no traceback: relaunching will
    not help, the user has to change something. torchrun's failure summary shows the line where it
    would show a worker's traceback. Under launch.run (SPLITFT_FRONT_DOOR set) no rank prints it: the
    front door prints the first failed rank's error file, once."""
    message = f"{kind} error: {error}"
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

    try:
        run(cfg, data)
    except PlanError as e:  # every rank gets the planner's verdict: say it once
        raise user_error("plan", e, rank == 0) from None
    except Diverged as e:  # every rank stops on the same round with the same message
        raise user_error("training", e, rank == 0) from None
    except CheckpointMismatch as e:
        raise user_error("checkpoint", e, rank == 0) from None
    except ConfigError as e:  # a placement the cluster cannot take (runtime.aggregation_backend=nccl)
        raise user_error("config", e, rank == 0) from None


if __name__ == "__main__":
    main()
