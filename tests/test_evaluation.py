"""The ``eval`` section: evaluation every k rounds, each client's loss on its own held-back samples, greedy
decoding through the split scored by exact match and ROUGE-L, and the metrics in TensorBoard.

The whole-run test runs a one-client split run as processes of the test (``tests/ranks.py``) and the
unsplit reference in this process, and compares what both evaluated.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from models.datasets import IGNORE_INDEX, load_examples
from models.generate import greedy_decode, lcs_length, prompt_and_reference, rouge_l
from models.tiny import build_char_tokenizer, generate_examples, write_jsonl
from runtime.config import ConfigError, fingerprint, load_config
from runtime.job import federation_data, hold_out
from runtime.metrics import round_record, row, scalars
from tests.random_models import save_random_model
from tests.ranks import run_ranks

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "torchrun_configs/tiny_cpu.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("evaluation")
    model = save_random_model("llama", root / "model", n_layers=4, hidden=64)
    write_jsonl(generate_examples("sort", 160, 0), root / "train.jsonl")
    write_jsonl(generate_examples("sort", 32, 1), root / "eval.jsonl")
    (root / "eval.txt").write_text("".join(f"line {i} of plain text\n" for i in range(16)))
    return {
        "model": str(model),
        "train": str(root / "train.jsonl"),
        "eval": str(root / "eval.jsonl"),
        "text": str(root / "eval.txt"),
    }


def _args(files: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={files['model']}",
        f"data.train_path={files['train']}",
        f"data.eval_path={files['eval']}",
        f"output_dir={out}",
        "data.min_samples=8",
        "data.max_eval_samples=32",
        "train.eval_batch_size=16",
        "runtime.rpc_timeout_s=120",
        *extra,
    ]


# ---------------------------------------------------------------------- scores and decoding


def test_rouge_l_matches_the_rouge_score_packages_documented_example():
    # rouge-score's README: scorer.score('The quick brown fox jumps over the lazy dog',
    # 'The quick brown dog jumps on the log.') gives rougeL precision 0.625, recall 0.5556, F 0.5882
    target, prediction = (
        "The quick brown fox jumps over the lazy dog",
        "The quick brown dog jumps on the log.",
    )
    assert rouge_l(prediction, target) == pytest.approx(0.5882352941176471, abs=1e-12)
    assert rouge_l(" 1 2 3", "1 2 3") == 1.0
    assert rouge_l("", "1 2") == 0.0
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (CLRS)
    assert lcs_length([], [1]) == 0


def test_greedy_decoding_in_a_batch_equals_one_prompt_at_a_time(files):
    """Right-padded rows of different lengths decode as they would alone; decoding stops at eos and at
    max_new_tokens; the prompt and the reference come from the example's labels."""
    from models.stages import full_model

    model = full_model(files["model"]).eval()
    tok = build_char_tokenizer()
    examples = load_examples(Path(files["eval"]), tok, 128, "auto")[:5]
    pairs = [prompt_and_reference(e, tok.eos_token_id) for e in examples]
    for e, (prompt, ref) in zip(examples, pairs):
        assert list(e.input_ids) == prompt + ref + [tok.eos_token_id]
        assert e.labels[len(prompt) - 1] == IGNORE_INDEX != e.labels[len(prompt)]
    calls = []

    def next_tokens(ids, mask, last):
        calls.append(ids.shape[0])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        return logits[torch.arange(len(last)), last].argmax(-1)

    prompts = [p for p, _ in pairs]
    batch = greedy_decode(next_tokens, prompts, tok.eos_token_id, tok.pad_token_id, 6, 128)
    alone = [greedy_decode(next_tokens, [p], tok.eos_token_id, tok.pad_token_id, 6, 128)[0] for p in prompts]
    assert batch == alone
    assert all(len(out) <= 6 for out in batch) and any(len(out) == 6 for out in batch)
    eos_first = lambda ids, mask, last: torch.full((len(last),), tok.eos_token_id)
    assert greedy_decode(eos_first, prompts, tok.eos_token_id, tok.pad_token_id, 6, 128) == [[]] * 5
    short = greedy_decode(next_tokens, prompts, tok.eos_token_id, tok.pad_token_id, 50, len(prompts[0]) + 2)
    assert len(short[0]) <= 2  # never past max_len tokens in all


# ---------------------------------------------------------------------- held-back data, bad input


def test_each_clients_hold_out_is_seeded_by_client_and_independent_of_the_workers(files, tmp_path):
    cfg = load_config(CONFIG, _args(files, tmp_path, "eval.client_fraction=0.25"))
    plain = federation_data(load_config(CONFIG, _args(files, tmp_path)), Path(files["model"]), 4, 0, 1)
    one = federation_data(cfg, Path(files["model"]), 4, 0, 1)
    two = federation_data(cfg, Path(files["model"]), 4, 1, 2)
    assert one.shards == two.shards and one.heldout == two.heldout
    for c in range(1, 5):
        whole = plain.shards[c]
        assert sorted(one.shards[c] + one.heldout[c]) == sorted(whole)
        assert not set(one.shards[c]) & set(one.heldout[c])
        assert len(one.heldout[c]) == max(1, round(0.25 * len(whole)))
        assert one.client(c).heldout == one.heldout[c]
    other_seed = load_config(CONFIG, _args(files, tmp_path, "eval.client_fraction=0.25", "seed=1"))
    assert hold_out(list(range(40)), 0.25, 1, 1) != hold_out(list(range(40)), 0.25, 0, 1)
    assert hold_out(list(range(40)), 0.25, 0, 1) != hold_out(list(range(40)), 0.25, 0, 2)
    assert fingerprint(other_seed, 4)["eval.client_fraction"] == 0.25
    assert "eval.client_fraction" not in fingerprint(load_config(CONFIG, _args(files, tmp_path)), 4)


@pytest.mark.parametrize(
    "extra, said",
    [
        (["eval.every=0"], "eval.every=0: must be >= 1"),
        (["eval.client_fraction=1.0"], "eval.client_fraction=1.0: must be in [0, 1)"),
        (["eval.generate=-1"], "eval.generate=-1: must be >= 0"),
        (["eval.max_new_tokens=0"], "eval.max_new_tokens=0: must be >= 1"),
    ],
)
def test_an_eval_setting_out_of_range_is_one_line_naming_it(files, tmp_path, extra, said):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, _args(files, tmp_path, *extra))
    assert said in str(e.value) and "\n" not in str(e.value)


def test_tensorboard_without_its_package_is_one_line_naming_the_package_and_the_pip_command(
    files, tmp_path, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "tensorboardX" else real(name)
    )
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, _args(files, tmp_path, "runtime.tensorboard=true"))
    assert str(e.value).startswith("runtime.tensorboard=true needs the tensorboardX package")
    assert "pip install 'tensorboardX==2.6.5'" in str(e.value)
    load_config(CONFIG, _args(files, tmp_path, "runtime.tensorboard=false"))


def test_a_hold_out_that_leaves_no_training_data_and_generation_without_responses_are_data_errors(
    files, tmp_path
):
    model = Path(files["model"])
    with pytest.raises(ConfigError) as e:
        hold_out([3, 5], 0.8, 0, 2)
    assert str(e.value).startswith("eval.client_fraction=0.8 leaves client 2 without training data")
    assert "lower eval.client_fraction" in str(e.value)
    cfg = load_config(CONFIG, _args(files, tmp_path, f"data.eval_path={files['text']}", "eval.generate=4"))
    with pytest.raises(ConfigError) as e:
        federation_data(cfg, model, 2, 0, 1)
    assert str(e.value).startswith("eval.generate=4 decodes the response of eval prompts, but data.eval_path")
    assert "set eval.generate=0" in str(e.value)


@pytest.mark.parametrize(
    "extra, kind, said",
    [
        (["eval.every=0"], "config", "eval.every=0: must be >= 1"),
        (
            ["eval.client_fraction=0.999"],
            "data",
            "eval.client_fraction=0.999 leaves client 1 without training",
        ),
        (
            ["eval.generate=4", "data.eval_path={text}"],
            "data",
            "eval.generate=4 decodes the response of eval",
        ),
    ],
    ids=["every", "client_fraction", "generate_without_responses"],
)
def test_the_launch_says_a_bad_eval_setting_in_one_line_and_keeps_the_checkpoint(
    files, tmp_path, monkeypatch, capsys, extra, kind, said
):
    """As tests/test_bad_input.py checks its rows: launch.train's entry point on rank 0 for a config error, on
    a worker for a data error (rank 1 reads the data before any process group), exit code 2, one line, an
    existing checkpoint untouched."""
    from launch.train import main as train_main
    from tests.test_bad_input import _existing_checkpoint, _snapshot

    argv = [
        CONFIG,
        *_args(files, tmp_path / "out", "split.cut_layers=1", *(e.format(**files) for e in extra)),
    ]
    saved = _existing_checkpoint(argv, 1)
    before = _snapshot(saved.parent)
    monkeypatch.setenv("RANK", "0" if kind == "config" else "1")  # the rank that says it
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("SPLITFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{kind} error: {said}"), lines
    assert _snapshot(saved.parent) == before


# ---------------------------------------------------------------------- metrics rows and TensorBoard


def test_a_round_not_evaluated_has_no_eval_fields_and_still_prints():
    rec = round_record(2, 1.0, 1.0, 0.5, None, 100.0, cut_layers={}, comm_bytes={})
    assert not [k for k in rec if k.startswith("eval")]
    assert row(rec).split()[2:5] == ["-", "-", "-"]
    rec = round_record(2, 1.0, 1.0, 0.5, (1.0, 0.5, 10.0), 100.0, cut_layers={}, comm_bytes={})
    assert rec["eval_loss"] == 1.0 and rec["eval_tokens"] == 10


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under ``folder``, read with tensorboardX's Event
    protobuf from the TFRecord framing (length, CRC, record, CRC): tag -> step -> value."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


# ---------------------------------------------------------------------- a whole run, split and unsplit


def test_a_split_run_evaluates_as_the_unsplit_reference_and_tensorboard_has_its_scalars(files, tmp_path):
    """One client cut at 2, three rounds, eval.every=2 (round 1 is skipped, round 3 is the last), a held-back
    fifth of the client's shard, eight prompts decoded: the split run and launch.train_local record the
    same eval losses, per-client losses and generation scores, before training and after. The split run's
    TensorBoard event files hold every scalar of its metrics.jsonl."""
    from runtime.local import run_local

    settings = [
        "split.cut_layers=2",
        "lora.r_cut=8",
        "train.rounds=3",
        "train.local_steps=4",
        "train.lr=0.01",
        "eval.every=2",
        "eval.client_fraction=0.2",
        "eval.generate=8",
        "eval.max_new_tokens=24",
    ]
    split_out, local_out = tmp_path / "split", tmp_path / "local"
    res = run_ranks(
        2, [CONFIG, *_args(files, split_out, *settings, "runtime.tensorboard=true")], tmp_path / "l"
    )
    assert res.codes == [0, 0], res.log[-6000:]
    local = run_local(load_config(CONFIG, _args(files, local_out, *settings)))
    split = [json.loads(line) for line in (split_out / "metrics.jsonl").read_text().splitlines()]

    assert [("eval_loss" in r, "generation" in r, "client_eval" in r) for r in split] == [
        (False, False, False),
        (True, True, True),
        (True, True, True),
    ]
    assert [("eval_loss" in r) for r in local] == [False, True, True]
    baselines = [json.loads((out / "baseline.json").read_text()) for out in (split_out, local_out)]
    for a, b in [*zip(split[1:], local[1:]), baselines]:
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-4)
        assert a["client_eval"].keys() == b["client_eval"].keys() == {"1"}
        assert a["client_eval"]["1"]["eval_tokens"] == b["client_eval"]["1"]["eval_tokens"] > 0
        assert a["client_eval"]["1"]["eval_loss"] == pytest.approx(
            b["client_eval"]["1"]["eval_loss"], abs=1e-4
        )
        assert a["client_eval"]["1"]["eval_loss"] != pytest.approx(a["eval_loss"], abs=1e-6)  # its own data
        ga, gb = a["generation"], b["generation"]
        assert ga["samples"] == gb["samples"] == 8
        assert (ga["exact_match"], ga["rouge_l"]) == pytest.approx(
            (gb["exact_match"], gb["rouge_l"]), abs=1e-9
        )
        assert 0 <= ga["exact_match"] <= ga["rouge_l"] <= 1 and ga["time_s"] > 0
    # the held-back samples are not trained on: of the one client's 160 samples, 32 are held back
    assert "1 clients with [128] training samples" in res.logs[0]

    # launch.report copes with rounds not evaluated, and says the generation scores before and after
    from launch.report import write_comparison, write_report

    summary = (write_report(split_out) / "summary.md").read_text()
    g0, g3 = baselines[0]["generation"], split[-1]["generation"]
    assert f"exact match {g0['exact_match']:.3f} (base model) -> {g3['exact_match']:.3f}" in summary
    _, table = write_comparison([split_out, local_out], tmp_path / "compare")
    assert f"| 3 | {split[-1]['eval_loss']:.4f} |" in table

    board = read_scalars(split_out / "tensorboard")
    expected = {(tag, r["round"]): v for r in split for tag, v in scalars(r)}
    assert {(tag, step): v for tag, steps in board.items() for step, v in steps.items()} == pytest.approx(
        expected, rel=1e-6
    )
    assert ("generation/exact_match", 2) in expected and ("eval_loss", 1) not in expected


def test_three_clients_on_one_or_three_workers_hold_back_and_decode_the_same(files, tmp_path):
    """Three clients (cuts 1, 2, 3) on three workers (one each) and on one worker (re-cut to each client in
    turn): the same held-back samples (drawn from the seed and the client id), so the same per-client eval
    losses, and the same decoded responses, within 1e-5."""
    fed = [
        "split.clients=3",
        "split.cut_layers=[1,2,3]",
        "train.rounds=1",
        "train.local_steps=2",
        "eval.client_fraction=0.2",
        "eval.generate=6",
        "eval.max_new_tokens=16",
    ]
    runs = {}
    for m in (3, 1):
        out = tmp_path / f"m{m}"
        res = run_ranks(m + 1, [CONFIG, *_args(files, out, *fed)], tmp_path / f"logs-m{m}")
        assert res.codes == [0] * (m + 1), res.log[-6000:]
        runs[m] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    a, b = runs[3], runs[1]
    assert a["client_eval"].keys() == b["client_eval"].keys() == {"1", "2", "3"}
    for c in ("1", "2", "3"):
        assert a["client_eval"][c]["eval_tokens"] == b["client_eval"][c]["eval_tokens"] > 0
        assert a["client_eval"][c]["eval_loss"] == pytest.approx(b["client_eval"][c]["eval_loss"], abs=1e-5)
    assert len({a["client_eval"][c]["eval_loss"] for c in ("1", "2", "3")}) == 3  # each on its own data
    assert a["generation"]["samples"] == b["generation"]["samples"] == 6
    assert a["generation"]["rouge_l"] == pytest.approx(b["generation"]["rouge_l"], abs=1e-9)


def test_under_adaptive_a_round_not_evaluated_adds_no_eval_loss_and_a_moves_guard_waits_for_one(random_model):
    """The eval-loss guard of a move (revert it if the next eval loss rose) skips rounds eval.every does
    not evaluate: it decides on the next evaluated round's loss."""
    from partition.planner import Measured
    from tests.test_scheduler import _profile, _scheduler

    slow_server = _profile(layer_time_s=0.5, layer_cpu_s=0.5, head_time_s=0.01, head_cpu_s=0.01, host="s")
    s = _scheduler(
        random_model,
        ["split.policy=adaptive", "split.replan_every=1", "split.plateau=0"],
        [_profile(host="a"), _profile(host="b")],
        slow_server,
    )
    cuts = s.initial()
    fast = Measured(compute_s=0.3, server_s=0.51, step_s=0.85, train_time_s=5.0, train_loss=1.0)
    slow = Measured(compute_s=9.0, server_s=0.51, step_s=9.6, train_time_s=50.0, train_loss=1.0)
    new, rnd = None, 0
    while new is None and rnd < 5:
        rnd += 1
        new = s.after_round(rnd, cuts, [fast, slow], 1.0)
    assert new is not None and new != cuts
    losses = s.state_dict()["eval_losses"]
    assert s.after_round(rnd + 1, new, [fast, slow], None) is None  # not evaluated: no verdict yet
    assert s.state_dict()["eval_losses"] == losses and s.adaptive.pending
    assert s.after_round(rnd + 2, new, [fast, slow], 2.0) == cuts  # the loss rose: the move is undone
    assert s.reason["rule"] == "revert"
