"""The demo end to end (``make demo``): 1 server + 4 unequal clients under the adaptive scheduler, on the
project's own tiny model and data, then the report.

The acceptance bar of the demo: over its rounds the eval loss falls by at least 30% from the base
model's and the token accuracy rises; the log names every client's cut with what limits it and
says what each re-plan did; the memory-capped client gets no more layers than its memory holds;
client 1, which turns 12x slower in round 4, holds layers in that round and one after the re-plan
that follows (the scheduler measured the change and moved layers); the report writes its plots.
Uses the shared cache (.cache/splitft), so the tiny model is built once (about a minute on an idle
machine) and reused.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.test_distributed import REPO, metrics, torchrun


def test_demo_shows_the_adaptive_scheduler_and_learns(tmp_path):
    out = tmp_path / "demo"
    res = torchrun(5, ["torchrun_configs/demo.yaml", f"output_dir={out}"])
    assert res.returncode == 0, res.stdout[-4000:]
    base = json.loads((out / "baseline.json").read_text())
    records = metrics(out)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["eval_loss"] <= 0.7 * base["eval_loss"]
    assert records[-1]["eval_token_accuracy"] > base["eval_token_accuracy"] + 0.1

    log = res.stdout
    assert "plan (adaptive): cuts [" in log and "bound by " in log
    for client in range(1, 5):
        assert re.search(rf"client {client}: cut \d \(layers 0-\d here", log), client
    # client 2 runs under a 1.05 GB cap: the plan says its memory limits it and keeps it within it
    capped = re.search(r"client 2: cut (\d).*memory for up to (\d) layers", log)
    assert capped and int(capped.group(1)) <= int(capped.group(2)) < 3
    assert all(r["cut_layers"]["2"] <= int(capped.group(2)) for r in records)
    for rnd in (2, 4):
        assert f"re-plan after round {rnd}: " in log
    # the speed change and the move it causes
    assert "[rank 1 client1] round 4: simulated slowdown 1 -> 12" in log
    assert [r["simulated"]["1"]["slowdown"] for r in records] == [1, 1, 1, 12, 12, 12]
    cuts_1 = [r["cut_layers"]["1"] for r in records]
    assert cuts_1[3] >= 2, cuts_1  # the fast client holds layers
    assert cuts_1[4:] == [1, 1], cuts_1  # ... and gives them back once it is slow
    assert re.search(r"re-plan after round 4: move cuts \[\d, \d, \d, \d\] -> \[1, ", log)
    assert records[3]["plan"]["replan"]["rule"] == "speed"
    assert "round 6/6 done" in log and "ETA" in log
    assert all(r["plan"]["policy"] == "adaptive" for r in records)

    report = subprocess.run(
        [sys.executable, "-m", "launch.report", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert sorted(p.name for p in (out / "report").glob("*.png")) == [
        "bytes.png",
        "cuts.png",
        "eval.png",
        "time.png",
    ]
