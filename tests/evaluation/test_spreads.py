"""Unit tests for the spreads along a direction in ghoststep.evaluation._directional: the
spread of a logit difference (including the blocked CPU path), and the tangent and
secant spreads of a linear model against their closed form."""

from __future__ import annotations

import pytest
import torch
from helpers import linear_case

import ghoststep.evaluation._directional as directional
from ghoststep.evaluation._directional import (
    projected,
    secant_spreads,
    spread_of_difference,
    tangent_spreads,
)
from ghoststep.evaluation._outputs import fingerprint
from ghoststep.radius._bounds import logit_spread_unchecked


def _direct(shifted, baseline):
    diff = shifted - baseline
    return diff.amax(-1) - diff.amin(-1)


def test_logit_spread_unchecked_closed_form():
    slopes = torch.tensor([[1.0, -2.0, 0.5], [3.0, 3.0, 3.0]])
    assert logit_spread_unchecked(slopes).tolist() == [3.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spread_of_difference_small(dtype):
    g = torch.Generator().manual_seed(0)
    shifted = torch.randn(3, 4, 7, generator=g, dtype=dtype)
    baseline = torch.randn(3, 4, 7, generator=g, dtype=dtype)
    expected = _direct(shifted, baseline)
    got = spread_of_difference(shifted.clone(), baseline)
    assert got.shape == (3, 4) and torch.equal(got, expected)


@pytest.mark.parametrize("block_bytes", [4, 60, 64, 1 << 20])
def test_spread_of_difference_blocked_cpu_path(monkeypatch, block_bytes):
    # 64 bytes per block: 3 rows of 5 float32 classes, 28 rows -> 10 blocks, the last short
    monkeypatch.setattr(directional, "_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(1)
    shifted, baseline = torch.randn(7, 4, 5, generator=g), torch.randn(7, 4, 5, generator=g)
    got = spread_of_difference(shifted.clone(), baseline)
    assert got.shape == (7, 4) and torch.equal(got, _direct(shifted, baseline))


def test_spread_of_difference_blocked_at_the_real_block_size():
    # 1 MiB blocks of 262 rows at V = 1000 (float32): 600 rows, three blocks
    g = torch.Generator().manual_seed(2)
    shifted, baseline = torch.randn(3, 200, 1000, generator=g), torch.randn(3, 200, 1000)
    got = spread_of_difference(shifted.clone(), baseline)
    assert torch.equal(got, _direct(shifted, baseline))


@pytest.mark.parametrize("method", ["jvp", "fd"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_tangent_spreads_of_a_linear_model(method, chunk_size):
    """z = W x + b moves along (dW, db) with slopes dW x + db."""
    model, x, dw, db = linear_case()
    with torch.no_grad():
        recorded = fingerprint(model(x))
    spreads, gap = tangent_spreads(
        model, (x,), {}, [dw, db], method=method, output_fn=lambda out: out, rng=None,
        chunk_size=chunk_size, fingerprint=recorded,
    )  # fmt: skip
    expected = _direct(x @ dw.T + db, torch.zeros(5, dtype=torch.float64))
    assert spreads.dtype == torch.float64 and spreads.shape == (6,)
    torch.testing.assert_close(spreads, expected, rtol=1e-12 if method == "jvp" else 1e-6, atol=0)
    assert gap == 0.0  # the replay reproduces the recorded logits
    _, stale = tangent_spreads(
        model, (x,), {}, [dw, db], method=method, output_fn=lambda out: out, rng=None,
        chunk_size=chunk_size, fingerprint=recorded + 1.0,
    )  # fmt: skip
    assert stale > 0.1


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_secant_spreads_of_a_linear_model(chunk_size):
    """The secant evaluates where the parameters are: moved by the caller to old + h v."""
    model, x, dw, db = linear_case(1)
    with torch.no_grad():
        baseline = model(x)
        model.weight.add_(dw, alpha=0.01)
        model.bias.add_(db, alpha=0.01)
    sink: list = []
    spreads = secant_spreads(
        model, (x,), {}, baseline, 0.01, output_fn=lambda out: out, rng=None, devices=[],
        chunk_size=chunk_size, sink=sink,
    )  # fmt: skip
    expected = _direct(x @ dw.T + db, torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(spreads, expected, rtol=1e-9, atol=0)
    # the sink holds the difference's zero-sum projections, row by row
    difference = (model(x) - baseline).detach()
    torch.testing.assert_close(torch.cat(sink), projected(difference), rtol=1e-5, atol=1e-6)
    # a baseline in parts over consecutive rows (head and tail) reads the same
    parts = secant_spreads(
        model, (x,), {}, [baseline[:2], baseline[2:]], 0.01, output_fn=lambda out: out,
        rng=None, devices=[], chunk_size=None,
    )  # fmt: skip
    assert torch.equal(parts, spreads) or chunk_size is not None
