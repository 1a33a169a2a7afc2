"""Split fine-tuning under torchrun: rank 0 is the server, ranks 1..N are clients.

One node, four clients (the demo)::

    torchrun --nproc_per_node=5 -m launch.train torchrun_configs/tiny_cpu.yaml

Any config key can be overridden: ``train.rounds=3 split.cut_layers=[1,2,3,2]``.
Two nodes (run on each; Slurm: launch/slurm_multinode.sbatch)::

    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        -m launch.train torchrun_configs/gpt2_wikitext.yaml
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from models.lora import build_layout
from runtime.config import Config, ConfigError, load_config, validate_for_world
from runtime.job import client_data, lora_spec, model_config, resolve_model_path


def parse(argv: list[str]) -> Config:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    path, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    return load_config(path, overrides)


def check_output_dir(cfg: Config) -> None:
    """Refuses to start over a finished or interrupted run: its checkpoint would be overwritten."""
    state = Path(cfg.output_dir) / "checkpoint" / "state.json"
    if state.is_file() and not cfg.runtime.resume:
        raise ConfigError(
            f"output_dir={cfg.output_dir!r} holds a checkpoint of an earlier run: set runtime.resume=true to "
            "continue it, or choose another output_dir (or delete that one) to start over"
        )


def check(cfg: Config, world_size: int) -> Path:
    """What every rank can check before a process group exists: config, output_dir, model, LoRA targets.

    Returns the model folder (``builtin:tiny`` built if needed).
    """
    check_output_dir(cfg)
    model_path = resolve_model_path(cfg)
    mcfg = model_config(model_path)
    cuts = validate_for_world(cfg, world_size, mcfg.num_hidden_layers)
    build_layout(mcfg, lora_spec(cfg, mcfg), cuts or [])  # unknown lora.targets fail here, on the meta device
    return model_path


def main(argv: list[str] | None = None) -> None:
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
        model_path = check(cfg, world_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if rank == 0:  # every rank sees the same error: say it once
            print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    data = None
    if rank > 0:
        # Only clients read data (the server never needs the files); reading and partitioning it
        # before the process group starts makes a bad line stop the run at once.
        try:
            data = client_data(cfg, model_path, rank - 1, world_size - 1)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            if rank == 1:  # clients read the same files and compute the same partition
                print(f"data error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    from partition.planner import PlanError
    from runtime.split import run

    try:
        run(cfg, data)
    except PlanError as e:  # every rank gets the planner's verdict: say it once
        if rank == 0:
            print(f"plan error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
