"""The unsplit reference run in one process (no torchrun): the papers' "no cut" baseline.

    python -m launch.train_local torchrun_configs/tiny_cpu.yaml output_dir=runs/demo_local

Same config file and overrides as ``launch.train``; ``split.*`` is ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path

from launch.train import parse
from runtime import checkpoint
from runtime.config import ConfigError
from runtime.job import client_data, model_config, resolve_model_path
from runtime.logs import setup_logging


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
        if checkpoint.rounds(Path(cfg.output_dir) / "checkpoint"):
            raise ConfigError(
                f"output_dir={cfg.output_dir!r} holds a split run's checkpoint: the unsplit run would "
                "overwrite its metrics; choose another output_dir"
            )
        model_path = resolve_model_path(cfg)
        model_config(model_path)
        data = client_data(cfg, model_path, 0, 1)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from runtime.local import run_local

    setup_logging(0)
    run_local(cfg, data)


if __name__ == "__main__":
    main()
