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
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from ghoststep import CSVSink, RadiusController
from ghoststep.controller import Recording


def digits(seed: int):
    """sklearn's 8x8 digits as float32 (N, 64) features in [0, 1] and labels, split 80/20."""
    X, y = load_digits(return_X_y=True)
    split = train_test_split(X / 16.0, y, test_size=0.2, stratify=y, random_state=seed)
    X_train, X_test, y_train, y_test = (torch.as_tensor(a) for a in split)
    return X_train.float(), y_train, X_test.float(), y_test


def forever(loader: DataLoader):
    """Batches epoch after epoch (reshuffled each time)."""
    while True:
        yield from loader


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
    X_train, y_train, X_test, y_test = digits(args.seed)
    loader = DataLoader(
        TensorDataset(X_train, y_train), batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # the one added line: wrap the optimizer
    opt = RadiusController(
        opt,
        model,
        mode="clip",
        target_r=args.target_r,
        recording=Recording(sinks=[CSVSink(args.out / "radius.csv")]),
    )

    batches = forever(loader)
    for step in range(1, args.steps + 1):
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
        accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
    clipped = sum(s.scale < 1 for s in opt.history)
    print(
        f"test accuracy {accuracy:.1%}; {clipped}/{len(opt.history)} steps clipped; "
        f"history in {args.out / 'radius.csv'}; {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
