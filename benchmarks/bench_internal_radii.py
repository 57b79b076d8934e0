"""What the attention radius costs: AllRadiiController's one pass vs a second JVP.

On the lmstability model (``ghoststep_lab.lmstability.build_lm`` with its paper preset:
TinyLM V = 2048, d = 32, 2 layers, 4 heads, GELU FFN, tied embeddings; batch 16 x 64
tokens, random token ids), identical copies train on the same batches with AdamW,
interleaved step by step (the order rotates every step, so machine load and cache
warmth hit every variant alike), in one process:

* ``adamw``: the plain optimizer;
* ``out``: ``RadiusController`` (the output-logit radius);
* ``out+attn 2-pass``: the attention radius from a second pass, a
  ``RadiusController`` whose ``extra_radii`` hook runs ``internal_radii`` (a second
  full JVP, attention and FFN radii) with ``limit_by=("out", "attn")``;
* ``out+attn 1-pass``: ``AllRadiiController(limit_by=("out", "attn"))``;
* ``out+attn+ffn 1-pass``: ``AllRadiiController()`` (all three radii);
* ``out + head clip``: the lmstability method ``ctrl_qk``, the ``out`` controller
  followed by :class:`~ghoststep_lab.common.lmrecipes.HeadRadiusClip` (its own JVP
  at the old parameters along the applied step, per-head attention radii).

Every controller clips at r* = 1 with the given slope ``--method``. One timed step is
zero_grad, forward, cross-entropy, backward, step; the table gives the median over
the timed steps and its ratio to ``adamw`` and to ``out``. The two out+attn variants
follow the same trajectory, so their radii are compared step by step too (largest
relative difference of the attention radius).

    PYTHONPATH=src:experiments/src .venv/bin/python benchmarks/bench_internal_radii.py
    PYTHONPATH=src:experiments/src .venv/bin/python benchmarks/bench_internal_radii.py \\
        --steps 60 --method fast
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from ghoststep.controller import AllRadiiController, RadiusController, internal_radii
from ghoststep_lab.common.lmrecipes import HeadRadiusClip
from ghoststep_lab.lmstability import Config, build_lm


def second_pass(model, inputs, update):
    """The ``extra_radii`` hook of the two-pass path: ``internal_radii``'s own JVP."""
    return internal_radii(model, inputs[0] if isinstance(inputs, tuple) else inputs, update)


def variants(config: Config, method: str, lr: float, seed: int):
    """``(label, model, optimizer, head clip or None)`` for each variant, from one
    initialisation."""
    torch.manual_seed(seed)
    base = build_lm(config, qk_layernorm=False)
    kw = dict(mode="clip", target_r=1.0, method=method, class_dim=-1)  # (B, T, V)
    makers = {
        "adamw": lambda m, o: o,
        "out": lambda m, o: RadiusController(o, m, **kw),
        "out+attn 2-pass": lambda m, o: RadiusController(
            o, m, extra_radii=second_pass, limit_by=("out", "attn"), **kw
        ),
        "out+attn 1-pass": lambda m, o: AllRadiiController(o, m, limit_by=("out", "attn"), **kw),
        "out+attn+ffn 1-pass": lambda m, o: AllRadiiController(o, m, **kw),
        "out + head clip": lambda m, o: RadiusController(o, m, **kw),
    }
    out = []
    for label, make in makers.items():
        model = copy.deepcopy(base)
        inner = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
        head_clip = HeadRadiusClip(1.0) if "head clip" in label else None
        out.append((label, model, make(model, inner), head_clip))
    return out


def timed_step(model, opt, x, y, head_clip) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    if head_clip is not None:
        head_clip.snapshot(model)
    opt.step()
    if head_clip is not None:
        head_clip.clip(model, x)
    return time.perf_counter() - start


def run(config: Config, *, method: str, lr: float, steps: int, warmup: int, seed: int):
    """Median ms per variant, and the largest relative difference of the attention
    radius between the two out+attn variants."""
    runs = variants(config, method, lr, seed)
    times: dict[str, list[float]] = {label: [] for label, *_ in runs}
    gap = 0.0
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (config.batch_size, config.seq_len + 1)
    for i in range(warmup + steps):
        tokens = torch.randint(0, config.vocab_size, shape, generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:]
        k = i % len(runs)
        for label, model, opt, head_clip in runs[k:] + runs[:k]:  # rotate the order
            seconds = timed_step(model, opt, x, y, head_clip)
            if i >= warmup:
                times[label].append(seconds)
        radii = {label: opt.last.radii for label, _, opt, _ in runs if "out+attn " in label}
        two, one = radii["out+attn 2-pass"]["attn"], radii["out+attn 1-pass"]["attn"]
        gap = max(gap, abs(one - two) / two)
    return {label: 1e3 * statistics.median(v) for label, v in times.items()}, gap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--method", default="jvp", choices=["jvp", "fast"])
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    config = Config()
    ms, gap = run(
        config, method=args.method, lr=args.lr, steps=args.steps, warmup=args.warmup,
        seed=args.seed,
    )  # fmt: skip
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), method {args.method}, "
        f"TinyLM V={config.vocab_size} d={config.d_model} L={config.n_layers} "
        f"H={config.n_heads}, batch {config.batch_size} x {config.seq_len} tokens, "
        f"{args.steps} timed steps after {args.warmup}, interleaved"
    )
    print(f"{'variant':21s} {'ms/step':>8s} {'vs adamw':>9s} {'vs out':>7s}")
    for label, value in ms.items():
        print(f"{label:21s} {value:8.1f} {value / ms['adamw']:8.2f}x {value / ms['out']:6.2f}x")
    print(f"attention radius, 1-pass vs 2-pass: largest relative difference {gap:.1e}")


if __name__ == "__main__":
    main()
