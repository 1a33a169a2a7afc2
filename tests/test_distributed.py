"""Multi-process tests: real RPC and distributed autograd, gloo on CPU; real torchrun where the launch
is part of what is tested, else the ranks of ``tests.ranks.launch`` (torchrun's environment, no agent).

Few and small: a 4-layer random Llama, a generated sort dataset, a handful of steps. Each
launch gets a free port (torchrun --standalone), a timeout, and its own process group that is
killed if the test times out, so no process outlives the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.tiny import generate_examples, write_jsonl
from tests.random_models import save_random_model
from tests.ranks import launch

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dist")
    model = save_random_model("llama", root / "model", n_layers=4, hidden=64)
    write_jsonl(generate_examples("sort", 240, 0), root / "train.jsonl")
    write_jsonl(generate_examples("sort", 48, 1), root / "eval.jsonl")
    return {
        "model": str(model),
        "train": str(root / "train.jsonl"),
        "eval": str(root / "eval.jsonl"),
        "root": str(root),
    }


def common_args(setup: dict[str, str], out: Path) -> list[str]:
    return [
        "torchrun_configs/tiny_cpu.yaml",
        f"model.path={setup['model']}",
        f"data.train_path={setup['train']}",
        f"data.eval_path={setup['eval']}",
        f"output_dir={out}",
        "data.min_samples=8",
        "data.max_eval_samples=48",
        "train.eval_batch_size=16",
        "runtime.rpc_timeout_s=120",
    ]


def torchrun(n_procs: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n_procs}",
        "-m",
        "launch.train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out after {LAUNCH_TIMEOUT_S}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


CLIP = 0.5  # train.max_grad_norm of the clipped parity run: below the chain norm of its first steps here


@pytest.mark.parametrize(
    "schedule",
    [
        [],
        ["train.lr_schedule=cosine", "train.warmup_steps=4", "train.min_lr_ratio=0.1"],
        [f"train.max_grad_norm={CLIP}"],
    ],
    ids=["constant", "cosine_warmup", "clipped"],
)
def test_one_client_split_matches_unsplit_step_for_step(setup, tmp_path, schedule):
    """Parity: 1 client cut at 2 vs launch.train_local, 20 steps, same seed and data order, at a constant
    learning rate, under a warm-up and cosine schedule (the client's and the server replica's steps
    take the rate of the same global step) and with gradient clipping by the whole chain's norm (the
    client's and its replica's LoRA gradients together, as the unsplit model clips). At 2 intra-op
    threads the server computes on its compute thread (runtime.compute), the client on its main thread."""
    from runtime.config import load_config
    from runtime.job import learning_rate
    from runtime.local import run_local

    settings = ["train.rounds=2", "train.local_steps=10", "lora.r_cut=8", "split.cut_layers=2", *schedule]
    settings.append("runtime.intra_op_threads=2")
    split = launch(2, [*common_args(setup, tmp_path / "split"), *settings])
    assert split.returncode == 0, split.stdout[-4000:]
    assert re.search(r"the replicas compute on \d+ thread\(s\) of 2 intra-op threads", split.stdout)
    local = run_local(
        load_config(
            "torchrun_configs/tiny_cpu.yaml", [*common_args(setup, tmp_path / "local")[1:], *settings]
        )
    )

    split_losses = [x for r in metrics(tmp_path / "split") for x in r["clients"]["1"]["step_losses"]]
    local_losses = [x for r in local for x in r["clients"]["local"]["step_losses"]]
    assert len(split_losses) == len(local_losses) == 20
    assert max(abs(a - b) for a, b in zip(split_losses, local_losses)) < 1e-4
    assert local_losses[-1] < local_losses[0]  # it trained
    if any("max_grad_norm" in x for x in schedule):  # clipping fired, on the same norms on both sides
        split_norms = [x for r in metrics(tmp_path / "split") for x in r["clients"]["1"]["grad_norms"]]
        local_norms = [x for r in local for x in r["clients"]["local"]["grad_norms"]]
        assert len(split_norms) == len(local_norms) == 20
        assert max(abs(a - b) for a, b in zip(split_norms, local_norms)) < 1e-4 * max(local_norms)
        assert sum(x > CLIP for x in local_norms) >= 3, local_norms
    cfg = load_config("torchrun_configs/tiny_cpu.yaml", [*common_args(setup, tmp_path / "x")[1:], *settings])
    for rnd, (a, b) in enumerate(zip(metrics(tmp_path / "split"), local), start=1):
        assert a["lr"] == b["lr"] == learning_rate(cfg, rnd, 10)
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4
        assert 0 < b["clients"]["local"]["train_time_s"] < b["round_time_s"]  # the round's steps only
    ours = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(tmp_path / "local" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], ref[key], atol=1e-5, rtol=1e-4)


def test_three_clients_with_different_cuts_train_concurrently(setup, tmp_path):
    """3 clients cut at 1, 2, 3 take 32 steps each at once; the aggregate is the weighted average."""
    out = tmp_path / "run"
    res = torchrun(
        4,
        [
            *common_args(setup, out),
            "split.cut_layers=[1,2,3]",
            "train.rounds=2",
            "train.local_steps=16",
            "lora.r=8",
            "lora.r_cut=4",
            "runtime.debug=true",
        ],
    )
    assert res.returncode == 0, res.stdout[-4000:]
    assert "inplace operation" not in res.stdout

    records = metrics(out)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        for key in (
            "round",
            "elapsed_s",
            "round_time_s",
            "train_loss",
            "eval_loss",
            "eval_token_accuracy",
            "eval_perplexity",
            "cut_layers",
            "comm_bytes",
        ):
            assert key in r
        assert r["cut_layers"] == {"1": 1, "2": 2, "3": 3}
        for rank in ("1", "2", "3"):
            c = r["comm_bytes"][rank]
            assert c["activations_up"] > 0 and c["gradients_down"] > 0 and c["adapters_up"] > 0
            assert len(r["clients"][rank]["step_losses"]) == 16
            # two round trips a step: the forward call and the distributed backward; the server's
            # optimizer step needs no call of its own
            assert r["clients"][rank]["server_calls"] == {"train_forward": 16, "backward": 16}
        server = r["server"]  # the server process computed, and no process uses more cores than the host has
        assert 0 < server["train_cores_used"] <= server["host_cores_busy"] + 0.2 <= server["host_cores"] + 0.2
        assert all(0 < r["clients"][rank]["train_cores_used"] <= server["host_cores"] + 0.2 for rank in "123")
    assert records[1]["eval_loss"] < json.loads((out / "baseline.json").read_text())["eval_loss"]

    # The global adapter is the sample-weighted average of the holders' copies, component by component
    # over the copies that hold it (a component past r_cut is not averaged with absent zeros).
    copies = sorted((out / "debug" / "round2").glob("*.safetensors"))
    assert len(copies) == 6  # 3 clients + the server's replica for each
    sums: dict[str, torch.Tensor] = {}
    mass: dict[str, torch.Tensor] = {}
    weights = {}
    for path in copies:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            weight = float(f.metadata()["weight"])
            weights[path.stem] = weight
            for name in f.keys():
                module, part = name.rsplit(".", 1)
                t = f.get_tensor(name)
                key = f"base_model.model.{module}.lora_{part}.weight"
                if key not in sums:
                    sums[key] = torch.zeros(8, t.shape[1]) if part == "A" else torch.zeros(t.shape[0], 8)
                    mass[key] = torch.zeros(8)
                r = t.shape[0] if part == "A" else t.shape[1]
                mass[key][:r] += weight
                if part == "A":
                    sums[key][:r] += weight * t
                else:
                    sums[key][:, :r] += weight * t
    assert abs(sum(w for n, w in weights.items() if n.startswith("client")) - 1.0) < 1e-9
    assert any(bool((m < 0.999).any()) for m in mass.values())  # some component has fewer holders
    expected = {k: v / mass[k][:, None] if ".lora_A" in k else v / mass[k] for k, v in sums.items()}
    exported = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert exported.keys() == expected.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-5)

    # What crossed the wire: float hidden states, a bool mask, the int32 targets (labels shifted by
    # one: batch x (seq - 1)); never int64 token ids.
    wire = json.loads((out / "debug" / "wire.json").read_text())
    for kinds in (w["received"] for w in wire.values()):
        assert "torch.float32:3d:last=64" in kinds
        assert any(k.startswith("torch.int32:2d") for k in kinds), kinds
        assert not any(k.startswith("torch.int64") for k in kinds), kinds

    # Resume: a third round continues from the checkpoint and the metrics are appended, not restarted.
    res = torchrun(
        4,
        [
            *common_args(setup, out),
            "split.cut_layers=[1,2,3]",
            "train.rounds=3",
            "train.local_steps=16",
            "lora.r=8",
            "lora.r_cut=4",
            "runtime.resume=true",
        ],
    )
    assert res.returncode == 0, res.stdout[-4000:]
    assert "resuming after round 2" in res.stdout
    resumed = metrics(out)
    assert [r["round"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == records


def test_bad_config_fails_before_any_process_group(setup, tmp_path):
    res = torchrun(3, [*common_args(setup, tmp_path / "bad"), "split.cut_layers=[1,4]"])
    assert res.returncode != 0
    assert "split.cut_layers[1]=4" in res.stdout and "1..3" in res.stdout
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_forced_replan_moves_layers_and_the_loss_is_continuous(setup, tmp_path):
    """split.schedule moves client 1 from cut 1 to 3 and client 2 from 3 to 1 after round 1; the model
    evaluated right after the move is the same function as before it, and training goes on."""
    out = tmp_path / "move"
    args = [
        *common_args(setup, out),
        "split.cut_layers=[1,3]",
        "train.local_steps=6",
        "split.schedule={1: [3, 1]}",
        "runtime.debug=true",
    ]
    res = launch(3, [*args, "train.rounds=2"])
    assert res.returncode == 0, res.stdout[-4000:]
    records = metrics(out)
    assert [r["cut_layers"] for r in records] == [{"1": 1, "2": 3}, {"1": 3, "2": 1}]
    plan = records[0]["plan"]
    assert plan["next_cut_layers"] == {"1": 3, "2": 1}
    assert abs(plan["eval_loss_after_move"] - records[0]["eval_loss"]) < 1e-5
    assert records[1]["eval_loss"] < records[0]["eval_loss"]  # it keeps training after the move
    # Only each side's layers are held: client 1 grew to three layers, client 2 shrank to one.
    mb = [{r: c["stage_param_mb"] for r, c in rec["clients"].items()} for rec in records]
    assert mb[1]["1"] > mb[0]["1"] and mb[1]["2"] < mb[0]["2"]
    for rec in records:
        for c in rec["clients"].values():
            assert c["predicted_time_s"] > 0 and c["train_time_s"] > 0
    assert (out / "profiles.json").is_file()

    # Resume after the move: the checkpoint's plan, not the configured cuts, is the one in force.
    res = launch(3, [*args, "train.rounds=3", "runtime.resume=true"])
    assert res.returncode == 0, res.stdout[-4000:]
    assert metrics(out)[2]["cut_layers"] == {"1": 3, "2": 1}


@pytest.mark.parametrize("shape", ["gpt2-small", "opt-125m"])
def test_dropout_checkpoint_split_matches_unsplit(tmp_path, setup, shape):
    """GPT-2 small and OPT-125m shapes carry dropout 0.1 (and here LoRA dropout 0.1 too): a one-client
    split run draws its masks below the cut from the client's generator and above it from the server's,
    and launch.train_local draws the same way for that cut, so the losses still match step for step."""
    from runtime.config import load_config
    from runtime.local import run_local
    from tests.random_models import save_checkpoint_shaped

    model = save_checkpoint_shaped(shape, tmp_path / "model")
    args = [
        *common_args(setup, tmp_path / "split")[1:],
        f"model.path={model}",
        "train.rounds=2",
        "train.local_steps=4",
        "lora.r_cut=8",
        "split.cut_layers=2",
        "lora.dropout=0.1",
    ]
    split = launch(2, ["torchrun_configs/tiny_cpu.yaml", *args])
    assert split.returncode == 0, split.stdout[-4000:]
    local_args = [*args, f"output_dir={tmp_path / 'local'}"]
    local = run_local(load_config("torchrun_configs/tiny_cpu.yaml", local_args))
    split_losses = [x for r in metrics(tmp_path / "split") for x in r["clients"]["1"]["step_losses"]]
    local_losses = [x for r in local for x in r["clients"]["local"]["step_losses"]]
    assert len(split_losses) == len(local_losses) == 8
    assert max(abs(a - b) for a, b in zip(split_losses, local_losses)) < 1e-4
    # Without the per-rank streams the masks differ and so do the losses (what the reference fixes).
    plain = run_local(
        load_config(
            "torchrun_configs/tiny_cpu.yaml",
            [*local_args[:-1], f"output_dir={tmp_path / 'p'}", "split.cut_layers=[1,2]"],
        )
    )
    plain_losses = [x for r in plain for x in r["clients"]["local"]["step_losses"]]
    assert max(abs(a - b) for a, b in zip(split_losses, plain_losses)) > 1e-3
