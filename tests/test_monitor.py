"""StepStats and the incremental sinks."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import gloo_rank
from torch import nn

from ghoststep.controller import RadiusController, Recording
from ghoststep.monitor import CallbackSink, CSVSink, JSONLSink, Sink, StepStats


def _stats(step: int, **overrides) -> StepStats:
    values = dict(
        step=step,
        tau=0.5,
        rho_a=0.25,
        r_before=2.0,
        r_after=1.0,
        scale=0.5,
        bottleneck=3,
        radius_seconds=0.001,
        skipped=False,
        lr=0.1,
        loss=1.25,
        spread=12.5,
        radius=0.25,
    )
    values.update(overrides)
    return StepStats(**values)


def test_stepstats_fields_and_scalars():
    s = _stats(1, loss=None)
    assert StepStats.field_names()[:3] == ["step", "tau", "rho_a"]
    assert s.as_dict()["r_after"] == 1.0
    scalars = s.scalars()
    assert "loss" not in scalars and "step" not in scalars
    assert scalars["skipped"] == 0.0
    with pytest.raises(AttributeError):
        s.tau = 1.0  # records are immutable


def test_csv_sink_is_incremental(tmp_path):
    path = tmp_path / "sub" / "radius.csv"
    sink = CSVSink(path)
    assert not path.exists()  # created at the first write, when the rank is known
    sink.write(_stats(1))
    assert path.read_text().splitlines()[0] == ",".join(StepStats.field_names())
    rows = list(csv.DictReader(path.open()))  # readable before close: flushed
    assert len(rows) == 1 and float(rows[0]["r_before"]) == 2.0
    sink.write(_stats(2, loss=None, rho_a=math.inf, skipped=True))
    rows = list(csv.DictReader(path.open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert rows[1]["loss"] == "" and float(rows[1]["rho_a"]) == math.inf
    assert rows[1]["skipped"] == "True"
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        sink.write(_stats(3))
    with CSVSink(path, append=True) as more:  # no second header
        more.write(_stats(3))
    assert [int(r["step"]) for r in csv.DictReader(path.open())] == [1, 2, 3]


def test_jsonl_sink_is_incremental_and_strict_json(tmp_path):
    path = tmp_path / "radius.jsonl"
    with JSONLSink(path) as sink:
        sink.write(_stats(1))
        lines = path.read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["bottleneck"] == 3
        sink.write(_stats(2, rho_a=math.inf, tau=math.nan, loss=None))
        lines = path.read_text().splitlines()
    second = json.loads(lines[1])
    assert second["rho_a"] == "inf" and second["tau"] == "nan" and second["loss"] is None


def test_sink_protocol_extension_point():
    seen = []
    closed = []
    sink = CallbackSink(seen.append, on_close=lambda: closed.append(True))
    assert isinstance(sink, Sink)

    class ListSink:  # anything with write / close is a sink (e.g. a TensorBoard writer)
        def __init__(self):
            self.rows = []

        def write(self, stats):
            self.rows.append(stats.scalars())

        def close(self):
            pass

    assert isinstance(ListSink(), Sink)
    sink.write(_stats(1))
    sink.close()
    assert seen[0].step == 1 and closed == [True]


def _csv_rows(path):
    return list(csv.DictReader(path.open()))


def _jsonl_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "make, read, as_written",
    [
        (CSVSink, _csv_rows, lambda v: "" if v is None else str(v)),  # csv writes str(v)
        (JSONLSink, _jsonl_rows, lambda v: v),
    ],
    ids=["csv", "jsonl"],
)
def test_file_sinks_are_sinks_that_round_trip_every_field(tmp_path, make, read, as_written):
    path = tmp_path / "history"
    sink = make(path)
    assert isinstance(sink, Sink)
    steps = [_stats(1), _stats(2, r_before=3.5, scale=0.25, loss=None, skipped=True, lr=1e-3)]
    for stats in steps:
        sink.write(stats)
    sink.close()
    rows = read(path)
    assert len(rows) == len(steps)
    for row, stats in zip(rows, steps, strict=True):
        assert list(row) == StepStats.field_names()
        assert row == {k: as_written(v) for k, v in stats.as_dict().items()}


def test_objects_without_write_and_close_are_not_sinks():
    class WriteOnly:
        def write(self, stats):
            pass

    class CloseOnly:
        def close(self):
            pass

    assert not isinstance(WriteOnly(), Sink)
    assert not isinstance(CloseOnly(), Sink)
    assert not isinstance(object(), Sink)


def test_controller_feeds_sinks_every_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    csv_path, jsonl_path = tmp_path / "r.csv", tmp_path / "r.jsonl"
    ctrl = RadiusController(
        torch.optim.SGD(model.parameters(), lr=5.0),
        model,
        recording=Recording(sinks=[CSVSink(csv_path), JSONLSink(jsonl_path)], history_size=2),
    )
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    for step in range(1, 4):
        ctrl.zero_grad()
        F.cross_entropy(model(x), y).backward()
        ctrl.step()
        rows = list(csv.DictReader(csv_path.open()))
        lines = jsonl_path.read_text().splitlines()
        assert len(rows) == len(lines) == step  # written as the steps happen
        assert json.loads(lines[-1])["r_after"] == pytest.approx(ctrl.last.r_after)
        assert float(rows[-1]["scale"]) == pytest.approx(ctrl.last.scale)
    assert [s.step for s in ctrl.history] == [2, 3]  # bounded history
    assert ctrl.last.r_after <= 1.0 + 1e-6 and ctrl.last.r_before > 1.0
    ctrl.close()
    with pytest.raises(ValueError, match="closed"):
        ctrl.sinks[0].write(ctrl.last)


# ------------------------------------------------- two gloo ranks, one history path


def _ranks_worker(rank: int, world: int, init_file: str, out_dir: str, ranks) -> None:
    import torch.distributed as dist

    # built before init_process_group, as torchrun scripts and Lightning callbacks do
    options = {} if ranks is None else {"ranks": ranks}
    sinks = [CSVSink(f"{out_dir}/radius.csv", **options),
             JSONLSink(f"{out_dir}/radius.jsonl", **options)]  # fmt: skip
    with gloo_rank(rank, world, init_file):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)))
        ctrl = RadiusController(torch.optim.SGD(ddp.parameters(), lr=1.0), ddp, sinks=sinks)
        g = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            ctrl.zero_grad()
            F.cross_entropy(ddp(torch.randn(8, 6, generator=g)), torch.arange(8) % 3).backward()
            ctrl.step()
            dist.barrier()  # both ranks write each step at about the same time
        ctrl.close()


STEPS = 12


def _spawn_ranks(tmp_path, ranks) -> list[str]:
    import torch.multiprocessing as mp

    mp.spawn(_ranks_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), ranks), nprocs=2)
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "pg")


def _check_history_files(csv_path, jsonl_path) -> None:
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == StepStats.field_names() and len(rows) == STEPS + 1
    assert all(len(row) == len(rows[0]) for row in rows)
    assert [int(row[0]) for row in rows[1:]] == list(range(1, STEPS + 1))
    lines = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_two_ranks_one_path_one_valid_file_from_rank_zero(tmp_path):
    files = _spawn_ranks(tmp_path, None)
    print(f"\nfiles: {files}")
    assert files == ["radius.csv", "radius.jsonl"]  # rank 1 created nothing
    _check_history_files(tmp_path / "radius.csv", tmp_path / "radius.jsonl")


@pytest.mark.slow
def test_two_ranks_ranks_all_write_one_file_each(tmp_path):
    files = _spawn_ranks(tmp_path, "all")
    print(f"\nfiles: {files}")
    assert files == sorted(f"radius.rank{r}.{ext}" for ext in ("csv", "jsonl") for r in (0, 1))
    for r in (0, 1):
        _check_history_files(tmp_path / f"radius.rank{r}.csv", tmp_path / f"radius.rank{r}.jsonl")


def test_ranks_must_be_a_rank_or_all(tmp_path):
    with pytest.raises(ValueError, match="ranks"):
        CSVSink(tmp_path / "r.csv", ranks="some")
