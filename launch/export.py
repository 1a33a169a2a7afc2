"""Exports a run's trained model: the global adapter in PEFT form and, on request, the merged model.

    python -m launch.export runs/demo                         # checks and names runs/demo/adapter
    python -m launch.export runs/demo --merged runs/demo-merged

The run writes the global adapter in PEFT form to ``OUTPUT_DIR/adapter`` after every round
(atomically, so it is always the last completed round's); this command loads it onto the base
model (``model.path`` of the run's saved ``run_config.json``) to check that it fits, and says
where it is and which round it holds. ``--merged DIR`` also writes the base model with the
adapter merged into its weights, plus its config and tokenizer: ``AutoModelForCausalLM
.from_pretrained(DIR)`` loads it without PEFT, and it gives the split model's logits. DIR must not
exist yet or be empty; nothing else is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fail(message: str) -> SystemExit:
    print(f"export error: {message}", file=sys.stderr)
    return SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", help="a run's output_dir (holds run_config.json and adapter/)")
    parser.add_argument("--merged", metavar="DIR", help="also write the merged Hugging Face model to DIR")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.output_dir)
    saved, adapter = out / "run_config.json", out / "adapter"
    if not saved.is_file():
        raise _fail(f"no run_config.json in {str(out)!r}: give the output_dir of a split run (launch.train)")
    merged = Path(args.merged) if args.merged else None
    if merged is not None and merged.exists() and (not merged.is_dir() or any(merged.iterdir())):
        raise _fail(
            f"--merged {str(merged)!r} exists and is not empty: choose a new folder (nothing was written)"
        )

    from runtime.config import ConfigError, config_from_dict
    from runtime.job import model_config, resolve_model_path

    try:
        cfg = config_from_dict(json.loads(saved.read_text()))
        model_path = resolve_model_path(cfg)
        model_config(model_path)
    except (ConfigError, ValueError, OSError) as e:
        raise _fail(f"{saved}: {e}") from None
    if cfg.train.aggregation == "stack":
        raise _fail(
            "train.aggregation=stack merges each round's adapter into the base, so the run has no adapter/; "
            "exporting its merged weights is not implemented yet (they are in the round checkpoints)"
        )
    if not (adapter / "adapter_config.json").is_file():
        raise _fail(
            f"no adapter in {str(adapter)!r}: the run writes it after each round; did round 1 finish?"
        )
    from models.export import merge_adapter, save_merged

    records = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    rnd = json.loads(records[-1])["round"] if records else "?"
    if merged is None:
        merge_adapter(model_path, adapter, cfg.model.dtype)  # loads onto the base, or fails naming why
        print(f"global adapter of round {rnd} (PEFT format, checked against {model_path}): {adapter}")
        return
    save_merged(model_path, adapter, merged, cfg.model.dtype)
    print(f"global adapter of round {rnd} (PEFT format): {adapter}")
    print(f"merged model (AutoModelForCausalLM.from_pretrained): {merged}")


if __name__ == "__main__":
    main()
