"""The experiments' subcommands of the ``ghoststep`` command: ``run``, ``list``,
``report`` and ``demo``.

The library's command line (``ghoststep.cli``) imports ``COMMANDS`` from here when this
package is installed; each entry is ``name -> (help, add_arguments, handler)``, as the
library's own subcommands. Adding a subcommand = write the two functions and add one
line to ``COMMANDS``.

Examples::

    ghoststep list
    ghoststep run hessian --preset quick
    ghoststep run spike --preset paper --seeds 0 1 2 3 4 --out runs/spike-final
    ghoststep run resnet --data-dir ~/data/cifar10 --set epochs=2
    ghoststep report                 # merge every run under ./runs into ./report.md
    ghoststep demo
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

# ----------------------------------------------------------------------------- run


def _add_run(p: argparse.ArgumentParser) -> None:
    from ghoststep_lab import EXPERIMENTS

    p.add_argument(
        "experiment",
        choices=list(EXPERIMENTS),
        metavar="EXPERIMENT",
        help="one of: " + ", ".join(EXPERIMENTS),
    )
    p.add_argument(
        "--preset",
        default="paper",
        help="'paper' (the paper's protocol, default) or 'quick' (seconds)",
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", metavar="SEED", help="seeds to run (replaces the preset's)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set steps=100 (repeatable; lists comma-separated)",
    )
    p.add_argument(
        "--data-dir",
        help="data folder for experiments that read files (sets the config field data_dir)",
    )
    p.add_argument("--out", help="run folder (default: RUNS_DIR/<experiment>-<timestamp>)")
    p.add_argument("--runs-dir", default="runs", help="parent of new run folders (default: runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cmd_run(args: argparse.Namespace) -> int:
    from ghoststep_lab import ExperimentNotWritten
    from ghoststep_lab.common.runner import ConfigError, parse_override, run_experiment

    overrides = {}
    try:
        for text in args.overrides:
            key, value = parse_override(text)
            overrides[key] = value
    except ConfigError as exc:
        return fail(str(exc))
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    command = "ghoststep " + shlex.join(args.argv) if args.argv is not None else None
    try:
        out = run_experiment(
            args.experiment,
            args.preset,
            seeds=args.seeds,
            overrides=overrides,
            out=args.out,
            runs_root=args.runs_dir,
            progress=not args.no_progress,
            command=command,
        )
    except (ConfigError, ExperimentNotWritten, FileNotFoundError) as exc:
        # user-facing problems; bugs inside an experiment keep their traceback
        return fail(str(exc))
    _print_outcome(args.experiment, out)
    return 0


def _print_outcome(name: str, out) -> None:
    """The experiment's own headline if its module defines ``headline(results)`` (the
    claim count then stays in the report), else the claim count; then where the report
    and the figures are."""
    from ghoststep_lab import load_experiment

    headline = getattr(load_experiment(name), "headline", None)
    if headline is not None:
        print("\n".join(headline(out.results)))
    else:
        claims = out.results.get("claims", [])
        ok = sum(1 for c in claims if c["reproduced"])
        print(f"{name}: {ok}/{len(claims)} claims reproduced")
    print(f"report: {out.report_path}")
    for figure in out.results.get("figures", []):
        print(f"figure: {out.out_dir / figure['file']}")


# ----------------------------------------------------------------------------- list


def _add_list(p: argparse.ArgumentParser) -> None:
    pass


def _cmd_list(args: argparse.Namespace) -> int:
    from ghoststep_lab import EXPERIMENTS

    width = max(len(n) for n in EXPERIMENTS)
    for name, entry in EXPERIMENTS.items():
        print(f"{name:<{width}}  {entry.description} [{entry.paper}]")
    return 0


# ----------------------------------------------------------------------------- report


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs",
        nargs="*",
        metavar="RUN_DIR",
        help="run folders holding results.json or results.json.gz (default: every run "
        "under ./runs)",
    )
    p.add_argument("--out", default=".", help="folder for the merged report.md (default: .)")


def _cmd_report(args: argparse.Namespace) -> int:
    from ghoststep_lab.common.report import render_merged_report
    from ghoststep_lab.common.results import RESULTS_FILE, results_file

    if args.runs:
        dirs = [Path(d) for d in args.runs]
        missing = [str(d) for d in dirs if results_file(d) is None]
        if missing:
            return fail(f"no {RESULTS_FILE} (or {RESULTS_FILE}.gz) in: {', '.join(missing)}")
    else:
        dirs = sorted(p.parent for p in Path("runs").glob(f"*/{RESULTS_FILE}"))
        if not dirs:
            return fail(f"no runs found under ./runs (no */{RESULTS_FILE})")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text(render_merged_report(dirs, out_dir), encoding="utf-8")
    print(f"merged {len(dirs)} run(s) into {path}")
    return 0


# ----------------------------------------------------------------------------- demo


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--every", type=int, default=25, help="print a row every N steps")
    p.add_argument("--seed", type=int, default=0)


def _cmd_demo(args: argparse.Namespace) -> int:
    """MLP on digits with Adam wrapped in ``RadiusController(mode="monitor")`` (bitwise
    plain Adam); every N steps the controller's ``StepStats``: tau, rho_a, r."""
    import torch

    from ghoststep import RadiusController
    from ghoststep_lab.common.data import load_digits_split
    from ghoststep_lab.common.models import build_model
    from ghoststep_lab.common.training import evaluate, set_seed, train

    t0 = time.perf_counter()
    data = load_digits_split(seed=args.seed)
    generator = set_seed(args.seed)
    model = build_model("mlp")
    adam = torch.optim.Adam(model.parameters(), lr=args.lr)
    opt = RadiusController(adam, model, mode="monitor")  # records, changes nothing

    print(f"ghoststep demo: MLP on sklearn digits, Adam lr={args.lr:g}, batch {args.batch_size}")
    print(
        "r = tau / rho_a: the length of Adam's update over the guaranteed radius "
        "pi / max Delta a along it (r < 1: inside the convergence disk)"
    )
    header = f"{'step':>5} {'loss':>8} {'test acc':>8} {'tau':>9} {'rho_a':>9} {'r':>8}"
    print(header)
    print("-" * len(header))

    def after(info) -> None:
        if info.step % args.every == 0 or info.step == args.steps - 1:
            stats = opt.last  # the StepStats of the step just taken
            test = evaluate(model, data.X_test, data.y_test)
            print(
                f"{info.step:>5d} {info.loss:>8.4f} {test.accuracy:>8.1%} {stats.tau:>9.3g} "
                f"{stats.rho_a:>9.3g} {stats.r_after:>8.3f}"
            )

    train(model, data, opt, args.steps, args.batch_size, on_step=after, generator=generator)
    r_max = max(stats.r_after for stats in opt.history)
    print(f"largest r of the last {len(opt.history)} steps: {r_max:.3g}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


# ----------------------------------------------------------------------------- registry

# name -> (help, add_arguments, handler)
COMMANDS: dict[str, tuple[str, Callable, Callable[[argparse.Namespace], int]]] = {
    "run": ("run one experiment and write its report", _add_run, _cmd_run),
    "list": ("list the experiments", _add_list, _cmd_list),
    "report": ("merge runs' results into one Markdown report", _add_report, _cmd_report),
    "demo": ("train an MLP on digits and watch r = tau / rho_a", _add_demo, _cmd_demo),
}


def fail(message: str, code: int = 1) -> int:
    """Print ``ghoststep: error: <message>`` to stderr and return ``code``."""
    print(f"ghoststep: error: {message}", file=sys.stderr)
    return code
