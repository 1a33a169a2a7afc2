"""Heterogeneous ranks end to end (real RPC, gloo; ranks of ``tests.ranks.launch``): stack keeps one
merged base at every holder through a move and a resume, and each round's eval loss is the loss of the
exported model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from models.datasets import eval_batches
from models.loss import token_stats
from models.stages import full_model
from runtime.checkpoint import merged_weights, rounds
from runtime.config import load_config
from runtime.job import client_data
from tests.ranks import launch
from tests.test_distributed import common_args, metrics, setup  # noqa: F401 (fixture)


def exported_eval_loss(model: torch.nn.Module, args: list[str], model_path) -> float:
    """The eval loss of a plain HF model on the run's whole held-out set, as one process computes it."""
    cfg = load_config(args[0], args[1:])
    data = client_data(cfg, model_path, 0, 1)
    totals = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for b in eval_batches(data.eval_examples, data.eval_indices, 16, data.pad_id):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            totals += torch.stack([t.double() for t in token_stats(logits, b["labels"])])
    return float(totals[0] / totals[1])


def _holders_agree(folder) -> int:
    """Every module's merged weight is bit-identical at every rank that holds it; returns the checks made."""
    seen: dict[str, torch.Tensor] = {}
    checks = 0
    for path in sorted(folder.glob("merged_rank*.safetensors")):
        for name, w in load_file(str(path)).items():
            if name in seen:
                assert torch.equal(seen[name], w), f"{name} differs at {path.name}"
                checks += 1
            seen[name] = w
    return checks


def test_stack_keeps_one_merged_base_through_a_move_and_a_resume(setup, tmp_path):  # noqa: F811
    out = tmp_path / "stack"
    args = [
        *common_args(setup, out),
        "train.aggregation=stack",
        "split.cut_layers=[1,3]",
        "lora.r=8",
        "lora.r_cut=4",
        "lora.client_ranks=[2,8]",
        "train.local_steps=6",
        "split.schedule={1: [3, 1]}",
        "runtime.debug=true",
    ]
    res = launch(3, [*args, "train.rounds=2"])
    assert res.returncode == 0, res.stdout[-4000:]
    records = metrics(out)
    assert [r["cut_layers"] for r in records] == [{"1": 1, "2": 3}, {"1": 3, "2": 1}]
    # The move keeps the function, and every holder of a layer has the same merged weights after it.
    assert abs(records[0]["plan"]["eval_loss_after_move"] - records[0]["eval_loss"]) < 1e-5
    assert _holders_agree(out / "debug" / "round1") > 0
    assert _holders_agree(out / "debug" / "round2") > 0
    assert records[1]["eval_loss"] < records[0]["eval_loss"]

    res = launch(3, [*args, "train.rounds=3", "runtime.resume=true"])
    assert res.returncode == 0, res.stdout[-4000:]
    assert "resuming after round 2" in res.stdout
    assert _holders_agree(out / "debug" / "round3") > 0
    final = metrics(out)[2]

    # The eval loss is the exported model's: launch.export writes the merged HF model, loaded plainly.
    export = subprocess.run(
        [sys.executable, "-m", "launch.export", str(out), "--merged", str(tmp_path / "merged")]
        + ["--adapter-rank", "4", "--adapter", str(tmp_path / "delta")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stdout + export.stderr
    assert "relative error" in export.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    merged = merged_weights(out / "checkpoint", 3)
    for name, w in merged.items():
        assert torch.equal(model.get_submodule(name).weight, w)
    assert abs(exported_eval_loss(model, args, setup["model"]) - final["eval_loss"]) < 1e-5
    # the optional low-rank adapter of the total delta loads with PEFT and applies a change
    delta = PeftModel.from_pretrained(full_model(setup["model"]), str(tmp_path / "delta"))
    assert abs(exported_eval_loss(delta, args, setup["model"]) - final["eval_loss"]) < 0.5
    assert len(rounds(out / "checkpoint")) == 2


@pytest.mark.parametrize("rule", ["fedavg", "svd"])
def test_importance_selection_and_client_ranks_evaluate_the_exported_adapter(
    setup,  # noqa: F811
    tmp_path,
    rule,
):
    """Importance-chosen weights at half the uniform budget, clients of ranks 2 and 8 cut at 1 and 3:
    the eval loss is the exported PEFT adapter's loss, not an average of the clients' truncated copies,
    and the selection is in the metrics and the adapter's config."""
    out = tmp_path / rule
    args = [
        *common_args(setup, out),
        f"train.aggregation={rule}",
        "split.cut_layers=[1,3]",
        "lora.r=8",
        "lora.r_cut=4",
        "lora.client_ranks=[2,8]",
        "lora.selection=importance",
        "lora.budget=0.5",
        "lora.warmup_steps=3",
        "train.local_steps=6",
        "train.rounds=2",
    ]
    res = launch(3, args)
    assert res.returncode == 0, res.stdout[-4000:]
    records = metrics(out)
    final = records[-1]
    chosen = records[0]["lora_selection"]
    assert 0 < chosen["trainable_params"] <= chosen["budget_params"] == 0.5 * chosen["uniform_params"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(chosen["ranks"])
    assert (
        json.loads((out / "adapter" / "selection.json").read_text())["ranks"].keys() >= chosen["ranks"].keys()
    )
    model = PeftModel.from_pretrained(full_model(setup["model"]), str(out / "adapter"))
    assert abs(exported_eval_loss(model, args, setup["model"]) - final["eval_loss"]) < 1e-5
