"""launch.report: the table, PNG plots that are real images with the expected panels and series, a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.report import CATEGORIES, figures, write_report

REPO = Path(__file__).resolve().parent.parent
CLIENTS = ("1", "2", "3")


def _record(rnd: int, cuts: dict[str, int]) -> dict:
    return {
        "round": rnd,
        "elapsed_s": 10.0 * rnd,
        "round_time_s": 10.0,
        "train_loss": 2.0 - 0.2 * rnd,
        "eval_loss": 1.9 - 0.2 * rnd,
        "eval_token_accuracy": 0.3 + 0.1 * rnd,
        "eval_perplexity": 5.0,
        "tokens_per_s": 100.0,
        "cut_layers": cuts,
        "comm_bytes": {c: {k: 1_000_000 * (i + 1) for i, k in enumerate(CATEGORIES)} for c in cuts},
        "clients": {c: {"train_time_s": 3.0 + int(c), "predicted_time_s": 2.5 + int(c)} for c in cuts},
        "plan": {"policy": "adaptive", "bottleneck": "client 3", "next_cut_layers": None},
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    rounds = [
        _record(1, {"1": 3, "2": 2, "3": 1}),
        _record(2, {"1": 3, "2": 2, "3": 1}),
        _record(3, {"1": 2, "2": 2, "3": 1}),  # client 1 moved after round 2
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (out / "baseline.json").write_text(json.dumps({"eval_loss": 2.0, "eval_token_accuracy": 0.25}))
    return out


def test_figures_have_the_expected_panels_and_series(run_dir):
    from launch.report import load

    figs = figures(*load(run_dir))
    assert sorted(figs) == ["bytes", "cuts", "eval", "time"]
    loss, acc = figs["eval"].axes
    for ax in (loss, acc):
        assert [line.get_label() for line in ax.get_lines()] == ["fine-tuned", "base model"]
    assert list(loss.get_lines()[0].get_ydata()) == pytest.approx([1.7, 1.5, 1.3])
    (cuts,) = figs["cuts"].axes
    assert [line.get_label() for line in cuts.get_lines()] == [f"client {c}" for c in CLIENTS]
    assert list(cuts.get_lines()[0].get_ydata()) == [3, 3, 2]
    (bars,) = figs["bytes"].axes
    assert len(bars.containers) == len(CATEGORIES)  # one stacked series per category
    assert all(len(c.patches) == len(CLIENTS) for c in bars.containers)  # one bar per client
    assert bars.containers[0].patches[0].get_height() == pytest.approx(3.0)  # 3 rounds x 1 MB
    (times,) = figs["time"].axes
    assert len(times.collections) == len(CLIENTS)  # one scatter per client
    assert [line.get_label() for line in times.get_lines()] == ["predicted = measured"]


def test_report_writes_real_pngs_and_a_summary(run_dir):
    folder = write_report(run_dir)
    for name, panels in (("eval", 2), ("cuts", 1), ("bytes", 1), ("time", 1)):
        path = folder / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as img:
            assert img.format == "PNG"
            width, height = img.size
            pixels = np.asarray(img.convert("L"))
        assert height > 200 and width > 400 * panels  # 5.5 inches a panel at 100 dpi
        assert len(np.unique(pixels)) > 20  # drawn on, not a blank canvas
    text = (folder / "summary.md").read_text()
    assert "3 rounds" in text and "2.0000 (base model) -> 1.3000" in text and "35.0% lower" in text
    assert "[3, 2, 1] in round 1, [2, 2, 1] in round 3; moved before round(s) [3]" in text
    assert "![time](time.png)" in text


def test_unsplit_run_gets_the_eval_plot_only(run_dir):
    local = [{**_record(1, {}), "clients": {"local": {"train_loss": 1.0}}}]
    (run_dir / "metrics.jsonl").write_text(json.dumps(local[0]) + "\n")
    folder = write_report(run_dir)
    assert sorted(p.name for p in folder.glob("*.png")) == ["eval.png"]


def test_cli_prints_the_table_and_where_the_plots_are(run_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "launch.report", str(run_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "eval_loss" in res.stdout and "plots and summary" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "launch.report", str(tmp_path / "none")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "no metrics.jsonl" in res.stderr and "Traceback" not in res.stderr
