"""TensorBoardSink writes event files that TensorBoard's own reader understands."""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys

import pytest
import torch

from ghoststep.controller import Recording

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from ghoststep import RadiusController, StepStats  # noqa: E402
from ghoststep.integrations.tensorboard import TensorBoardSink  # noqa: E402


def _stats(step: int, **kw) -> StepStats:
    base = dict(step=step, tau=0.1 * step, rho_a=0.5, r_before=0.2 * step, r_after=0.2,
                scale=1.0, bottleneck=3, radius_seconds=0.01, skipped=False, lr=1e-3,
                loss=2.0, spread=6.0)  # fmt: skip
    base.update(kw)
    return StepStats(**base)


def _read(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_every_field_becomes_a_scalar_and_histograms_follow_the_period(tmp_path):
    sink = TensorBoardSink(tmp_path, histogram_every=2)
    sink.write(_stats(1))
    sink.write(_stats(2, rho_a=math.inf, r_before=0.0, r_after=0.0))
    sink.write(_stats(3, skipped=True, tau=math.nan, rho_a=math.nan, loss=None))
    sink.write(_stats(4, rho_a=0.25))
    sink.close()

    acc = _read(tmp_path)
    scalars = set(acc.Tags()["scalars"])
    numeric = {k for k in StepStats.field_names() if k != "step"}
    assert scalars == {f"ghoststep/{k}" for k in numeric}
    assert [e.step for e in acc.Scalars("ghoststep/tau")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("ghoststep/loss")] == [1, 2, 4]  # None left out
    assert [e.value for e in acc.Scalars("ghoststep/skipped")] == [0.0, 0.0, 1.0, 0.0]
    assert math.isinf(acc.Scalars("ghoststep/rho_a")[1].value)

    assert acc.Tags()["histograms"] == ["ghoststep/rho_a_steps"]
    hist = acc.Histograms("ghoststep/rho_a_steps")
    assert [h.step for h in hist] == [2, 4]
    assert hist[0].histogram_value.num == 1  # step 1's 0.5; step 2's inf dropped
    assert hist[1].histogram_value.num == 1  # step 3 skipped, step 4's 0.25


def test_per_sample_histogram_when_the_record_carries_it(tmp_path):
    with TensorBoardSink(tmp_path, histogram_every=1) as sink:
        samples = torch.tensor([0.5, 1.0, 2.0, math.inf])
        sink.write(dataclasses.replace(_stats(1), rho_samples=samples))
    hist = _read(tmp_path).Histograms("ghoststep/rho_a_samples")
    assert len(hist) == 1 and hist[0].histogram_value.num == 3
    assert hist[0].histogram_value.min == pytest.approx(0.5)


def test_sink_on_a_controller_and_a_shared_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    sink = TensorBoardSink(writer=writer, prefix="radius/", histogram_every=1)
    opt = RadiusController(
        torch.optim.SGD(model.parameters(), lr=1.0),
        model,
        target_r=0.5,
        recording=Recording(sinks=[sink], keep_samples=True),
    )
    for _ in range(3):
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    writer.add_scalar("user/own", 1.0, 1)
    opt.close()  # closes the sink: flushes the shared writer, leaves it open
    writer.close()
    acc = _read(tmp_path)
    assert {"radius/r_after", "radius/rho_a", "user/own"} <= set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("radius/r_after")] == pytest.approx(
        [s.r_after for s in opt.history], rel=1e-6
    )
    # keep_samples: one rho_a per sample of the batch, the smallest is the batch radius
    last = opt.history[-1]
    assert last.rho_samples.shape == (16,)
    assert float(last.rho_samples.min()) == pytest.approx(last.rho_a, rel=1e-5)
    histograms = acc.Histograms("radius/rho_a_samples")
    assert len(histograms) == 3 and histograms[-1].histogram_value.num == 16


def test_bad_arguments():
    with pytest.raises(ValueError, match="log_dir or writer"):
        TensorBoardSink()
    with pytest.raises(ValueError, match="histogram_every"):
        TensorBoardSink("x", histogram_every=-1)


def test_missing_extra_raises_helpful_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "ghoststep.integrations.tensorboard", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'ghoststep\[tensorboard\]'"):
        importlib.import_module("ghoststep.integrations.tensorboard")
