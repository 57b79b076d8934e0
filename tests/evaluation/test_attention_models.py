"""Models with PyTorch's default attention (``F.scaled_dot_product_attention``), unchanged.

Hugging Face GPT-2, Llama, BERT for sequence classification and ViT for image
classification load with ``attn_implementation="sdpa"`` by default, and
``nn.TransformerEncoderLayer`` calls the fused kernel too; none of these kernels has
forward-mode AD. Each model is used as a user would: default attention, keyword
arguments, a plain training loop. The slopes must equal an independent float64 JVP of
the same weights with eager attention, and the clip controller's realised step,
re-measured independently, must stay within target_r.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from ghoststep import RadiusController, logit_slopes, measure

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def _gpt2(attn=None):
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel._from_config(config, attn_implementation=attn)


def _llama(attn=None):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn)


def _bert(attn=None):
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification._from_config(config, attn_implementation=attn)


def _vit(attn=None):
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.ViTForImageClassification._from_config(config, attn_implementation=attn)


def _tokens(gen, labels: str):
    ids = torch.randint(0, 64, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # one padded row: the attention mask reaches the kernel
    out = {"input_ids": ids, "attention_mask": mask}
    out["labels"] = ids.clone() if labels == "lm" else torch.randint(0, 3, (4,), generator=gen)
    return out


def _pixels(gen, labels: str):
    return {
        "pixel_values": torch.randn(4, 3, 8, 8, generator=gen),
        "labels": torch.randint(0, 5, (4,), generator=gen),
    }


HF_MODELS = {
    "gpt2": (_gpt2, lambda g: _tokens(g, "lm")),
    "llama": (_llama, lambda g: _tokens(g, "lm")),
    "bert": (_bert, lambda g: _tokens(g, "cls")),
    "vit": (_vit, lambda g: _pixels(g, "cls")),
}


def _eager64(model, build):
    """The same weights with eager attention, in float64: the independent reference."""
    reference = build("eager").double()
    reference.load_state_dict(model.state_dict())
    return reference.train(model.training)


def _inputs_only(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_default_attention_slopes_match_eager_float64(name):
    build, batch_of = HF_MODELS[name]
    torch.manual_seed(0)
    model = build()
    assert model.config._attn_implementation == "sdpa"  # the default, left alone
    model.train()
    inputs = _inputs_only(batch_of(torch.Generator().manual_seed(1)))
    gen = torch.Generator().manual_seed(2)
    direction = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    logits, slopes = logit_slopes(model, inputs, direction)
    assert model.config._attn_implementation == "sdpa"

    reference = _eager64(model, build)
    wide = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    ref_logits, ref_slopes = logit_slopes(
        reference, wide, {n: v.double() for n, v in direction.items()}
    )
    scale = float(ref_slopes.abs().max())
    assert scale > 0
    torch.testing.assert_close(slopes.double(), ref_slopes, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(logits.double(), ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_default_attention_controller_plain_loop_keeps_r(name):
    build, batch_of = HF_MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    target = 0.5
    # lr 3.0 makes every Adam step far larger than the radius: every step is clipped
    controller = RadiusController(
        torch.optim.Adam(model.parameters(), lr=3.0), model, mode="clip", target_r=target
    )
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        batch = batch_of(gen)
        old = copy.deepcopy(model)
        controller.zero_grad()
        model(**batch).loss.backward()
        controller.step()
        assert model.config._attn_implementation == "sdpa"
        stats = controller.last
        assert not stats.skipped and stats.scale < 1.0
        # independent: float64 eager JVP at the old weights along the applied step
        step = {
            n: (p.detach() - q.detach()).double()
            for (n, p), (_, q) in zip(model.named_parameters(), old.named_parameters())
        }
        reference = _eager64(old, build)
        wide = {
            k: v.double() if v.is_floating_point() else v for k, v in _inputs_only(batch).items()
        }
        check = measure(reference, wide, step, tau=1.0)
        assert check.r <= target, (name, check.r)
        assert check.r > 0.9 * target


def test_transformer_encoder_default_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2
        ),
        nn.Linear(16, 5),
    ).train()
    x = torch.randn(6, 7, 16)
    gen = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    _, slopes = logit_slopes(model, x, direction)
    _, ref = logit_slopes(
        copy.deepcopy(model).double(), x.double(), [v.double() for v in direction], method="fd"
    )
    scale = float(ref.abs().max())
    torch.testing.assert_close(slopes.double(), ref, rtol=1e-5, atol=1e-5 * scale)

    controller = RadiusController(
        torch.optim.Adam(model.parameters(), lr=3.0), model, mode="clip", target_r=1.0
    )
    y = torch.randint(0, 5, (6, 7))
    old = copy.deepcopy(model)
    controller.zero_grad()
    nn.functional.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1)).backward()
    controller.step()
    assert controller.last.scale < 1.0
    step = [(p - q).detach().double() for p, q in zip(model.parameters(), old.parameters())]
    check = measure(copy.deepcopy(old).double(), x.double(), step, tau=1.0, method="fd")
    assert 0.9 < check.r <= 1.0
