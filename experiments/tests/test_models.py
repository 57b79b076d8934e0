"""Tests for ghoststep_lab.common.models: shapes, registry, tying, internals."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jvp

from ghoststep_lab.common.models import ARCHITECTURES, TinyLM, TinyTransformer, build_model


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_digit_architectures_shapes(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert model(torch.rand(5, 64)).shape == (5, 10)


def test_construction_is_seeded():
    torch.manual_seed(3)
    a = build_model("transformer")
    torch.manual_seed(3)
    b = build_model("transformer")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_registry_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build_model("vgg")


def test_mlp_hidden_size_argument():
    model = build_model("mlp", hidden=32)
    assert model.net[0].out_features == 32


def test_tinylm_tied_and_shapes():
    torch.manual_seed(0)
    model = build_model("tinylm")
    assert model.lm_head.weight is model.tok_emb.weight
    assert model(torch.randint(0, 97, (2, 7))).shape == (2, 7, 97)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # listed once, as tok_emb.weight


def test_tinylm_is_causal():
    torch.manual_seed(0)
    model = TinyLM().eval()
    x = torch.randint(0, 97, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 97
    torch.testing.assert_close(model(x)[:, :5], model(y)[:, :5])


def test_resnet18_cifar_shape_and_size():
    torch.manual_seed(0)
    model = build_model("resnet18")
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000
    small = build_model("resnet18", width=4)
    assert small(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_transformer_records_internals_and_jvp_gives_their_tangents():
    torch.manual_seed(0)
    model = TinyTransformer(record=True)
    x = torch.rand(3, 64)
    model(x)
    assert len(model.last_attention_logits) == 2 and len(model.last_ffn_preacts) == 2
    assert model.last_attention_logits[0].shape == (3, 4, 8, 8)
    assert model.last_ffn_preacts[0].shape == (3, 8, 128)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    model.record = False

    def f(p):
        return functional_call(model, p, (x,), {"return_internals": True})

    with torch.no_grad():
        (logits, internals), (dlogits, dinternals) = jvp(f, (params,), (tangents,))
    assert dlogits.shape == logits.shape == (3, 10)
    assert dinternals["attention_logits"][1].shape == (3, 4, 8, 8)
    assert dinternals["ffn_preacts"][0].shape == internals["ffn_preacts"][0].shape
