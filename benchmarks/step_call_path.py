"""How deep one controlled step goes into the package: a profile hook over one clip step
(after a warm-up step) of a small MLP, counting the package's frames only.

Prints, per method: the deepest nesting of package frames on the stack (``depth``),
the package files those frames belong to (``files``) and the distinct package functions
called (``functions``); ``--list`` also prints the deepest stack and the files.

    .venv/bin/python benchmarks/step_call_path.py
    .venv/bin/python benchmarks/step_call_path.py --methods fast --list
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import ghoststep
from ghoststep import RadiusController

PACKAGE = os.path.dirname(ghoststep.__file__)


def trace_step(method: str) -> tuple[list[str], set[str], set[str]]:
    """(deepest stack of package functions, package files, package functions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = RadiusController(torch.optim.Adam(model.parameters(), lr=10.0), model, method=method)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))

    def train_step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    train_step()
    opt.step()  # warm-up: the first step resolves choices made once per run
    train_step()
    stack: list[str] = []
    deepest: list[str] = []
    files: set[str] = set()
    functions: set[str] = set()

    def profile(frame, event, arg) -> None:
        nonlocal deepest
        filename = frame.f_code.co_filename
        if not filename.startswith(PACKAGE):
            return
        name = f"{os.path.relpath(filename, PACKAGE)}:{frame.f_code.co_qualname}"
        if event == "call":
            stack.append(name)
            files.add(os.path.relpath(filename, PACKAGE))
            functions.add(name)
            if len(stack) > len(deepest):
                deepest = list(stack)
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(profile)
    try:
        opt.step()
    finally:
        sys.setprofile(None)
    assert opt.last.scale < 1.0, "the clip must bind for the path to be the clip path"
    return deepest, files, functions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["fast", "jvp"])
    parser.add_argument("--list", action="store_true", help="print the deepest stack and files")
    args = parser.parse_args(argv)
    print(f"{'method':8} {'depth':>5} {'files':>5} {'functions':>9}")
    for method in args.methods:
        deepest, files, functions = trace_step(method)
        print(f"{method:8} {len(deepest):5d} {len(files):5d} {len(functions):9d}")
        if args.list:
            print("  deepest: " + "\n        -> ".join(deepest))
            print("  files: " + ", ".join(sorted(files)))


if __name__ == "__main__":
    main()
