"""Per-step wall time: plain optimizer vs the same optimizer wrapped in RadiusController.

Digits models (mlp, cnn_bn, ...) use Adam; ``resnet18`` uses SGD with momentum 0.9 on
CIFAR-shaped random images (paper section 8.6 measures ResNet-18, batch 128, on a GPU).

One full training step is timed (zero_grad, forward, cross-entropy, backward, step) for
two identical models side by side in one process, interleaved step by step so that
machine load affects both alike; after a warm-up the median over N steps is reported.

    .venv/bin/python benchmarks/bench_controller_overhead.py [--steps 100] [--threads 2]
    python benchmarks/bench_controller_overhead.py --device cuda --models mlp cnn_bn resnet18

Needs scikit-learn (the digits data).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from ghoststep.controller import RadiusController
from ghoststep.experiments.models import build_model


def load_digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, _, ytr, _ = train_test_split(X / 16.0, y, test_size=0.2, stratify=y, random_state=0)
    return torch.tensor(Xtr, dtype=torch.float32), torch.tensor(ytr)


def timed_step(model, opt, x, y) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sync()
    return time.perf_counter() - start


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "resnet18":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def bench(name: str, X, y, *, batch: int, steps: int, warmup: int, lr: float, seed: int):
    torch.manual_seed(seed)
    plain_model = build_model(name).to(X.device)
    ctrl_model = copy.deepcopy(plain_model)
    plain = make_optimizer(name, plain_model.parameters(), lr)
    ctrl = RadiusController(
        make_optimizer(name, ctrl_model.parameters(), lr), ctrl_model, mode="clip"
    )
    g = torch.Generator().manual_seed(seed)
    t_plain, t_ctrl, t_radius = [], [], []
    for i in range(warmup + steps):
        idx = torch.randint(0, len(X), (batch,), generator=g).to(X.device)
        x, t = X[idx], y[idx]
        pair = [(plain_model, plain, t_plain), (ctrl_model, ctrl, t_ctrl)]
        if i % 2:  # alternate the order, so neither always runs on a warm cache
            pair.reverse()
        for model, opt, out in pair:
            seconds = timed_step(model, opt, x, t)
            if i >= warmup:
                out.append(seconds)
        if i >= warmup:
            t_radius.append(ctrl.last.radius_seconds)
    p, c, r = (statistics.median(v) * 1e3 for v in (t_plain, t_ctrl, t_radius))
    return p, c, r


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn_bn"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    digits = tuple(t.to(args.device) for t in load_digits_train())
    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
        f"batch {args.batch}, "
        f"median of {args.steps} steps after {args.warmup} warm-up, interleaved"
    )
    print(f"{'model':8s} {'plain ms':>9s} {'ctrl ms':>9s} {'radius ms':>10s} {'overhead':>9s}")
    for name in args.models:
        if name == "resnet18":
            from ghoststep.experiments.data import fake_cifar10

            X, y = (t.to(args.device) for t in fake_cifar10(n=1024, seed=args.seed))
        else:
            X, y = digits
        p, c, r = bench(
            name,
            X,
            y,
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            lr=args.lr,
            seed=args.seed,
        )
        print(f"{name:8s} {p:9.3f} {c:9.3f} {r:10.3f} {100 * (c - p) / p:8.1f}%")


if __name__ == "__main__":
    main()
