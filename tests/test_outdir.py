"""The run owns its output folder: a lock held for the run's life, results of another run refused unless
``runtime.overwrite=true`` moves them aside, and readers that tolerate a run in progress.

The launches are ``launch.train.main`` / ``launch.train_local.main`` / ``launch.run.main`` called in this
process with torchrun's environment, as tests/test_bad_input.py does; where a launch passes its checks,
``runtime.run.run`` (or ``run_local``) is replaced by a stub that records the folder, so no process group
starts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import train, train_local
from models.tiny import generate_examples, write_jsonl
from runtime import checkpoint, outdir
from runtime.config import fingerprint, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = "torchrun_configs/tiny_cpu.yaml"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("SPLITFT_CACHE", str(tmp_path / "cache"))
    for name in (
        "TORCHELASTIC_ERROR_FILE",
        "TORCHELASTIC_RESTART_COUNT",
        "SPLITFT_FRONT_DOOR",
        "SLURM_JOB_ID",
    ):
        monkeypatch.delenv(name, raising=False)
    yield
    for folder in list(outdir._HELD):  # what a launch that passed its checks still holds
        outdir.release(folder)


@pytest.fixture
def argv(tmp_path, random_model) -> list[str]:
    write_jsonl(generate_examples("sort", 32, 0), tmp_path / "train.jsonl")
    return [
        CONFIG,
        f"model.path={random_model('llama')}",
        f"data.train_path={tmp_path / 'train.jsonl'}",
        f"data.eval_path={tmp_path / 'train.jsonl'}",
        f"output_dir={tmp_path / 'out'}",
        "split.cut_layers=1",
    ]


@pytest.fixture
def started(monkeypatch) -> list[dict]:
    """Replaces the run itself: each launch that passed every check appends what output_dir held then."""
    import runtime.local
    import runtime.run

    calls: list[dict] = []

    def fake_run(cfg, data=None):
        out = Path(cfg.output_dir)
        calls.append({"files": sorted(p.name for p in out.iterdir()), "lock": _lock_info(out)})

    monkeypatch.setattr(runtime.run, "run", fake_run)
    monkeypatch.setattr(runtime.local, "run_local", fake_run)
    return calls


def _lock_info(out: Path) -> dict:
    text = (out / outdir.LOCK_NAME).read_text()
    return json.loads(text) if text.strip() else {}


def _out(argv: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def _finished_run(out: Path, argv: list[str]) -> None:
    """What a finished split run leaves once its checkpoint/ is deleted: rounds in metrics.jsonl, the
    adapter, the side files (run_config.json of the same settings)."""
    cfg = load_config(argv[0], argv[1:])
    out.mkdir(parents=True)
    (out / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "profiles.json").write_text("{}")
    (out / "baseline.json").write_text(json.dumps({"eval_loss": 3.0}))
    (out / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n" + json.dumps({"round": 2}) + "\n")
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")


# ------------------------------------------------------------------------------------------ the lock
def test_a_second_launch_into_a_locked_folder_exits_2_naming_the_running_job(argv, capsys, monkeypatch):
    out = _out(argv)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    held = outdir.lock(out)  # the running job (this process, through another open file)
    monkeypatch.delenv("SLURM_JOB_ID")
    before = _snapshot(out)
    for main in (train.main, train_local.main):
        line = _refused(main, argv, capsys)
        assert f"output_dir={str(out)!r} is in use by a running job" in line, line
        assert f"pid {os.getpid()}" in line and "Slurm job 4242" in line and "since " in line, line
        assert "wait for it to end or stop it, or choose another output_dir" in line, line
        assert _snapshot(out) == before  # the holder's lock file untouched
    held.release()


def test_the_front_door_refuses_a_locked_folder_before_any_worker(argv, capsys, monkeypatch):
    import torch.distributed.run

    from launch import run as front

    def no_launch(args):
        raise AssertionError("the launcher was started")

    monkeypatch.setattr(torch.distributed.run, "run", no_launch)
    held = outdir.lock(_out(argv))
    line = _refused(front.main, [*argv, "--nproc-per-node=2"], capsys)
    assert line.startswith("output_dir error: ") and "is in use by a running job" in line, line
    held.release()


def test_the_front_door_leaves_the_lock_free_for_the_job_s_rank_0(argv, monkeypatch):
    """launch.run checks the folder but holds nothing: the job's rank 0 can take the lock."""
    import torch.distributed.run

    from launch import run as front

    taken = []
    monkeypatch.setattr(
        torch.distributed.run, "run", lambda args: taken.append(outdir.lock(_out(argv)).release())
    )
    with pytest.raises(SystemExit) as exit_info:
        front.main([*argv, "--nproc-per-node=2"])
    assert exit_info.value.code == 0 and len(taken) == 1


def _holder(folder: Path, **env: str) -> subprocess.Popen:
    """Another process that takes the folder's lock and sleeps."""
    code = (
        "import sys, time; from runtime import outdir; outdir.lock(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    """However the holder ends (here SIGKILL, as a torchrun restart kills rank 0), the next one takes it."""
    out = tmp_path / "out"
    proc = _holder(out, SLURM_JOB_ID="77")
    try:
        with pytest.raises(outdir.OutputDirError, match=rf"pid {proc.pid}, Slurm job 77"):
            outdir.lock(out)
        with pytest.raises(outdir.OutputDirError, match="is in use by a running job"):
            outdir.probe(out)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    outdir.probe(out)
    held = outdir.lock(out)
    assert held.previous["pid"] == proc.pid  # what the dead holder wrote: read, then replaced
    assert _lock_info(out)["pid"] == os.getpid()
    held.release()


def test_a_file_system_without_flock_warns_once_and_goes_on(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outdir.fcntl, "flock", no_flock)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="splitft"):
        first = outdir.lock(out)
        outdir.probe(out)
        second = outdir.lock(out)
    said = [r.getMessage() for r in caplog.records if "no flock" in r.getMessage()]
    assert len(said) == 1 and "going on" in said[0], said
    assert first.fd is None and second.fd is None


def test_a_refused_launch_leaves_no_lock_file_or_folder(argv, capsys):
    out = _out(argv)
    line = _refused(train.main, [*argv, f"model.path={out.parent / 'nowhere'}"], capsys)  # after the lock
    assert line.startswith("config error: ") and "no config.json" in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------- results
def test_a_finished_run_without_its_checkpoint_is_refused_and_left_as_it_was(argv, capsys, started):
    out = _out(argv)
    _finished_run(out, argv)
    before = _snapshot(out)
    line = _refused(train.main, argv, capsys)
    assert line == (
        f"output_dir error: output_dir={str(out)!r} holds results of another run (metrics.jsonl, adapter/, "
        "baseline.json, profiles.json, run_config.json) and no checkpoint this run can resume: choose "
        "another output_dir, or set runtime.overwrite=true to move them to previous-<time>/ there and "
        "start over (nothing was changed)"
    )
    assert _snapshot(out) == before and not started
    assert not (out / outdir.LOCK_NAME).exists()


def test_a_train_local_run_s_results_are_refused_by_both_launchers(argv, capsys, started):
    out = _out(argv)
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    (out / "baseline.json").write_text("{}")
    (out / "adapter").mkdir()
    before = _snapshot(out)
    for main in (train.main, train_local.main):
        line = _refused(main, argv, capsys)
        assert "holds results of another run (metrics.jsonl, adapter/, baseline.json)" in line, line
        assert "runtime.overwrite=true" in line
        assert _snapshot(out) == before
    assert not started


def test_resume_false_on_a_checkpoint_names_overwrite_as_the_way_to_start_over(argv, capsys, started):
    out = _out(argv)
    checkpoint.save(out / "checkpoint", 3, torch.zeros(4), {"round": 3}, keep=2)
    before = _snapshot(out)
    line = _refused(train.main, [*argv, "runtime.resume=false"], capsys)
    assert "round 3" in line and "runtime.resume=auto" in line and "runtime.overwrite=true" in line, line
    assert _snapshot(out) == before and not started


def test_overwrite_moves_the_old_results_aside_and_deletes_nothing(argv, started):
    out = _out(argv)
    _finished_run(out, argv)
    # no fingerprint: a checkpoint of other settings
    checkpoint.save(out / "checkpoint", 2, torch.zeros(4), {"round": 2}, keep=2)
    before = _snapshot(out)
    train.main([*argv, "runtime.overwrite=true"])
    (aside,) = out.glob("previous-*")
    assert _snapshot(aside) == before  # every file, byte for byte, under previous-<time>/
    assert started[0]["files"] == [outdir.LOCK_NAME, aside.name]  # the run starts in an empty folder
    assert started[0]["lock"]["pid"] == os.getpid() and started[0]["lock"]["checked"]


def test_overwrite_with_resume_false_moves_a_resumable_checkpoint_aside(argv, started):
    out = _out(argv)
    cfg = load_config(argv[0], argv[1:])
    checkpoint.save(
        out / "checkpoint", 2, torch.zeros(4), {"round": 2, "fingerprint": fingerprint(cfg, 1)}, keep=2
    )
    train.main([*argv, "runtime.resume=false", "runtime.overwrite=true"])
    (aside,) = out.glob("previous-*")
    assert checkpoint.rounds(aside / "checkpoint") and not (out / "checkpoint").exists()


def test_a_resumable_checkpoint_is_resumed_not_moved_even_with_overwrite(argv, started):
    out = _out(argv)
    _finished_run(out, argv)
    cfg = load_config(argv[0], argv[1:])
    checkpoint.save(
        out / "checkpoint", 2, torch.zeros(4), {"round": 2, "fingerprint": fingerprint(cfg, 1)}, keep=2
    )
    before = _snapshot(out)
    train.main([*argv, "runtime.overwrite=true"])
    assert not list(out.glob("previous-*"))
    assert {k: v for k, v in _snapshot(out).items() if k != outdir.LOCK_NAME} == before


def test_a_start_that_finished_no_round_is_not_another_run_s_results(argv, capsys, started):
    """Killed before round 1 ended (run_config.json of these settings, profiles, baseline, an empty
    metrics.jsonl): the relaunch starts again; the same start-up files of other settings are refused."""
    out = _out(argv)
    cfg = load_config(argv[0], argv[1:])
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "profiles.json").write_text("{}")
    (out / "baseline.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    train.main(argv)
    assert len(started) == 1 and not list(out.glob("previous-*"))
    outdir.release(out)
    line = _refused(train.main, [*argv, "train.lr=0.5"], capsys)
    assert (
        "holds results of another run (metrics.jsonl, baseline.json, profiles.json, run_config.json)" in line
    )


def test_a_torchrun_restart_takes_over_what_its_own_earlier_attempt_wrote(argv, capsys, started, monkeypatch):
    """Attempt 0 passed its checks and wrote round 1's metrics line, then died before round 1's checkpoint:
    attempt 1 of the same job (the lock file names it) starts again; a job that never passed is refused."""
    out = _out(argv)
    _finished_run(out, argv)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    earlier = {"pid": 1, "job": outdir.job_id(), "checked": False}
    (out / outdir.LOCK_NAME).write_text(json.dumps(earlier))
    assert "holds results of another run" in _refused(train.main, argv, capsys)  # it never passed
    (out / outdir.LOCK_NAME).write_text(json.dumps({**earlier, "checked": True}))
    train.main(argv)
    assert len(started) == 1 and not list(out.glob("previous-*"))


def test_overwrite_is_a_runtime_setting_outside_the_fingerprint():
    cfg = load_config(CONFIG, ["runtime.overwrite=true"])
    assert cfg.runtime.overwrite is True and load_config(CONFIG, []).runtime.overwrite is False
    assert fingerprint(cfg, 1) == fingerprint(load_config(CONFIG, []), 1)
    from runtime.config import ConfigError

    with pytest.raises(ConfigError, match="runtime.resume=true only continues"):
        load_config(CONFIG, ["runtime.overwrite=true", "runtime.resume=true"])


# ---------------------------------------------------------------------------------------- readers
def test_read_metrics_skips_a_torn_last_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"round": 1}) + "\n" + json.dumps({"round": 2}) + "\n" + '{"round": 3, "ev')
    with caplog.at_level(logging.WARNING, logger="splitft"):
        assert outdir.read_metrics(path) == [{"round": 1}, {"round": 2}]
    assert any("line 3 is not complete" in r.getMessage() for r in caplog.records)
    path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON record"):
        outdir.read_metrics(path)


def test_report_of_a_run_in_progress_skips_the_torn_line(tmp_path, capsys):
    from launch import report

    out = tmp_path / "run"
    out.mkdir()
    rec = {
        "round": 1,
        "elapsed_s": 1.0,
        "round_time_s": 1.0,
        "train_loss": 2.0,
        "eval_loss": 1.9,
        "eval_token_accuracy": 0.3,
        "eval_perplexity": 6.7,
        "tokens_per_s": 100.0,
        "cut_layers": {"1": 1},
        "comm_bytes": {"1": {"activations_up": 10}},
        "clients": {"1": {"train_time_s": 1.0}},
    }
    (out / "metrics.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "round": 2})[:40])
    records, _ = report.load(out)
    assert [r["round"] for r in records] == [1]
    (out / "metrics.jsonl").write_text(json.dumps({**rec, "round": 2})[:40])
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(out)])
    assert exit_info.value.code == 2 and "holds no complete round yet" in capsys.readouterr().err


def test_the_exported_adapter_says_its_round(tmp_path):
    """prepare_export puts the round just written to metrics.jsonl (or one given) in adapter/splitft.json."""
    from models.lora import LoraSpec, build_layout
    from models.stages import load_config as hf_config
    from tests.random_models import save_random_model

    model_dir = save_random_model("llama", tmp_path / "model", n_layers=2, hidden=32)
    mcfg = hf_config(model_dir)
    spec = LoraSpec(r=4, alpha=8.0, r_cut=2, targets=("q_proj", "v_proj"))
    layout = build_layout(mcfg, spec, [1])
    flat = torch.zeros(layout.numel)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n" + json.dumps({"round": 2}) + "\n")
    write = checkpoint.prepare_export(out, layout, flat, spec, mcfg, model_dir)
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + json.dumps({"round": 3}) + "\n")
    write()  # on the saver's thread, while the next round's line may already be there
    assert outdir.adapter_round(out / "adapter") == 2
    checkpoint.export_adapter(out, layout, flat, spec, mcfg, model_dir, rnd=7)
    assert outdir.adapter_round(out / "adapter") == 7
    from peft import PeftModel

    from models.stages import full_model

    PeftModel.from_pretrained(full_model(model_dir), str(out / "adapter"))  # PEFT loads it as before
