"""Prints a finished (or running) run's per-round table and what changed since the base model.

python -m launch.report runs/demo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime.metrics import header, row


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        raise SystemExit(2)
    out = Path(args[0])
    path = out / "metrics.jsonl"
    if not path.is_file():
        print(
            f"no metrics.jsonl in {str(out)!r}: is output_dir right, and did round 1 finish?", file=sys.stderr
        )
        raise SystemExit(2)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(header())
    for record in records:
        print(row(record))
    last = records[-1]
    comm = sum(sum(c.values()) for r in records for c in r["comm_bytes"].values()) / 1e6
    print(
        f"\n{len(records)} rounds in {last['elapsed_s']:.1f}s; cut layers {last['cut_layers']}; "
        f"{comm:.1f} MB moved between clients and server"
    )
    baseline = out / "baseline.json"
    if baseline.is_file():
        base = json.loads(baseline.read_text())
        drop = 100 * (1 - last["eval_loss"] / base["eval_loss"])
        print(
            f"eval loss {base['eval_loss']:.4f} -> {last['eval_loss']:.4f} ({drop:.1f}% lower); "
            f"token accuracy {base['eval_token_accuracy']:.4f} -> {last['eval_token_accuracy']:.4f}"
        )
    print(f"global adapter (PEFT format): {out / 'adapter'}")


if __name__ == "__main__":
    main()
