"""Models shaped like the checkpoints the papers use: GPT-2 small, OPT-125m, GPT-Neo-125m, Llama-2-7B and
Qwen2-0.5B (``tests.random_models.CHECKPOINT_SHAPES``).

Full size on the meta device (no memory): the scheduler's figures and the adapter layout are those
of the real checkpoints. Small random copies with a byte-level BPE tokenizer (no pad token for GPT-2,
GPT-Neo and Llama-2): the split stages are the full model, and a short split training run, with the
checkpoints' own dropout on, takes the same steps as the unsplit PEFT model.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from models.datasets import collate, load_examples
from models.families import family_of, get_module
from models.lora import (
    LoraSpec,
    add_lora,
    build_layout,
    initial_adapter,
    lora_config,
    lora_parameters,
    write_adapter,
)
from models.loss import mean_loss
from models.stages import build_stage, full_model
from runtime.config import load_config
from runtime.job import load_tokenizer, lora_spec
from runtime.scheduler import model_costs
from tests.random_models import CHECKPOINT_SHAPES, checkpoint_config, save_checkpoint_shaped

SHAPES = tuple(CHECKPOINT_SHAPES)
N_LAYERS = 4

# Parameters of one decoder layer of the real checkpoints (weights and biases, norms included).
LAYER_PARAMS = {
    "gpt2-small": 7_087_872,
    "opt-125m": 7_087_872,
    "gpt-neo-125m": 7_085_568,  # no bias on q, k, v
    "llama-2-7b": 202_383_360,
    "qwen2-0.5b": 14_912_384,  # q, k, v biases; 2 key/value heads of 64
}


@pytest.mark.parametrize("name", SHAPES)
def test_full_size_figures_on_the_meta_device(name):
    """The scheduler's figures for the real sizes (OPT-125m's project_in is None: it used to crash here)."""
    mcfg = checkpoint_config(name, small=False)
    cfg = load_config(None, ["model.path=unused"])
    layout = build_layout(mcfg, lora_spec(cfg, mcfg), [])
    costs = model_costs(mcfg, cfg, layout, seq=128, activation_bytes=1.0)
    assert costs.n_layers == mcfg.num_hidden_layers
    assert costs.layer_param_bytes == 4 * LAYER_PARAMS[name]
    assert costs.embed_param_bytes >= 4 * mcfg.vocab_size * mcfg.hidden_size
    # fedavg all-reduces the adapter and one weight per component
    assert costs.adapter_bytes == 4 * (layout.numel + sum(s.rank for s in layout.slots)) > 0


def test_gpt2_small_adapter_layout_is_the_real_one():
    """r=8 on c_attn (768->2304), attn.c_proj and mlp.c_proj, c_fc: 98,304 values a layer, 12 layers."""
    mcfg = checkpoint_config("gpt2-small", small=False)
    layout = build_layout(mcfg, LoraSpec(8, 16.0, 4, ("c_attn", "c_proj", "c_fc")), [])
    assert layout.numel == 12 * 8 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = save_checkpoint_shaped(name, root / name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", SHAPES)
def test_tokenizer_and_optional_modules(shaped, name):
    path = shaped(name)
    tok = load_tokenizer(path)
    config = full_model(path).config
    assert tok.pad_token_id is not None  # a checkpoint without a pad token pads with eos
    if name in ("gpt2-small", "gpt-neo-125m", "llama-2-7b"):
        assert tok.pad_token == tok.eos_token
    assert config.tie_word_embeddings == (name != "llama-2-7b")
    server = build_stage(path, 2, N_LAYERS)
    client = build_stage(path, 0, 2)
    # A tied head is loaded from the embedding's tensor: the server holds its own copy of the same values.
    full = full_model(path)
    torch.testing.assert_close(server.hf.lm_head.weight, full.lm_head.weight, atol=0, rtol=0)
    if name == "opt-125m":
        assert client.hf.model.decoder.project_in is None and server.hf.model.decoder.project_out is None


def _batch(path) -> dict[str, torch.Tensor]:
    from models.tiny import generate_examples, write_jsonl

    data = path / "sample.jsonl"
    write_jsonl(generate_examples("sort", 6, 3), data)
    tok = load_tokenizer(path)
    # 64: every sample keeps a response token under each shape's tokenizer (48 drops two of Qwen2's).
    examples = load_examples(data, tok, 64)
    return collate(examples[:3], tok.pad_token_id)


@pytest.mark.parametrize("k", range(1, N_LAYERS))
@pytest.mark.parametrize("name", SHAPES)
def test_stages_equal_the_full_model(shaped, name, k):
    path = shaped(name)
    batch = _batch(path)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = full_model(path).eval()(input_ids=ids, attention_mask=mask).logits
        hidden = build_stage(path, 0, k).eval()(input_ids=ids, attention_mask=mask)
        logits = build_stage(path, k, N_LAYERS).eval()(hidden=hidden, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", SHAPES)
def test_short_split_run_with_dropout_takes_the_unsplit_steps(shaped, name):
    """Four AdamW steps, in train mode with the checkpoint's dropout and LoRA dropout 0.1: client stage
    [0, 2) and server stage [2, L) joined by a gradient across the cut, against the PEFT full model.
    Both draw their dropout masks in the same order from one generator, so the losses agree."""
    path = shaped(name)
    mcfg = full_model(path).config
    family = family_of(mcfg)
    spec = LoraSpec(r=4, alpha=8.0, r_cut=4, targets=family.lora_targets, dropout=0.1)
    layout = build_layout(mcfg, spec, [])
    start = initial_adapter(layout, seed=0)
    batch = _batch(path)

    client, server = build_stage(path, 0, 2), build_stage(path, 2, N_LAYERS)
    add_lora(client, spec, cut_rank=True)
    add_lora(server, spec, cut_rank=False)
    for stage in (client, server):
        write_adapter(stage.hf, layout, start)
    split_opt = torch.optim.AdamW(lora_parameters(client.hf) + lora_parameters(server.hf), lr=1e-2)

    # .train(): from_pretrained gives a model in eval mode
    full = get_peft_model(full_model(path), lora_config(spec, family)).train()
    write_adapter(full.base_model.model, layout, start)
    full_opt = torch.optim.AdamW(lora_parameters(full.base_model.model), lr=1e-2)
    assert get_module(full.base_model.model, family.layers)[0].training

    split_losses, full_losses = [], []
    for step in range(4):
        torch.manual_seed(100 + step)
        hidden = client(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        sent = hidden.detach().requires_grad_()  # what crosses the wire
        loss, _ = mean_loss(server(hidden=sent, attention_mask=batch["attention_mask"]), batch["labels"])
        loss.backward()
        hidden.backward(sent.grad)
        split_opt.step()
        split_opt.zero_grad()
        split_losses.append(loss.item())

        torch.manual_seed(100 + step)
        logits = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = mean_loss(logits, batch["labels"])
        loss.backward()
        full_opt.step()
        full_opt.zero_grad()
        full_losses.append(loss.item())
    assert split_losses == pytest.approx(full_losses, abs=1e-5)
    assert split_losses[-1] < split_losses[0]  # it trained
