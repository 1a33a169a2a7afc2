"""The unsplit reference run in one process (no torchrun): the papers' "no cut" baseline.

    python -m launch.train_local torchrun_configs/tiny_cpu.yaml output_dir=runs/demo_local

Same config file and overrides as ``launch.train``; ``split.*`` is ignored. The output folder is
locked for the run's life and a folder holding another run's results is refused unless
``runtime.overwrite=true`` (``runtime/outdir.py``; docs/recovery.md, "The output folder").
"""

from __future__ import annotations

import sys
from pathlib import Path

from launch.train import parse
from runtime import checkpoint, outdir
from runtime.config import Config, ConfigError
from runtime.job import client_data, model_config, resolve_model_path
from runtime.logs import setup_logging


def check_output_dir(cfg: Config) -> list[str]:
    """What output_dir holds that this run would overwrite (it never resumes): refused, or with
    ``runtime.overwrite=true`` returned, to be moved aside once every check has passed."""
    out = Path(cfg.output_dir)
    if checkpoint.rounds(out / "checkpoint") and not cfg.runtime.overwrite:
        raise outdir.OutputDirError(
            f"output_dir={cfg.output_dir!r} holds a split run's checkpoint: the unsplit run would "
            "overwrite its metrics; choose another output_dir, or set runtime.overwrite=true to move its "
            "results to previous-<time>/ there (nothing was changed)"
        )
    # a split run's run_config.json is never this run's (launch.export would trust it)
    there = outdir.results(out, started_here=not (out / "run_config.json").exists())
    if there and not cfg.runtime.overwrite:
        raise outdir.OutputDirError(
            f"output_dir={cfg.output_dir!r} holds results of another run ({', '.join(there)}): choose "
            "another output_dir, or set runtime.overwrite=true to move them to previous-<time>/ there "
            "and start over (nothing was changed)"
        )
    return there


def main(argv: list[str] | None = None) -> None:
    held = None
    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
        held = outdir.lock(cfg.output_dir)  # held for this process's life
        aside = check_output_dir(cfg)
        model_path = resolve_model_path(cfg)
        model_config(model_path)
        data = client_data(cfg, model_path, 0, 1)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if held is not None:
            held.release(undo=True)  # a refused launch leaves the folder as it was
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if aside:
        outdir.move_aside(cfg.output_dir, aside)
    held.checked()
    from runtime.local import run_local

    setup_logging(0)
    run_local(cfg, data)


if __name__ == "__main__":
    main()
