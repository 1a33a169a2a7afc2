"""The U-shaped split (real RPC, gloo; ranks of ``tests.ranks.launch``): labels, token ids and logits
never leave the client, one client still computes what the unsplit model computes, and cuts move under
int8 on the wire."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from runtime.config import load_config
from runtime.local import run_local
from tests.ranks import launch
from tests.test_distributed import common_args, metrics, setup  # noqa: F401 (fixture)

VOCAB_HINT = "last=64"  # hidden size of the test model; its vocabulary is larger


def test_u_shape_one_client_matches_unsplit_and_keeps_labels_home(setup, tmp_path):  # noqa: F811
    settings = [
        "train.rounds=2",
        "train.local_steps=8",
        "lora.r_cut=8",
        "split.cut_layers=2",
        "split.mode=u_shape",
        "split.tail_layers=1",
    ]
    out = tmp_path / "u"
    res = launch(2, [*common_args(setup, out), *settings, "runtime.debug=true"])
    assert res.returncode == 0, res.stdout[-4000:]
    local = run_local(
        load_config("torchrun_configs/tiny_cpu.yaml", [*common_args(setup, tmp_path / "l")[1:], *settings])
    )
    split_losses = [x for r in metrics(out) for x in r["clients"]["1"]["step_losses"]]
    local_losses = [x for r in local for x in r["clients"]["local"]["step_losses"]]
    assert len(split_losses) == len(local_losses) == 16
    assert max(abs(a - b) for a, b in zip(split_losses, local_losses)) < 1e-4
    for a, b in zip(metrics(out), local):
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4
    ours = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(tmp_path / "l" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], ref[key], atol=1e-5, rtol=1e-4)

    # Everything that crossed the wire, both ways: float hidden states (and their gradients) and a mask.
    wire = json.loads((out / "debug" / "wire.json").read_text())["1"]
    kinds = wire["received"] + wire["sent"]
    assert any(k.startswith("torch.float32:3d") for k in wire["received"])  # hidden states up
    assert any(k.startswith("torch.float32:3d") for k in wire["sent"])  # and back down
    for k in kinds:
        kind = k.removeprefix("grad:")
        assert (
            kind == "None"
            or kind.startswith("torch.bool")
            or (kind.startswith("torch.float32:3d") and kind.endswith(VOCAB_HINT))
        ), f"{k}: only hidden states, their gradients and the padding mask may cross"
    last = metrics(out)[-1]
    assert last["clients"]["1"]["server_calls"] == {"u_forward": 8, "backward": 8}
    c = last["comm_bytes"]["1"]
    assert c["activations_up"] > 0 and c["activations_down"] > 0
    assert c["gradients_up"] > 0 and c["gradients_down"] > 0


def test_u_shape_moves_cuts_with_int8_on_the_wire(setup, tmp_path):  # noqa: F811
    out = tmp_path / "move"
    args = [
        *common_args(setup, out),
        "split.mode=u_shape",
        "split.tail_layers=1",
        "split.cut_layers=[1,2]",
        "split.schedule={1: [2, 1]}",
        "wire.dtype=int8",
        "train.local_steps=6",
        "train.rounds=2",
        "runtime.debug=true",
    ]
    res = launch(3, args)
    assert res.returncode == 0, res.stdout[-4000:]
    records = metrics(out)
    assert [r["cut_layers"] for r in records] == [{"1": 1, "2": 2}, {"1": 2, "2": 1}]
    # The same function after the move, up to int8's rounding, which happens at the cut and moved with it
    assert abs(records[0]["plan"]["eval_loss_after_move"] - records[0]["eval_loss"]) < 1e-3
    assert records[1]["eval_loss"] < json.loads((out / "baseline.json").read_text())["eval_loss"]
    for rec in records:
        for rank, c in rec["comm_bytes"].items():
            steps = rec["clients"][rank]["steps"]
            # int8: about a quarter of float32's bytes for each of the four crossings of a step
            per_crossing = (c["activations_down"] + c["gradients_up"] + c["gradients_down"]) / (3 * steps)
            assert c["activations_down"] == c["gradients_down"] == c["gradients_up"]
            assert per_crossing > 0
    wire = json.loads((out / "debug" / "wire.json").read_text())
    for w in wire.values():
        # int8 values packed four to a float32 slot, plus one float32 scale per token: 64 / 4 + 1 = 17
        assert "torch.float32:3d:last=17" in w["received"], w


def test_u_shape_stages_compose_to_the_full_model(random_model):
    """Client bottom [0, k), server [k, L) without norm and head, client tail [L - t, L) with them: the
    same logits as the unsplit model, for a tail of 0 layers (norm and head only) and of 1."""
    from models.stages import build_stage, full_model

    path = random_model("llama")
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = full_model(path).eval()(input_ids=ids, attention_mask=mask).logits
        for tail in (0, 1):
            top = 4 - tail
            bottom, middle = build_stage(path, 0, 2).eval(), build_stage(path, 2, top, head=False).eval()
            head = build_stage(path, top, 4).eval()
            h = middle(hidden=bottom(input_ids=ids, attention_mask=mask), attention_mask=mask)
            assert h.shape[:2] == ids.shape and h.shape[-1] != want.shape[-1]  # hidden states, not logits
            got = head(hidden=h, attention_mask=mask)
            real = mask.bool()
            torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
