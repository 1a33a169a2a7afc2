"""Exports a run's trained model: the global adapter in PEFT form and, on request, the merged model.

    python -m launch.export runs/demo                         # checks and names runs/demo/adapter
    python -m launch.export runs/demo --merged runs/demo-merged
    python -m launch.export runs/stack --merged DIR [--adapter-rank 16 --adapter DIR2]   # stack runs

The run writes the global adapter in PEFT form to ``OUTPUT_DIR/adapter`` after every round
(atomically, so it is always the last completed round's); this command loads it onto the base
model (``model.path`` of the run's saved ``run_config.json``) to check that it fits, and says
where it is and which round it holds (``adapter/splitft.json``, written with it: a run's
metrics.jsonl may already have the next round). ``--merged DIR`` also writes the base model with the
adapter merged into its weights, plus its config and tokenizer: ``AutoModelForCausalLM
.from_pretrained(DIR)`` loads it without PEFT, and it gives the split model's logits. DIR must not
exist yet or be empty; nothing else is written.

A ``train.aggregation=stack`` run has no adapter: every round's exact delta was merged into the
frozen weights, which its newest checkpoint holds (``merged_weights.safetensors``). ``--merged``
writes the base with those weights; ``--adapter-rank R --adapter DIR2`` also writes a rank-``R`` PEFT
adapter of the total delta (an SVD of each module's delta) and prints the relative error it carries.
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
    parser.add_argument("--adapter-rank", type=int, metavar="R", help="stack: rank of the delta's adapter")
    parser.add_argument("--adapter", metavar="DIR2", help="stack: where the rank-R adapter of the delta goes")
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
        export_stack(out, model_path, cfg.model.dtype, merged, args.adapter_rank, args.adapter)
        return
    if not (adapter / "adapter_config.json").is_file():
        raise _fail(
            f"no adapter in {str(adapter)!r}: the run writes it after each round; did round 1 finish?"
        )
    from models.export import merge_adapter, save_merged
    from runtime.outdir import adapter_round, read_metrics

    rnd = adapter_round(adapter)  # adapter/splitft.json: the round it holds
    if rnd is None:  # an adapter written before it said: metrics.jsonl's last complete round
        try:
            records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
        except (OSError, ValueError) as e:
            raise _fail(str(e)) from None
        rnd = records[-1].get("round", "?") if records else "?"
    if merged is None:
        merge_adapter(model_path, adapter, cfg.model.dtype)  # loads onto the base, or fails naming why
        print(f"global adapter of round {rnd} (PEFT format, checked against {model_path}): {adapter}")
        return
    save_merged(model_path, adapter, merged, cfg.model.dtype)
    print(f"global adapter of round {rnd} (PEFT format): {adapter}")
    print(f"merged model (AutoModelForCausalLM.from_pretrained): {merged}")


def export_stack(out: Path, model_path, dtype: str, merged: Path | None, rank: int | None, adapter) -> None:
    from models.export import delta_adapter, save_merged
    from runtime import checkpoint

    found = checkpoint.latest(out / "checkpoint", adapter=False)
    if found is None:
        raise _fail(f"no complete checkpoint in {str(out / 'checkpoint')!r}: did round 1 finish?")
    rnd = found[0]["round"]
    if merged is None and rank is None:
        raise _fail("a stack run has no adapter/: give --merged DIR (and/or --adapter-rank R --adapter DIR2)")
    if (rank is None) != (adapter is None) or (rank is not None and rank < 1):
        raise _fail("give --adapter-rank R (R >= 1) and --adapter DIR2 together")
    weights = checkpoint.merged_weights(out / "checkpoint", rnd)
    if merged is not None:
        save_merged(model_path, None, merged, dtype, weights=weights)
        print(f"merged model of round {rnd} (AutoModelForCausalLM.from_pretrained): {merged}")
    if rank is not None:
        error = delta_adapter(model_path, weights, rank, adapter)
        print(f"rank-{rank} adapter of round {rnd}'s total delta: {adapter} (relative error {error:.3%})")


if __name__ == "__main__":
    main()
