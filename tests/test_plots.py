"""ghoststep.plots: reading the sinks' histories and drawing one PNG."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib")

from ghoststep.monitor import CSVSink, JSONLSink, StepStats  # noqa: E402
from ghoststep.plots import find_histories, plot_history, read_history  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _records(n: int = 6) -> list[StepStats]:
    out = []
    for k in range(1, n + 1):
        skipped = k == 4
        out.append(StepStats(
            step=k, tau=math.nan if skipped else 0.5 / k, rho_a=math.inf if k == 2 else 0.3,
            r_before=0.0 if k == 2 else 1.5 / k, r_after=min(1.0, 1.5 / k),
            scale=0.0 if skipped else min(1.0, k / 1.5), bottleneck=1, radius_seconds=0.01,
            skipped=skipped, lr=0.1, loss=None if k == 5 else 2.0 / k,
        ))  # fmt: skip
    return out


def _write(sink_cls, path):
    with sink_cls(path) as sink:
        for s in _records():
            sink.write(s)
    return path


@pytest.mark.parametrize("sink_cls, name", [(CSVSink, "h.csv"), (JSONLSink, "h.jsonl")])
def test_read_history_round_trips_the_sinks(tmp_path, sink_cls, name):
    h = read_history(_write(sink_cls, tmp_path / name))
    assert h["step"] == [1, 2, 3, 4, 5, 6]
    assert math.isinf(h["rho_a"][1]) and math.isnan(h["tau"][3])
    assert h["skipped"] == [0, 0, 0, 1, 0, 0]
    assert math.isnan(h["loss"][4]) and h["loss"][0] == 2.0


def test_plot_file_and_default_output(tmp_path):
    out = plot_history(_write(CSVSink, tmp_path / "radius.csv"))
    assert out == tmp_path / "radius.png"
    assert out.read_bytes()[:8] == PNG


def test_plot_run_folder_with_several_histories(tmp_path):
    _write(CSVSink, tmp_path / "run" / "seed0.csv")
    _write(JSONLSink, tmp_path / "run" / "sub" / "seed1.jsonl")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"lr": 0.1}))  # not a history
    assert [p.name for p in find_histories(tmp_path / "run")] == ["seed0.csv", "seed1.jsonl"]
    out = plot_history(tmp_path / "run", out=tmp_path / "figs" / "h.png")
    assert out.read_bytes()[:8] == PNG


def test_framework_logs_with_prefixed_columns(tmp_path):
    # a Lightning CSVLogger metrics.csv: ghoststep/* columns, other metrics in other rows
    lightning = tmp_path / "metrics.csv"
    lightning.write_text(
        "epoch,ghoststep/rho_a,ghoststep/tau,step,train_loss,val_acc\n"
        "0,0.5,0.25,0,2.0,\n0,0.4,0.2,1,1.5,\n0,,,1,,0.9\n"
    )
    h = read_history(lightning)
    assert h["step"] == [0, 1] and h["loss"] == [2.0, 1.5] and h["tau"] == [0.25, 0.2]
    # a transformers trainer_state.json
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [
        {"loss": 3.0, "ghoststep/tau": 0.1, "ghoststep/rho_a": 0.2, "step": 5},
        {"train_loss": 2.5, "train_runtime": 1.0, "step": 5},
    ]}))  # fmt: skip
    h = read_history(state)
    assert h["step"] == [5] and h["loss"] == [3.0]
    assert plot_history(tmp_path).read_bytes()[:8] == PNG


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_history(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="no radius history"):
        plot_history(tmp_path)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a ghoststep history"):
        read_history(tmp_path / "other.csv")


def _corrupt(path, line: int, text: str):
    """The history of ``_write`` with its line ``line`` (1-based) replaced by ``text``."""
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plot_names_a_corrupt_jsonl_line(tmp_path, capsys):
    from ghoststep.cli import main

    # two writers on one file: the tail of one record glued to the next
    path = _corrupt(_write(JSONLSink, tmp_path / "h.jsonl"), 4, '0.1, "rho_a": 0.3}{"step": 5')
    assert main(["plot", str(path)]) == 1
    err = capsys.readouterr().err
    print(err)
    assert f"{path}:4: corrupt line: expected one JSON object per line" in err
    assert not (tmp_path / "h.png").exists()
    with pytest.raises(ValueError, match=r"h\.jsonl:4: "):
        plot_history(tmp_path)  # a folder: the damaged history is reported, not skipped


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            lambda fields: "3,03,0.49,1.28,0.38,0.38,1.0",
            r"h\.csv:4: malformed row: expected \d+ .*got 7",
        ),
        (
            lambda fields: ",".join(["3", "0.1.2", *["1"] * (fields - 2)]),
            r"h\.csv:4: column 'tau': expected a number",
        ),
    ],
    ids=["field-count", "number"],
)
def test_plot_reports_a_malformed_csv_row(tmp_path, row, expected):
    path = _write(CSVSink, tmp_path / "h.csv")
    fields = len(path.read_text().splitlines()[0].split(","))
    path = _corrupt(path, 4, row(fields))
    with pytest.raises(ValueError, match=expected) as caught:
        plot_history(path)
    print(caught.value)
