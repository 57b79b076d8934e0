"""The ghoststep command line: its own subcommand (``plot``, also in test_plots), the
table of subcommands, and what ``run`` / ``list`` / ``report`` / ``demo`` say when the
experiments are not installed (their own tests are in experiments/tests/test_cli.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from ghoststep.cli import COMMANDS, LAB_COMMANDS, all_commands, build_parser, main


@pytest.fixture
def no_lab(monkeypatch):
    """The experiments package made unimportable, as in an install of the library alone."""
    for name in [m for m in sys.modules if m == "ghoststep_lab" or m.startswith("ghoststep_lab.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ghoststep_lab", None)


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("run", "list", "report", "demo", "plot"):
        assert name in out


def test_console_script_plot_help():
    exe = Path(sys.executable).parent / "ghoststep"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ghoststep.cli"]
    proc = subprocess.run(cmd + ["plot", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "RUN_OR_CSV" in proc.stdout


def _subcommands() -> dict:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_registered_command_is_a_subcommand_dispatching_to_its_handler():
    commands = all_commands()
    choices = _subcommands()
    assert list(choices) == list(commands)
    assert set(COMMANDS) <= set(choices) and set(LAB_COMMANDS) <= set(choices)
    for name, (help_text, _, handler) in commands.items():
        assert choices[name].get_default("handler") is handler
        assert choices[name].description == help_text


@pytest.mark.parametrize("argv", [["run", "spike", "--preset", "quick"], ["list"], ["demo"]])
def test_without_the_experiments_their_commands_say_how_to_install_them(no_lab, argv, capsys):
    assert list(_subcommands()) == [*LAB_COMMANDS, *COMMANDS]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"`ghoststep {argv[0]}`" in err and "pip install -e experiments" in err


def test_without_the_experiments_plot_still_works(no_lab, tmp_path, capsys):
    history = tmp_path / "radius.csv"
    history.write_text("step,tau,rho_a,r_before,r_after,scale,skipped\n0,1,2,0.5,0.5,1,0\n")
    pytest.importorskip("matplotlib")
    assert main(["plot", str(history)]) == 0
    assert (tmp_path / "radius.png").read_bytes()[:4] == b"\x89PNG"
