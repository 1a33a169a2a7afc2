"""Export: the global adapter in PEFT form and the merged model give the split model's logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from models.export import save_merged
from models.lora import LoraSpec, add_lora, build_layout, peft_adapter, write_adapter, write_peft_adapter
from models.stages import build_stage, full_model
from runtime import checkpoint
from runtime.config import fingerprint, load_config
from tests.random_models import save_checkpoint_shaped

REPO = Path(__file__).resolve().parent.parent
N_LAYERS, CUT = 4, 2


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    root = tmp_path_factory.mktemp("shaped")
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = save_checkpoint_shaped(name, root / name)
        return cache[name]

    return get


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def _trained_split(model_dir: Path, spec: LoraSpec):
    """Client [0, CUT) and server [CUT, L) stages with LoRA holding a random (non-zero) global adapter."""
    client, server = build_stage(model_dir, 0, CUT), build_stage(model_dir, CUT, N_LAYERS)
    add_lora(client, spec, cut_rank=True)
    add_lora(server, spec, cut_rank=False)
    layout = build_layout(client.config, spec, [CUT])
    flat = torch.randn(layout.numel, generator=torch.Generator().manual_seed(1)) * 0.05
    for stage in (client, server):
        write_adapter(stage.hf, layout, flat)
        stage.eval()
    return client, server, layout, flat


@pytest.mark.parametrize("name", ["gpt2-small", "opt-125m", "qwen2-0.5b"])
def test_exported_adapter_and_merged_model_give_the_split_logits(shaped, tmp_path, name):
    model_dir = shaped(name)
    spec = LoraSpec(r=8, alpha=16.0, r_cut=4, targets=_targets(model_dir))
    client, server, layout, flat = _trained_split(model_dir, spec)
    ids, mask = _batch(client.config.vocab_size)
    with torch.no_grad():
        split = server(hidden=client(input_ids=ids, attention_mask=mask), attention_mask=mask)
    real = mask.bool()

    adapter = write_peft_adapter(
        *peft_adapter(layout, flat, spec, client.config, str(model_dir)), tmp_path / "adapter"
    )
    peft = PeftModel.from_pretrained(full_model(model_dir), str(adapter)).eval()
    merged_dir = save_merged(model_dir, adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = full_model(model_dir).eval()
    with torch.no_grad():
        via_peft = peft(input_ids=ids, attention_mask=mask).logits
        via_merged = merged(input_ids=ids, attention_mask=mask).logits
        via_base = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(via_peft[real], split[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(via_merged[real], split[real], atol=1e-5, rtol=0)
    assert (via_base[real] - split[real]).abs().max() > 1e-3  # the adapter really changes the model
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "config.json").is_file()


def _targets(model_dir: Path) -> tuple[str, ...]:
    from models.families import family_of
    from models.stages import load_config as hf_config

    return family_of(hf_config(model_dir)).lora_targets


def _run_dir(tmp_path: Path, model_dir: Path) -> Path:
    """An output_dir as a one-client run cut at CUT leaves it after round 2: run_config.json, metrics,
    the PEFT adapter (here a random one) and a checkpoint."""
    out = tmp_path / "run"
    cfg = load_config(
        "torchrun_configs/tiny_cpu.yaml",
        [f"model.path={model_dir}", f"output_dir={out}", f"split.cut_layers={CUT}"],
    )
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n" + json.dumps({"round": 2}) + "\n")
    from runtime.job import lora_spec, model_config

    mcfg = model_config(model_dir)
    spec = lora_spec(cfg, mcfg)
    layout = build_layout(mcfg, spec, [CUT])
    flat = torch.randn(layout.numel, generator=torch.Generator().manual_seed(2)) * 0.05
    write_peft_adapter(*peft_adapter(layout, flat, spec, mcfg, str(model_dir)), out / "adapter")
    checkpoint.save(out / "checkpoint", 2, flat, {"round": 2, "fingerprint": fingerprint(cfg, 1)}, keep=2)
    return out


def _export(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "launch.export", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_export_cli_writes_the_adapter_and_a_loadable_merged_model(shaped, tmp_path):
    model_dir = shaped("gpt2-small")
    out = _run_dir(tmp_path, model_dir)
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    res = _export(str(out), "--merged", str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr
    assert "round 2" in res.stdout
    base = full_model(model_dir).eval()
    peft = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids, mask = _batch(merged.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    # nothing in the run's folder changed (the adapter, the checkpoint, the metrics)
    assert {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before

    # A --merged folder that holds something is refused, untouched.
    keep = tmp_path / "taken"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    res = _export(str(out), "--merged", str(keep))
    assert res.returncode == 2
    assert (
        res.stderr.count("export error") == 1 and "not empty" in res.stderr and "Traceback" not in res.stderr
    )
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]


def test_export_of_a_folder_that_is_no_run_or_has_no_adapter_is_refused(tmp_path, shaped):
    res = _export(str(tmp_path))
    assert res.returncode == 2
    assert "no run_config.json" in res.stderr and "Traceback" not in res.stderr
    out = _run_dir(tmp_path, shaped("gpt2-small"))
    shutil.rmtree(out / "adapter")
    res = _export(str(out), "--merged", str(tmp_path / "m"))
    assert res.returncode == 2 and not (tmp_path / "m").exists()
    assert (
        "no adapter in" in res.stderr
        and "did round 1 finish?" in res.stderr
        and "Traceback" not in res.stderr
    )


def test_export_names_the_round_the_adapter_holds_and_skips_a_torn_metrics_line(shaped, tmp_path):
    """A run in progress: metrics.jsonl already has round 3's line (the last one half written) while
    adapter/ still holds round 2 (adapter/splitft.json): the export says round 2, with no JSONDecodeError."""
    out = _run_dir(tmp_path, shaped("gpt2-small"))
    (out / "metrics.jsonl").write_text(
        (out / "metrics.jsonl").read_text() + json.dumps({"round": 3}) + "\n" + '{"round": 4, "ev'
    )
    res = _export(str(out))
    assert res.returncode == 0, res.stderr
    assert "global adapter of round 3 " in res.stdout  # no splitft.json: metrics.jsonl's last complete line
    assert "line 4 is not complete" in res.stderr and "Traceback" not in res.stderr
    (out / "adapter" / "splitft.json").write_text(json.dumps({"round": 2}))
    res = _export(str(out))
    assert res.returncode == 0, res.stderr
    assert "global adapter of round 2 " in res.stdout
