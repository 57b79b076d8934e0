"""Bitwise record of what the controller does, to compare two versions of the code.

Runs a fixed grid of short training runs (method x mode x dtype, an MLP with dropout
and a small causal token model) and saves, per run, the final parameters and every
step's ``StepStats`` (without the timing). ``--compare`` loads two such files and
reports every run whose parameters or statistics differ in a single bit.

    .venv/bin/python benchmarks/step_fingerprint.py --out /tmp/before.pt
    # ... change the code ...
    .venv/bin/python benchmarks/step_fingerprint.py --out /tmp/after.pt
    .venv/bin/python benchmarks/step_fingerprint.py --compare /tmp/before.pt /tmp/after.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ghoststep import RadiusController

METHODS = ("jvp", "fast", "fd")
MODES = ("clip", "set", "monitor")


class TokenModel(nn.Module):
    """Embedding, one causal mixing layer and a head: logits (B, T, V)."""

    def __init__(self, vocab: int = 31, width: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        prefix = h.cumsum(1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)
        return self.head(torch.tanh(self.mix(prefix)) + h)


def build(kind: str, dtype: torch.dtype) -> tuple[nn.Module, list]:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 5)).to(
            dtype
        )
        batches = [
            (
                torch.randn(16, 12, generator=gen).to(dtype),
                torch.randint(0, 5, (16,), generator=gen),
            )
            for _ in range(6)
        ]
    else:
        model = TokenModel().to(dtype)
        batches = []
        for _ in range(6):
            tokens = torch.randint(0, 31, (4, 9), generator=gen)
            batches.append((tokens, tokens.roll(-1, 1)))
    return model, batches


def run(kind: str, method: str, mode: str, dtype: torch.dtype) -> dict:
    model, batches = build(kind, dtype)
    inner = torch.optim.Adam(model.parameters(), lr=0.3)
    extra = {"class_dim": -1} if kind == "token" else {}
    opt = RadiusController(inner, model, method=method, mode=mode, **extra)
    torch.manual_seed(1)
    for x, y in batches:
        opt.zero_grad()
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
        opt.step()
    stats = []
    for s in opt.history:
        row = dataclasses.asdict(s)
        row.pop("radius_seconds")
        row.pop("rho_samples")
        stats.append(row)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "stats": stats}


def grid() -> list[tuple[str, str, str, torch.dtype]]:
    runs = []
    for kind in ("mlp", "token"):
        for method in METHODS:
            for mode in MODES:
                for dtype in (torch.float32, torch.float64):
                    runs.append((kind, method, mode, dtype))
        for mode in MODES:
            runs.append((kind, "jvp", mode, torch.bfloat16))
    return runs


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and "step" in a:
        # a StepStats row: the fields both versions have (a field added since is new)
        return isinstance(b, dict) and all(same(a[k], b[k]) for k in a.keys() & b.keys())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the record of this code here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.compare:
        before, after = (torch.load(p, weights_only=False) for p in args.compare)
        differ = [key for key in before if not same(before[key], after.get(key))]
        print(f"{len(before) - len(differ)} of {len(before)} runs bitwise identical")
        for key in differ:
            print("differs:", key)
        return
    record = {}
    for kind, method, mode, dtype in grid():
        key = f"{kind}/{method}/{mode}/{str(dtype).removeprefix('torch.')}"
        record[key] = run(kind, method, mode, dtype)
    torch.save(record, args.out)
    print(f"{len(record)} runs written to {args.out}")


if __name__ == "__main__":
    main()
