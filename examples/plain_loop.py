"""Plain PyTorch loop: Adam at a too-large learning rate, kept inside the radius.

The only change to an ordinary training loop is the line that wraps the optimizer. The
controller measures the radius on the batch the model's forward just saw and shrinks any
step longer than ``target_r`` radii; every step (loss, tau, rho_a, r, s) is recorded in
``radius.csv``.

    python examples/plain_loop.py                    # ~5 s on a laptop CPU
    python examples/plain_loop.py --steps 20 --out /tmp/plain
    ghoststep plot runs/plain_loop/radius.csv        # loss, tau, rho_a, r, s
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ghoststep import CSVSink, RadiusController
from ghoststep.experiments.data import load_digits_split, minibatches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05, help="deliberately large for Adam")
    parser.add_argument("--target-r", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/plain_loop"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    data = load_digits_split(seed=args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # the one added line: wrap the optimizer
    opt = RadiusController(
        opt, model, mode="clip", target_r=args.target_r, sinks=[CSVSink(args.out / "radius.csv")]
    )

    batches = minibatches(data.X_train, data.y_train, args.batch_size, seed=args.seed)
    for step in range(1, args.steps + 1):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = minibatches(data.X_train, data.y_train, args.batch_size, seed=step)
            x, y = next(batches)

        # `opt.zero_grad(); loss.backward(); opt.step()` works as well; a closure that
        # returns the loss only lets the history record it
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            s = opt.last
            print(
                f"step {step:4d}  loss {loss.item():.4f}  tau {s.tau:.3g}  rho_a {s.rho_a:.3g}"
                f"  r {s.r_before:6.2f} -> {s.r_after:.2f}  s {s.scale:.3f}"
            )
    opt.close()

    with torch.no_grad():
        accuracy = (model(data.X_test).argmax(1) == data.y_test).float().mean().item()
    clipped = sum(s.scale < 1 for s in opt.history)
    print(
        f"test accuracy {accuracy:.1%}; {clipped}/{len(opt.history)} steps clipped; "
        f"history in {args.out / 'radius.csv'}; {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
