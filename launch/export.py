"""Exports a run's trained model: the global adapter in PEFT form and, on request, the merged model.

    python -m launch.export runs/demo                       # runs/demo/adapter from the newest checkpoint
    python -m launch.export runs/demo --merged runs/demo-merged

The adapter comes from the newest complete round checkpoint of OUTPUT_DIR (the same adapter
``OUTPUT_DIR/adapter`` holds after that round; it is rewritten in place, atomically), so a stopped
run exports its last complete round. ``--merged DIR`` also writes the base model (``model.path``
of the run's saved config) with the adapter merged into its weights, plus its config and
tokenizer: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it without PEFT, and it gives the
split model's logits. DIR must not exist yet or be empty.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.config import ConfigError


def _fail(message: str) -> SystemExit:
    print(f"export error: {message}", file=sys.stderr)
    return SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", help="a run's output_dir (holds run_config.json and checkpoint/)")
    parser.add_argument("--merged", metavar="DIR", help="also write the merged Hugging Face model to DIR")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.output_dir)
    saved = out / "run_config.json"
    if not saved.is_file():
        raise _fail(f"no run_config.json in {str(out)!r}: give the output_dir of a split run (launch.train)")
    merged = Path(args.merged) if args.merged else None
    if merged is not None and merged.exists() and (not merged.is_dir() or any(merged.iterdir())):
        raise _fail(
            f"--merged {str(merged)!r} exists and is not empty: choose a new folder (nothing was written)"
        )

    from models.lora import build_layout
    from runtime import checkpoint
    from runtime.config import config_from_dict
    from runtime.job import lora_spec, model_config, resolve_model_path

    try:
        cfg = config_from_dict(json.loads(saved.read_text()))
        model_path = resolve_model_path(cfg)
        mcfg = model_config(model_path)
    except (ConfigError, ValueError, OSError) as e:
        raise _fail(f"{saved}: {e}") from None
    found = checkpoint.latest(out / "checkpoint")
    if found is None:
        raise _fail(f"{str(out / 'checkpoint')!r} holds no complete checkpoint: did round 1 finish?")
    state, flat = found
    spec = lora_spec(cfg, mcfg)
    cuts = (
        []
        if cfg.moves_cuts
        else [k for _, (k, _) in sorted(state["plan"].items(), key=lambda kv: int(kv[0]))]
    )
    layout = build_layout(mcfg, spec, cuts)
    if layout.numel != flat.numel():
        raise _fail(
            f"the checkpoint's adapter has {flat.numel()} values but this model and LoRA settings need "
            f"{layout.numel}: was {saved} edited after the run?"
        )
    checkpoint.export_adapter(out, layout, flat, spec, mcfg, model_path)
    print(f"global adapter of round {state['round']} (PEFT format): {out / 'adapter'}")
    if merged is not None:
        from models.export import save_merged

        save_merged(model_path, out / "adapter", merged, cfg.model.dtype)
        print(f"merged model (AutoModelForCausalLM.from_pretrained): {merged}")


if __name__ == "__main__":
    main()
