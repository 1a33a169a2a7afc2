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


def _draw(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()


def test_cut_plot_has_whole_layer_ticks_and_no_line_hides_another(run_dir):
    from launch.report import load

    fig = figures(*load(run_dir))["cuts"]
    _draw(fig)
    (ax,) = fig.axes
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    assert ticks and all(t == int(t) for t in ticks)  # no 2.25 for a layer
    lines = ax.get_lines()
    assert len({line.get_marker() for line in lines}) == len(CLIENTS)
    # Round 3: clients 1 and 2 both cut at 2. The data stay exact; the drawn lines sit apart.
    one, two = lines[0], lines[1]
    assert one.get_ydata()[2] == two.get_ydata()[2] == 2
    y_one = one.get_transform().transform((3, 2))[1]
    y_two = two.get_transform().transform((3, 2))[1]
    assert abs(y_one - y_two) >= 3  # pixels at 100 dpi (3 points apart)


def test_cut_plot_shows_each_round_s_participants_only(run_dir):
    """A round's cut_layers holds only the clients that trained in it: an absent client leaves a gap,
    and coming back at its old cut is not a move."""
    from launch.report import load, summary

    rounds = [
        _record(1, {"1": 3, "2": 2, "3": 1}),
        {**_record(2, {"1": 3, "2": 2}), "participants": ["1", "2"]},
        {**_record(3, {"1": 2, "3": 1}), "participants": ["1", "3"]},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    records, baseline = load(run_dir)
    (ax,) = figures(records, baseline)["cuts"].axes
    one, two, three = (list(line.get_ydata()) for line in ax.get_lines())
    assert one == [3, 3, 2]
    assert two[:2] == [2, 2] and np.isnan(two[2])
    assert three[0] == 1 and np.isnan(three[1]) and three[2] == 1
    text = summary(records, baseline, [])
    assert "[3, 2, 1] in round 1, [2, -, 1] in round 3; moved before round(s) [3]" in text


def _run(root: Path, name: str, step: float, seconds: float, **overrides: str) -> Path:
    """A synthetic run: eval loss 1.9 - step x round, ``seconds`` a round, its run_config.json."""
    from runtime.config import load_config

    out = root / name
    out.mkdir()
    rounds = []
    for rnd in (1, 2, 3):
        r = _record(rnd, {"1": 2, "2": 2, "3": 1})
        rounds.append({**r, "eval_loss": 1.9 - step * rnd, "elapsed_s": seconds * rnd})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    args = [f"output_dir={out}", *(f"{k}={v}" for k, v in overrides.items())]
    (out / "run_config.json").write_text(json.dumps(load_config(None, args).to_dict()))
    return out


def test_runs_are_compared_and_labelled_by_what_differs(tmp_path):
    from launch.report import write_comparison

    fixed = _run(tmp_path, "a", 0.2, 10.0, **{"split.policy": "fixed"})
    adaptive = _run(tmp_path, "b", 0.1, 5.0, **{"split.policy": "adaptive"})
    path, table = write_comparison([fixed, adaptive], tmp_path / "cmp")
    # Target: the lowest loss both reach (b's best, 1.6); a reaches it in round 2, b in round 3.
    rows = table.splitlines()
    assert "time to eval loss 1.6000" in rows[0]
    assert rows[2] == f"| split.policy=fixed | {fixed} | 3 | 1.3000 | 20.0 s (round 2) | 90.0 |"
    assert rows[3] == f"| split.policy=adaptive | {adaptive} | 3 | 1.6000 | 15.0 s (round 3) | 90.0 |"
    text = path.read_text()
    assert "differ in: `split.policy`" in text and table in text
    for name in ("loss", "bytes"):
        png = tmp_path / "cmp" / f"{name}.png"
        with Image.open(png) as img:
            assert img.format == "PNG" and len(np.unique(np.asarray(img.convert("L")))) > 20
        assert f"![{name}]({name}.png)" in text
    _, table = write_comparison([fixed, adaptive], tmp_path / "cmp", target=1.4)
    assert [row.split(" | ")[4] for row in table.splitlines()[2:]] == ["30.0 s (round 3)", "not reached"]


def test_comparison_figures_overlay_each_run(tmp_path):
    from launch.report import Run, compare_figures, label_runs, load

    paths = [_run(tmp_path, "a", 0.2, 10.0, **{"train.aggregation": "fedavg"})]
    paths.append(_run(tmp_path, "b", 0.1, 5.0, **{"train.aggregation": "stack"}))
    runs = [Run(p, load(p)[0], json.loads((p / "run_config.json").read_text())) for p in paths]
    assert label_runs(runs) == ["train.aggregation"]
    figs = compare_figures(runs)
    by_round, by_time = figs["loss"].axes
    labels = ["train.aggregation=fedavg", "train.aggregation=stack"]
    for ax in (by_round, by_time):
        assert [line.get_label() for line in ax.get_lines()] == labels
    assert list(by_round.get_lines()[1].get_xdata()) == [1, 2, 3]
    assert list(by_time.get_lines()[1].get_xdata()) == [5.0, 10.0, 15.0]
    assert list(by_time.get_lines()[0].get_ydata()) == pytest.approx([1.7, 1.5, 1.3])
    (ax,) = figs["bytes"].axes
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([30.0, 30.0, 30.0])  # 3 clients x 10 MB


def test_runs_with_nothing_to_tell_apart_are_labelled_by_folder(tmp_path):
    from launch.report import Run, label_runs, load

    same = [_run(tmp_path, name, 0.1, 5.0) for name in ("first", "second")]
    local = tmp_path / "local"  # an unsplit train_local run writes no run_config.json
    local.mkdir()
    (local / "metrics.jsonl").write_text(json.dumps(_record(1, {})) + "\n")
    runs = [Run(p, load(p)[0], None) for p in [local]]
    runs += [Run(p, load(p)[0], json.loads((p / "run_config.json").read_text())) for p in same]
    assert label_runs(runs) == []
    assert [r.label for r in runs] == ["local", "first", "second"]


def test_cli_compares_runs_into_out(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    a = _run(tmp_path, "a", 0.2, 10.0, **{"split.policy": "fixed"})
    b = _run(tmp_path, "b", 0.1, 5.0, **{"split.policy": "adaptive"})
    cmd = [sys.executable, "-m", "launch.report", str(a), str(b)]
    res = subprocess.run(
        [*cmd, "--out", str(tmp_path / "cmp")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "| split.policy=fixed |" in res.stdout and str(tmp_path / "cmp" / "compare.md") in res.stdout
    assert (tmp_path / "cmp" / "compare.md").is_file()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "needs --out" in res.stderr and "Traceback" not in res.stderr
