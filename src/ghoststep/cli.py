"""Command line: ``ghoststep plot|run|list|report|demo``.

Each subcommand is a pair of functions registered in a table ``name -> (help,
add_arguments, handler)``: one adds its arguments to an argparse sub-parser, the other
runs it and returns an exit code. The library's own subcommand is ``plot``
(``COMMANDS``); ``run``, ``list``, ``report`` and ``demo`` belong to the experiments
(the ``ghoststep-experiments`` distribution, import package ``ghoststep_lab``), looked
up when the command line is built. Without them those four say how to install them.

Examples::

    ghoststep plot runs/plain_loop/radius.csv   # loss, tau, rho_a, r, s -> radius.png
    ghoststep list
    ghoststep run hessian --preset quick
    ghoststep demo
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable, Sequence

from ghoststep import __version__

Command = tuple[str, Callable, Callable[[argparse.Namespace], int]]

# ----------------------------------------------------------------------------- plot


def _add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        metavar="RUN_OR_CSV",
        help="a radius history (CSVSink .csv, JSONLSink .jsonl, Lightning "
        "metrics.csv, transformers trainer_state.json) or a folder of them",
    )
    p.add_argument("--out", help="PNG to write (default: beside the file, or FOLDER/history.png)")


def _cmd_plot(args: argparse.Namespace) -> int:
    from ghoststep.plots import plot_history

    try:
        out = plot_history(args.path, args.out)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        return _fail(str(exc))
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- main

# the library's subcommands: name -> (help, add_arguments, handler)
COMMANDS: dict[str, Command] = {
    "plot": ("plot a radius history (loss, tau, rho_a, r, s) to PNG", _add_plot, _cmd_plot),
}

# the experiments' subcommands, and how to get them
LAB_MODULE = "ghoststep_lab.cli"
LAB_COMMANDS = ("run", "list", "report", "demo")
LAB_INSTALL = "pip install -e experiments"


def lab_commands() -> dict[str, Command]:
    """The experiments' subcommands (``ghoststep_lab.cli.COMMANDS``) when the package is
    installed, else one stand-in per name that says how to install it."""
    try:
        module = importlib.import_module(LAB_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name is None or LAB_MODULE.split(".")[0] != exc.name.split(".")[0]:
            raise  # the package is there but something it imports is not
        return {name: _missing_lab(name) for name in LAB_COMMANDS}
    return dict(module.COMMANDS)


@functools.cache
def _missing_lab(name: str) -> Command:
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def handler(args: argparse.Namespace) -> int:
        return _fail(
            f"`ghoststep {name}` is part of the experiments (the ghoststep-experiments "
            f"package, ghoststep_lab), which are not installed; from a clone of the "
            f"repository install them with: {LAB_INSTALL}"
        )

    return (f"(needs the experiments: {LAB_INSTALL})", add_arguments, handler)


def all_commands() -> dict[str, Command]:
    """Every subcommand: the experiments' (or their stand-ins), then the library's."""
    return {**lab_commands(), **COMMANDS}


def _fail(message: str, code: int = 1) -> int:
    print(f"ghoststep: error: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ghoststep",
        description="Step-safe cross-entropy: convergence radii from the ghosts of softmax "
        "(P. Sao, arXiv:2603.13552).",
    )
    parser.add_argument("--version", action="version", version=f"ghoststep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, handler) in all_commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ghoststep`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
