"""The built-in demo end to end: 1 server + 4 clients on the project's own tiny model and data.

The acceptance bar of the demo: over its rounds the eval loss falls by at least 30% from the
base model's and the token accuracy rises. Uses the shared cache (.cache/splitft), so the
tiny model is built once (about a minute) and reused.
"""

from __future__ import annotations

import json

from tests.test_distributed import metrics, torchrun


def test_demo_learns(tmp_path):
    out = tmp_path / "demo"
    res = torchrun(5, ["torchrun_configs/tiny_cpu.yaml", f"output_dir={out}"])
    assert res.returncode == 0, res.stdout[-4000:]
    base = json.loads((out / "baseline.json").read_text())
    records = metrics(out)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["eval_loss"] <= 0.7 * base["eval_loss"]
    assert records[-1]["eval_token_accuracy"] > base["eval_token_accuracy"] + 0.1
    assert records[-1]["cut_layers"] == {"1": 1, "2": 2, "3": 3, "4": 2}
