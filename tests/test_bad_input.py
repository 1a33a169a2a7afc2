"""Every bad input in docs/bad-input.md's table: one clear message naming the problem and the fix, exit
code 2, no traceback, and a checkpoint already in output_dir left exactly as it was.

Most errors are found before any process group starts, so most rows call the launch entry point
in this process with torchrun's environment (``RANK``, ``WORLD_SIZE``) set; a few go through the
real command line or real torchrun (a YAML error, a BERT folder, a weightless folder under
torchrun with three ranks, a diverging run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.train import main as train_main
from models.tiny import build_char_tokenizer, generate_examples, write_jsonl
from runtime import checkpoint
from runtime.config import ConfigError, fingerprint, load_config
from tests.test_distributed import metrics, torchrun

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, random_model) -> dict[str, Path]:
    """Good and bad model folders, data files and config files, made once."""
    from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPTJConfig, PreTrainedTokenizerFast

    from tests.random_models import random_config

    root = tmp_path_factory.mktemp("bad_inputs")
    good = random_model("llama")
    p = {"model": good, "root": root}
    write_jsonl(generate_examples("sort", 64, 0), root / "train.jsonl")
    p["train"] = root / "train.jsonl"

    bert = root / "bert"
    BertModel(
        BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    ).save_pretrained(bert)
    build_char_tokenizer().save_pretrained(bert)
    p["bert"] = bert
    gptj = root / "gptj"
    GPTJConfig(n_layer=2, n_embd=32, n_head=2, rotary_dim=8).save_pretrained(gptj)
    p["gptj"] = gptj
    odd = root / "odd_type"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "no-such-model", "num_hidden_layers": 2}))
    p["odd_type"] = odd
    for name, keep in (
        ("weightless", ("config.json", "tokenizer.json", "tokenizer_config.json")),
        ("no_tokenizer", ("config.json", "model.safetensors")),
    ):
        folder = root / name
        folder.mkdir()
        for f in keep:
            shutil.copy(good / f, folder / f)
        p[name] = folder
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a copy cut short
    p["truncated"] = truncated
    other_config = root / "other_config"  # weights of one size beside the config.json of another
    shutil.copytree(good, other_config)
    config = json.loads((other_config / "config.json").read_text())
    (other_config / "config.json").write_text(
        json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]})
    )
    p["other_config"] = other_config
    small_vocab = root / "small_vocab"  # a tokenizer with more ids than the embedding has rows
    AutoModelForCausalLM.from_config(random_config("llama", hidden=32, vocab=8)).save_pretrained(small_vocab)
    build_char_tokenizer().save_pretrained(small_vocab)
    p["small_vocab"] = small_vocab
    p["gpt2"] = random_model("gpt2")  # learned positions: 256
    no_pad = root / "no_pad_no_eos"
    shutil.copytree(good, no_pad, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    tok = build_char_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, unk_token="<unk>").save_pretrained(no_pad)
    p["no_pad_no_eos"] = no_pad

    (root / "empty.jsonl").write_text("\n\n")
    (root / "malformed.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "keys.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    (root / "bad.yaml").write_text("train:\n  rounds: 3\n  lr: [1, 2\nsplit:\n  cut_layers: 1\n")
    return p


# (id, extra args, rank, world size, what the message must say). {name} is replaced by inputs[name].
ROWS = [
    ("unknown key", ["train.roundz=3"], 0, 2, ["unknown config key train.roundz", "'rounds'"]),
    ("wrong type", ["train.rounds=three"], 0, 2, ["train.rounds: 'three' is not a int"]),
    ("out of range", ["train.lr=-1"], 0, 2, ["train.lr=-1.0: must be > 0"]),
    ("r_cut above r", ["lora.r_cut=16"], 0, 2, ["lora.r_cut=16: must be in 1..lora.r (8)"]),
    ("unknown choice", ["split.policy=fastest"], 0, 2, ["split.policy='fastest'", "adaptive"]),
    ("override not key=value", ["train.rounds"], 0, 2, ["'train.rounds' is not key=value"]),
    (
        "override not YAML",
        ["split.cut_layers=[1,2"],
        0,
        2,
        ["override 'split.cut_layers=[1,2'", "not valid YAML"],
    ),
    ("YAML syntax error", ["@{root}/bad.yaml"], 0, 2, ["bad.yaml:4:", "YAML syntax error", "line 3"]),
    ("config file missing", ["@{root}/nowhere.yaml"], 0, 2, ["nowhere.yaml", "does not exist"]),
    ("no client rank", [], 0, 1, ["WORLD_SIZE=1", "at least one client"]),
    (
        "cuts vs clients",
        ["split.cut_layers=[1,2,3]"],
        0,
        3,
        ["3 entries for 2 clients", "--nproc_per_node=4"],
    ),
    (
        "split.clients vs world",
        ["split.clients=1"],
        0,
        3,
        ["split.clients=1 but torchrun started 2 client ranks (workers)", "--nproc_per_node=2"],
    ),
    ("cut out of range", ["split.cut_layers=4"], 0, 2, ["split.cut_layers[0]=4", "cut must be in 1..3"]),
    ("simulate list length", ["simulate.slowdown=[1,2,3]"], 0, 2, ["simulate.slowdown has 3 entries for 1"]),
    ("model folder missing", ["model.path={root}/nowhere"], 0, 2, ["model.path=", "no config.json"]),
    (
        "not a causal LM",
        ["model.path={bert}"],
        0,
        2,
        ["model_type 'bert' is not a causal LM", "gpt2, gpt_neo"],
    ),
    (
        "unsupported causal LM",
        ["model.path={gptj}"],
        0,
        2,
        ["model_type 'gptj' is a causal LM family not supported"],
    ),
    ("unknown model_type", ["model.path={odd_type}"], 0, 2, ["config.json cannot be read", "no-such-model"]),
    ("model without weights", ["model.path={weightless}"], 0, 2, ["no model.safetensors", "save_pretrained"]),
    ("damaged weights", ["model.path={truncated}"], 0, 2, ["model.safetensors is damaged", "copy it again"]),
    (
        "weights and config.json disagree",
        ["model.path={other_config}"],
        0,
        2,
        ["the weights do not match config.json", "mlp.gate_proj.weight is [", "by config.json", "more)"],
    ),
    (
        "tokenizer beyond the embedding",
        ["model.path={small_vocab}"],
        0,
        2,
        ["the tokenizer has", "embedding only 8 rows", "use the tokenizer saved with this model"],
    ),
    (
        "sequences beyond learned positions",
        ["model.path={gpt2}", "data.max_seq_len=512"],
        0,
        2,
        ["data.max_seq_len=512 is longer than the 256 positions", "data.max_seq_len=256 or less"],
    ),
    (
        "stall timeout NaN",
        ["runtime.stall_timeout_s=.nan"],
        0,
        2,
        ["runtime.stall_timeout_s=nan: must be a finite"],
    ),
    (
        "model without tokenizer",
        ["model.path={no_tokenizer}"],
        0,
        2,
        ["no usable tokenizer", "save_pretrained"],
    ),
    (
        "tokenizer without pad or eos",
        ["model.path={no_pad_no_eos}"],
        0,
        2,
        ["neither a pad nor an eos token"],
    ),
    ("unknown LoRA targets", ["lora.targets=[wq]"], 0, 2, ["lora.targets=['wq'] match no module", "q_proj"]),
    ("device not there", ["runtime.device=cuda"], 0, 2, ["runtime.device=cuda", "no usable CUDA device"]),
    (
        "data file missing",
        ["data.train_path={root}/nowhere.jsonl"],
        1,
        2,
        ["data.train_path=", "no such file"],
    ),
    ("empty data", ["data.train_path={root}/empty.jsonl"], 1, 2, ["empty.jsonl: empty dataset"]),
    (
        "malformed JSONL",
        ["data.train_path={root}/malformed.jsonl"],
        1,
        2,
        ["malformed.jsonl:2: invalid JSON"],
    ),
    ("not UTF-8", ["data.train_path={root}/latin1.txt"], 1, 2, ["latin1.txt: not valid UTF-8", "re-encode"]),
    (
        "unknown JSONL fields",
        ["data.train_path={root}/keys.jsonl"],
        1,
        2,
        ["cannot detect the dataset format"],
    ),
    (
        "too few samples a client",
        ["data.min_samples=100"],
        1,
        3,
        ["client 1 received", "min_samples=100", "data.alpha"],
    ),
    ("responses cut off", ["data.max_seq_len=4"], 1, 2, ["no response token fits in max_seq_len=4"]),
]


def _argv(inputs: dict[str, Path], extra: list[str], out: Path) -> list[str]:
    fill = lambda s: s.format(**{k: str(v) for k, v in inputs.items()})
    config = next((fill(e)[1:] for e in extra if e.startswith("@")), "torchrun_configs/tiny_cpu.yaml")
    return [
        config,
        f"model.path={inputs['model']}",
        f"data.train_path={inputs['train']}",
        f"data.eval_path={inputs['train']}",
        f"output_dir={out}",
        "split.cut_layers=1",
        *(fill(e) for e in extra if not e.startswith("@")),
    ]


def _existing_checkpoint(argv: list[str], n_clients: int) -> Path:
    """A checkpoint of an earlier run of the same settings (so resuming it would be allowed)."""
    try:
        cfg = load_config(argv[0], argv[1:])
        fp = fingerprint(cfg, n_clients)
    except ConfigError:
        fp = {}
    out = next(Path(a.split("=", 1)[1]) for a in argv if a.startswith("output_dir="))
    return checkpoint.save(out / "checkpoint", 1, torch.arange(6.0), {"round": 1, "fingerprint": fp}, keep=2)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gets_one_clear_message(row, inputs, tmp_path, monkeypatch, capsys):
    _, extra, rank, world, expected = row
    argv = _argv(inputs, extra, tmp_path / "out")
    saved = _existing_checkpoint(argv, world - 1)
    before = _snapshot(saved.parent)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("SPLITFT_CACHE", str(tmp_path / "cache"))  # nothing builds the built-in model
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one message, no traceback
    assert lines[0].split(" error: ")[0] in ("config", "data"), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    assert _snapshot(saved.parent) == before


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "2"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("extra", [["@{root}/bad.yaml"], ["model.path={bert}"]], ids=["yaml", "bert"])
def test_real_command_line_prints_one_line(inputs, tmp_path, extra):
    res = _cli("launch.train", *_argv(inputs, extra, tmp_path / "out"))
    assert res.returncode == 2
    assert [line for line in res.stderr.splitlines() if line.strip() and "Warning" not in line][0].startswith(
        "config error: "
    )
    assert res.stderr.count("config error: ") == 1 and "Traceback" not in res.stderr


def test_weightless_model_under_torchrun_is_one_message_from_three_ranks(inputs, tmp_path):
    """Every rank finds the problem before any process group; torchrun's failure summary shows the message
    where a traceback would be, rank 0 prints it at most once, and no worker prints a traceback. (Rank 0
    prints it unless another rank failed first and torchrun stopped rank 0 before it got there: seen once
    in the full suite.)"""
    res = torchrun(3, _argv(inputs, ["model.path={weightless}"], tmp_path / "out"))
    assert res.returncode != 0
    said = [line for line in res.stdout.splitlines() if line.startswith("config error: ")]
    assert len(said) <= 1 and all("no model.safetensors" in line for line in said)
    summary = [line for line in res.stdout.splitlines() if "traceback : config error: model.path=" in line]
    assert summary and "no model.safetensors" in summary[0]  # torchrun's summary: the message
    assert "launch/train.py" not in res.stdout and "runtime/" not in res.stdout  # no worker frames


def test_diverging_run_stops_naming_round_client_and_step_and_keeps_the_checkpoint(inputs, tmp_path):
    """Round 1 trains normally and is checkpointed; the relaunch with lr 1e30 (the checkpoint's
    fingerprint edited to match) diverges in round 2: every rank stops with the round, the client and
    the step named, exit 2, and the round-1 checkpoint, adapter and metrics stay as they were."""
    out = tmp_path / "run"
    args = [
        *_argv(inputs, ["train.local_steps=3", "train.batch_size=4", "data.max_eval_samples=16"], out),
        "runtime.rpc_timeout_s=120",
    ]
    res = torchrun(2, [*args, "train.rounds=1"])
    assert res.returncode == 0, res.stdout[-3000:]
    (saved,) = checkpoint.rounds(out / "checkpoint")
    state = json.loads((saved / "state.json").read_text())
    state["fingerprint"]["train.lr"] = 1e30
    (saved / "state.json").write_text(json.dumps(state, indent=1))
    before = {name: _snapshot(out / name) for name in ("checkpoint", "adapter")}
    first_metrics = metrics(out)

    res = torchrun(2, [*args, "train.rounds=2", "train.lr=1e30"])
    assert res.returncode != 0
    said = [line for line in res.stdout.splitlines() if line.startswith("training error: ")]
    assert len(said) == 1, res.stdout[-3000:]
    assert "training diverged: client 1 got loss nan at step 2 of round 2" in said[0]
    assert "lower train.lr (now 1e+30)" in said[0] and "the checkpoint of round 1" in said[0]
    assert "launch/train.py" not in res.stdout  # no worker traceback
    assert {name: _snapshot(out / name) for name in ("checkpoint", "adapter")} == before
    assert metrics(out) == first_metrics
