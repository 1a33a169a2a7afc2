"""Training recipes on both sides of the split and in the unsplit reference: gradient accumulation,
activation checkpointing and autocast (gradient clipping's parity is in test_distributed).

Each test launches small one-client split runs (``tests.ranks.launch``) with real RPC and distributed
autograd on gloo (the fixtures and helpers of test_distributed) and runs ``launch.train_local``
in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.config import ConfigError, load_config
from runtime.local import run_local
from tests.ranks import launch
from tests.test_distributed import common_args, metrics, setup  # noqa: F401 (setup: a fixture)

CONFIG = "torchrun_configs/tiny_cpu.yaml"


def split_run(setup: dict, out: Path, settings: list[str]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A one-client split run: its step losses and its final adapter."""
    res = launch(2, [*common_args(setup, out), *settings])
    assert res.returncode == 0, res.stdout[-4000:]
    losses = [x for r in metrics(out) for x in r["clients"]["1"]["step_losses"]]
    return losses, load_file(str(out / "adapter" / "adapter_model.safetensors"))


def local_run(setup: dict, out: Path, settings: list[str]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The unsplit reference (launch.train_local) with the same settings."""
    records = run_local(load_config(CONFIG, [*common_args(setup, out)[1:], *settings]))
    losses = [x for r in records for x in r["clients"]["local"]["step_losses"]]
    return losses, load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same(a: tuple, b: tuple, atol: float) -> None:
    """Step losses and adapters equal within ``atol`` (0: bit for bit)."""
    (losses_a, adapter_a), (losses_b, adapter_b) = a, b
    assert len(losses_a) == len(losses_b) > 0
    assert max(abs(x - y) for x, y in zip(losses_a, losses_b)) <= atol, (losses_a, losses_b)
    assert adapter_a.keys() == adapter_b.keys()
    for key in adapter_a:
        torch.testing.assert_close(adapter_a[key], adapter_b[key], atol=atol, rtol=0)


BASE = ["train.rounds=2", "train.local_steps=4", "lora.r_cut=8", "split.cut_layers=2", "data.partition=iid"]


def test_grad_accum_takes_the_steps_of_the_whole_batch(setup, tmp_path):
    """Batch 4 accumulated over 2 micro-batches takes the steps of batch 8 (float32, within 1e-5) on both
    sides of the split and in the unsplit reference: every micro-batch's loss is weighted by its share of
    the step's target tokens (the micro-batches hold different numbers of them), and the server replica
    steps once per 2 forwards."""
    accum, whole = ["train.batch_size=4", "train.grad_accum=2"], ["train.batch_size=8"]
    split_accum = split_run(setup, tmp_path / "sa", [*BASE, *accum])
    split_whole = split_run(setup, tmp_path / "sw", [*BASE, *whole])
    assert_same(split_accum, split_whole, 1e-5)
    local_accum = local_run(setup, tmp_path / "la", [*BASE, *accum])
    local_whole = local_run(setup, tmp_path / "lw", [*BASE, *whole])
    assert_same(local_accum, local_whole, 1e-5)
    assert_same(split_accum, local_accum, 1e-4)  # and the split run is still the unsplit one
    # Not the same as 2 steps of batch 4: the accumulation is what made them equal.
    single = local_run(setup, tmp_path / "l4", [*BASE, "train.batch_size=4"])
    assert max(abs(x - y) for x, y in zip(single[0], local_whole[0])) > 1e-3


def test_u_shape_clips_and_accumulates_as_the_unsplit_model(setup, tmp_path):
    """U-shaped (the loss and the tail on the client), clipping by the chain's norm and 2 micro-batches a
    step together: the split run follows launch.train_local step for step, norms included."""
    settings = [
        *BASE,
        "split.mode=u_shape",
        "split.tail_layers=1",
        "train.max_grad_norm=0.5",
        "train.batch_size=4",
        "train.grad_accum=2",
    ]
    split = split_run(setup, tmp_path / "split", settings)
    local = local_run(setup, tmp_path / "local", settings)
    assert_same(split, local, 1e-4)
    split_norms = [x for r in metrics(tmp_path / "split") for x in r["clients"]["1"]["grad_norms"]]
    local_norms = [x for r in metrics(tmp_path / "local") for x in r["clients"]["local"]["grad_norms"]]
    assert len(split_norms) == len(local_norms) == 8
    assert max(abs(x - y) for x, y in zip(split_norms, local_norms)) < 1e-4 * max(local_norms)
    assert max(local_norms) > 0.5  # clipping fired


def test_activation_checkpointing_changes_nothing_but_memory(setup, tmp_path):
    """Decoder layers that recompute their activations in the backward train bit for bit as those that
    keep them (float32), with LoRA dropout on (the recomputation draws the masks of the forward): the
    client's stage and tail and the server replica of a U-shaped split, and the unsplit reference."""
    settings = [*BASE, "lora.dropout=0.1", "split.mode=u_shape", "split.tail_layers=1"]
    on = split_run(setup, tmp_path / "on", [*settings, "train.activation_checkpointing=true"])
    off = split_run(setup, tmp_path / "off", settings)
    assert_same(on, off, 0.0)
    local_on = local_run(
        setup, tmp_path / "lon", [*BASE, "lora.dropout=0.1", "train.activation_checkpointing=true"]
    )
    local_off = local_run(setup, tmp_path / "loff", [*BASE, "lora.dropout=0.1"])
    assert_same(local_on, local_off, 0.0)


def _count_inner_calls(layer: torch.nn.Module) -> list[int]:
    """Counts the forwards of a decoder layer's attention (inside the layer: it runs again when the layer
    is recomputed)."""
    calls = [0]
    attn = next(m for name, m in layer.named_children() if "attn" in name)
    attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_checkpointed_layers_recompute_in_the_backward(tmp_path):
    """With checkpointing the layers of a stage and of the unsplit model run their forward again in the
    backward (what frees their activations), and give the same gradients, bit for bit, as without."""
    from models.families import family_of, get_module
    from models.stages import build_stage, checkpoint_layers, full_model
    from tests.random_models import save_random_model

    path = save_random_model("llama", tmp_path / "m", n_layers=2, hidden=32)
    ids = torch.randint(0, 30, (2, 7))

    def stage_grads(checkpointing: bool) -> tuple[int, dict[str, torch.Tensor]]:
        stage = build_stage(path, 0, 2)
        stage.checkpointing = checkpointing
        stage.hf.requires_grad_(True)
        calls = _count_inner_calls(stage.layers["1"])
        stage(input_ids=ids).square().mean().backward()
        return calls[0], {n: p.grad for n, p in stage.named_parameters()}

    def model_grads(checkpointing: bool) -> tuple[int, dict[str, torch.Tensor]]:
        model = full_model(path)
        layers = get_module(model, family_of(model.config).layers)
        if checkpointing:
            checkpoint_layers(layers)
        calls = _count_inner_calls(layers[1])
        model(input_ids=ids, use_cache=False).logits.square().mean().backward()
        return calls[0], {n: p.grad for n, p in model.named_parameters()}

    for grads in (stage_grads, model_grads):
        (plain_calls, plain), (ckpt_calls, ckpt) = grads(False), grads(True)
        assert (plain_calls, ckpt_calls) == (1, 2)
        assert plain.keys() == ckpt.keys() and all(g is not None for g in plain.values())
        for name in plain:
            assert torch.equal(plain[name], ckpt[name]), name


def test_bfloat16_autocast_trains_in_float32_weights(setup, tmp_path):
    """train.autocast=bfloat16: the forward computes in bfloat16 on both sides of the split (the losses
    move off float32's) while the adapter and its optimizer stay float32; the split run still follows the
    unsplit reference under the same autocast, and the hidden states can cross in bfloat16 (wire.dtype)."""
    bf16 = [*BASE, "train.autocast=bfloat16"]
    split = split_run(setup, tmp_path / "split", bf16)
    local = local_run(setup, tmp_path / "local", bf16)
    fp32 = local_run(setup, tmp_path / "fp32", BASE)
    assert all(t.dtype == torch.float32 for t in split[1].values())
    assert max(abs(x - y) for x, y in zip(local[0], fp32[0])) > 1e-4  # autocast was on
    assert max(abs(x - y) for x, y in zip(local[0], fp32[0])) < 0.05 * max(fp32[0])
    assert_same(split, local, 2e-2)
    wired = split_run(setup, tmp_path / "wired", [*bf16, "wire.dtype=bfloat16"])
    assert max(abs(x - y) for x, y in zip(wired[0], fp32[0])) < 0.05 * max(fp32[0])


def test_float16_autocast_scales_the_loss_across_the_split(setup, tmp_path):
    """train.autocast=float16 with clipping: the replica keeps the chain's loss scale and sends it with
    every reply, both sides unscale and clip by the chain's norm, and the run follows the unsplit
    reference under torch.amp.GradScaler; the checkpoint keeps the scale and its growth tracker (one
    per step without overflow), and the adapter stays float32."""
    fp16 = [*BASE, "train.autocast=float16", "train.max_grad_norm=0.5"]
    split = split_run(setup, tmp_path / "split", fp16)
    local = local_run(setup, tmp_path / "local", fp16)
    fp32 = local_run(setup, tmp_path / "fp32", [*BASE, "train.max_grad_norm=0.5"])
    assert all(t.dtype == torch.float32 for t in split[1].values())
    assert max(abs(x - y) for x, y in zip(local[0], fp32[0])) > 1e-5  # autocast was on
    assert_same(split, local, 5e-3)
    norms = [x for r in metrics(tmp_path / "split") for x in r["clients"]["1"]["grad_norms"]]
    assert len(norms) == 8 and max(norms) > 0.5  # unscaled norms (a scaled one would be ~65536x)
    last = sorted((tmp_path / "split" / "checkpoint").glob("round-*"))[-1]
    assert json.loads((last / "state.json").read_text())["loss_scales"] == {"1": [65536.0, 8]}

    # Resumed for a third round, the replica continues from the checkpoint's scale and tracker, and the
    # run is the uninterrupted one's.
    args = [*common_args(setup, tmp_path / "split"), *fp16]
    res = launch(2, [*args, "train.rounds=3", "runtime.resume=true"])
    assert res.returncode == 0, res.stdout[-4000:]
    resumed = [x for r in metrics(tmp_path / "split") for x in r["clients"]["1"]["step_losses"]]
    whole = split_run(setup, tmp_path / "whole", [*fp16, "train.rounds=3"])
    assert resumed == whole[0]
    last = sorted((tmp_path / "split" / "checkpoint").glob("round-*"))[-1]
    assert json.loads((last / "state.json").read_text())["loss_scales"] == {"1": [65536.0, 12]}
    resumed_adapter = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert_same((resumed, resumed_adapter), whole, 0.0)


def test_run_state_carries_the_loss_scales():
    """The checkpoint state and the start-up message keep each replica's scale; without float16 the
    state has no such key (a default run's state.json is what it was)."""
    from runtime import codec
    from runtime.messages import RunState

    state = RunState(2, 1.0, {}, {1: (2, 8)}, None, {}, {1: {"epoch": 0, "position": 3}}, None, {}, [])
    assert "loss_scales" not in state.to_json()
    state.loss_scales = {1: [32768.0, 7]}
    assert RunState.from_json(json.loads(json.dumps(state.to_json()))).loss_scales == {1: [32768.0, 7]}
    assert codec.decode(codec.encode(state)).loss_scales == {1: [32768.0, 7]}


def test_loss_scale_follows_grad_scaler():
    """LossScale (what a replica keeps) halves and doubles as torch.amp.GradScaler does for the same
    overflows, its growth after 2000 clean steps included."""
    from runtime.job import LossScale, step_factor

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.0)
    scaler, ours = torch.amp.GradScaler("cpu"), LossScale()
    overflows = {3, 4, 10}
    for step in range(2012):
        scaler.scale(param.sum()).backward()
        if step in overflows:
            param.grad[1] = float("inf")
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        squared = float(param.grad.double().pow(2).sum()) * ours.scale**2
        ours.update(found_inf=step_factor(squared, ours.scale, None) is None)
        param.grad = None
        assert ours.scale == scaler.get_scale(), step
    assert ours.scale == 2.0**14  # three halvings, one doubling


@pytest.mark.parametrize(
    "setting, field",
    [
        ("train.max_grad_norm=0", "train.max_grad_norm=0.0: must be > 0"),
        ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0: must be > 0"),
        ("train.grad_accum=0", "train.grad_accum=0: must be >= 1"),
        ("train.autocast=fp8", "train.autocast='fp8': use none, bfloat16 or float16"),
    ],
)
def test_bad_recipe_settings_name_their_field(setting, field):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [setting])
    assert str(err.value).startswith(field) and "\n" not in str(err.value)
