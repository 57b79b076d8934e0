"""The logits reader: every output normalised to (positions..., K) as the loss reads it."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn import functional as F

from ghoststep.evaluation import LayoutError, LogitsReader, logits_reader


def _spread(t):
    return t.amax(-1) - t.amin(-1)


def test_class_dim_moves_the_classes_last():
    z = torch.randn(2, 5, 3, 4)
    out = LogitsReader(class_dim=1)(z)
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close(out, z.movedim(1, -1))
    torch.testing.assert_close(LogitsReader(class_dim=-1)(z), z)


def test_sigmoid_is_two_classes_per_element():
    z = torch.randn(3, 6)
    out = LogitsReader(activation="sigmoid")(z)
    assert out.shape == (3, 6, 2)
    torch.testing.assert_close(out[..., 0], torch.zeros(3, 6))
    torch.testing.assert_close(_spread(out), z.abs())


def test_several_heads_pad_and_concatenate():
    a, b = torch.randn(2, 3, 10), torch.randn(2, 4)
    out = LogitsReader(lambda o: o, class_dim=-1)({"a": a, "b": b})
    assert out.shape == (2, 4, 10)  # 3 positions of a, 1 of b, b padded to 10 classes
    torch.testing.assert_close(_spread(out[:, :3]), _spread(a))
    torch.testing.assert_close(_spread(out[:, 3]), _spread(b))
    with pytest.raises(ValueError, match="batch"):
        LogitsReader(lambda o: o)((torch.randn(2, 3), torch.randn(3, 3)))


def test_default_refuses_several_candidates():
    reader = logits_reader()
    with pytest.raises(TypeError, match="logits_fn"):
        reader({"logits": torch.randn(2, 3), "b": torch.randn(2, 4)})
    with pytest.raises(TypeError, match="logits_fn"):
        reader((torch.randn(2, 3), torch.randn(2, 4)))
    z = torch.randn(2, 3)
    torch.testing.assert_close(reader({"logits": z, "loss": torch.tensor(1.0)}), z)  # a loss
    torch.testing.assert_close(reader((torch.tensor(1.0), z)), z)  # HF (loss, logits)


def test_masked_classes_drop_out_of_value_and_tangent():
    z = torch.tensor([[1.0, -float("inf"), 3.0, 2.0], [-float("inf")] * 4])
    a = torch.tensor([[5.0, 100.0, -1.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    reader = LogitsReader()
    with fwAD.dual_level():
        out = reader(fwAD.make_dual(z, a))
        value, tangent = fwAD.unpack_dual(out)
    assert torch.isfinite(value).all()
    torch.testing.assert_close(_spread(value[0]), torch.tensor(2.0))
    torch.testing.assert_close(_spread(tangent[0]), torch.tensor(6.0))  # 5 - (-1)
    torch.testing.assert_close(_spread(tangent[1]), torch.tensor(0.0))  # all masked
    shifted = reader(z + 1e-2 * a)
    assert torch.isfinite(shifted - reader(z)).all()


def test_ambiguous_layout_and_gradient_evidence():
    reader = LogitsReader(class_dim=None)
    z = torch.randn(2, 5, 3, 4, requires_grad=True)
    with pytest.raises(LayoutError, match="class_dim"):
        reader(z)
    reader.watch(z)
    F.cross_entropy(z, torch.randint(0, 5, (2, 3, 4))).backward()
    assert reader(z.detach()).shape == (2, 3, 4, 5) and reader.class_dim == 1

    lm = LogitsReader(class_dim=None)
    z = torch.randn(2, 6, 11, requires_grad=True)
    lm.watch(z)
    F.cross_entropy(z.reshape(-1, 11), torch.randint(0, 11, (12,))).backward()
    lm.resolve()
    assert lm.class_dim == -1

    neither = LogitsReader(class_dim=None)
    z = torch.randn(2, 5, 3, 4, requires_grad=True)
    neither.watch(z)
    F.mse_loss(z, torch.zeros_like(z)).backward()
    with pytest.raises(LayoutError, match="class_dim"):
        neither.resolve()


def test_reader_pickles():
    reader = pickle.loads(pickle.dumps(LogitsReader(class_dim=1, activation="softmax")))
    assert reader.class_dim == 1
    with pytest.raises(ValueError, match="activation"):
        LogitsReader(activation="relu")
    with pytest.raises(ValueError, match="class_dim"):
        LogitsReader(class_dim=0)
