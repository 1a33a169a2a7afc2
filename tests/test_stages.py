"""A stage is an exact slice of the full model, and it holds only what it owns."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from models.families import FAMILIES, _layer_types
from models.stages import build_stage, full_model
from tests.random_models import random_config

FAMILY_NAMES = tuple(FAMILIES)
N_LAYERS = 4  # the random_model fixture's default depth

# Longer than gpt_neo's local window (16), so its local-attention layers see a window cut.
SEQ_LEN = 20


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, SEQ_LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding on one row
    mask[2, 17:] = 0
    ids[mask == 0] = 0  # padded with <pad>, as the collator does
    return ids, mask


@pytest.fixture(scope="module")
def reference(random_model):
    """Full-model logits per family (computed once), with the batch they were computed on."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = random_model(family)
            model = full_model(path).eval()
            ids, mask = _batch(model.config.vocab_size)
            with torch.no_grad():
                cache[family] = (ids, mask, model(input_ids=ids, attention_mask=mask).logits)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def stage(random_model):
    """``stage(family, start, end)``: a built stage in eval mode, shared by this module's read-only tests."""
    cache = {}

    def get(family: str, start: int, end: int):
        key = (family, start, end)
        if key not in cache:
            cache[key] = build_stage(random_model(family), start, end).eval()
        return cache[key]

    return get


@pytest.mark.parametrize("k", range(1, N_LAYERS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_client_then_server_equals_full_model(stage, reference, family, k):
    ids, mask, expected = reference(family)
    client, server = stage(family, 0, k), stage(family, k, N_LAYERS)
    with torch.no_grad():
        hidden = client(input_ids=ids, attention_mask=mask)
        logits = server(hidden=hidden, attention_mask=mask)
    assert hidden.shape == (*ids.shape, client.config.hidden_size)
    assert logits.shape == expected.shape
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("family", "window"),
    [
        ("mistral", {"sliding_window": 8}),  # every layer slides
        ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),  # 2 of 4
    ],
)
def test_sliding_window_layers_equal_the_full_model(tmp_path, family, window, attn):
    """A window (8) shorter than the batch (20): the stages build the sliding-window mask the full
    model builds, on layers that slide and, for Qwen2, next to full-attention layers."""
    base = random_config(family, n_layers=N_LAYERS, hidden=32)
    fields = {k: v for k, v in base.to_dict().items() if k != "layer_types"}  # derived from the window
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(type(base)(**{**fields, **window}))
    assert "sliding_attention" in _layer_types(model.config)
    model.save_pretrained(tmp_path)
    ids, mask = _batch(base.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        expected = full_model(tmp_path, attn_implementation=attn).eval()(input_ids=ids, attention_mask=mask)
        for k in range(1, N_LAYERS):
            client = build_stage(tmp_path, 0, k, attn_implementation=attn).eval()
            server = build_stage(tmp_path, k, N_LAYERS, attn_implementation=attn).eval()
            logits = server(hidden=client(input_ids=ids, attention_mask=mask), attention_mask=mask)
            torch.testing.assert_close(logits[real], expected.logits[real], atol=1e-5, rtol=0)
        # The window acts: the same weights attending to every earlier token differ past position 8.
        unwindowed = AutoModelForCausalLM.from_config(type(base)(**fields), attn_implementation=attn)
        unwindowed.load_state_dict(model.state_dict())
        plain = unwindowed.eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(plain[0, :8], expected.logits[0, :8], atol=1e-5)
    assert (plain[0, 9:] - expected.logits[0, 9:]).abs().max() > 1e-4


def test_padding_is_honoured(stage, reference):
    """The stages really use the mask: dropping padding changes nothing, hiding a real token does."""
    ids, mask, expected = reference("llama")
    client, server = stage("llama", 0, 2), stage("llama", 2, N_LAYERS)
    # Dropping the mask must not change positions before the padding (attention is causal) ...
    with torch.no_grad():
        unmasked = server(hidden=client(input_ids=ids), attention_mask=None)
    real = mask.bool()
    torch.testing.assert_close(unmasked[real], expected[real], atol=1e-5, rtol=0)
    # ... whereas a mask that hides a real token must change what follows it.
    holed = mask.clone()
    holed[0, 3] = 0
    with torch.no_grad():
        changed = server(hidden=client(input_ids=ids, attention_mask=holed), attention_mask=holed)
    assert (changed[0, 4:] - expected[0, 4:]).abs().max() > 1e-4


def _layer_indices(names: list[str], prefix: str) -> set[int]:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return {int(m.group(1)) for n in names if (m := pattern.match(n))}


def _owns(names: list[str], path: str) -> bool:
    return any(n == path or n.startswith(path + ".") for n in names)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stage_materialises_only_what_it_owns(random_model, stage, family):
    path = random_model(family)
    fam = FAMILIES[family]
    checkpoint = load_file(str(path / "model.safetensors"))
    client_sizes, server_sizes = [], []
    for k in range(1, N_LAYERS):
        client, server = stage(family, 0, k), stage(family, k, N_LAYERS)
        c_names = [n for n, _ in client.hf.named_parameters()]
        s_names = [n for n, _ in server.hf.named_parameters()]
        assert _layer_indices(c_names, fam.layers) == set(range(k))
        assert _layer_indices(s_names, fam.layers) == set(range(k, N_LAYERS))
        for head in fam.head:
            assert not _owns(c_names, head), f"client [0,{k}) holds {head}"
        for embed in fam.embed:
            assert not _owns(s_names, embed), f"server [{k},{N_LAYERS}) holds {embed}"
        assert _owns(c_names, fam.embed[0]) and _owns(s_names, "lm_head")
        for part in (client, server):
            for name, t in [*part.hf.named_parameters(), *part.hf.named_buffers()]:
                assert t.device.type == "cpu", f"{name} left on {t.device}"
            # Loaded from the checkpoint, not left at init (the first owned layer's tensors).
            for name, p in part.hf.named_parameters():
                key = name if name in checkpoint else name.split(".", 1)[1]
                if key in checkpoint:
                    assert torch.equal(p, checkpoint[key]), name
        client_sizes.append(sum(p.numel() for p in client.parameters()))
        server_sizes.append(sum(p.numel() for p in server.parameters()))
    assert client_sizes == sorted(set(client_sizes)), client_sizes  # strictly growing with k
    assert server_sizes == sorted(set(server_sizes), reverse=True), server_sizes


def test_gpt2_server_owns_an_untied_copy_of_the_embedding(random_model, stage):
    path = random_model("gpt2")
    checkpoint = load_file(str(path / "model.safetensors"))
    wte_key = next(k for k in checkpoint if k.endswith("wte.weight"))
    assert full_model(path).config.tie_word_embeddings  # the checkpoint really is tied
    server = stage("gpt2", 2, N_LAYERS)
    assert torch.equal(server.hf.lm_head.weight, checkpoint[wte_key])
    assert not hasattr(server.hf.transformer, "wte") or server.hf.transformer.wte is None
    # The first stage keeps its embedding and owns no head.
    client = stage("gpt2", 0, 2)
    assert torch.equal(client.hf.transformer.wte.weight, checkpoint[wte_key])
    assert getattr(client.hf, "lm_head", None) is None


def test_missing_config_names_the_folder(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        build_stage(folder, 0, 1)
    with pytest.raises(FileNotFoundError, match="config.json"):
        full_model(folder)


@pytest.mark.parametrize("start,end", [(0, N_LAYERS + 1), (-1, 2), (3, 2), (N_LAYERS + 1, N_LAYERS + 1)])
def test_out_of_range_slice_is_rejected(random_model, start, end):
    with pytest.raises(ValueError, match=rf"\[{start}, {end}\).*{N_LAYERS} layers"):
        build_stage(random_model("llama"), start, end)


def test_unsupported_model_type_lists_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "vocab_size": 64,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            }
        )
    )
    with pytest.raises(ValueError, match="'bert'") as info:
        build_stage(tmp_path, 0, 1)
    for name in FAMILY_NAMES:
        assert repr(name) in str(info.value)
