"""Peak memory: plain forward vs chunked per-sample spread, large-vocabulary LM head.

The model is a minimal language model: token embedding (d=64), LayerNorm, and a
tied output head, so its logits are (B, T, V) = (8, 1024, 50257) by default, i.e.
8,192 samples over a 50,257-word vocabulary (1.6 GB of float32 logits).

Each figure comes from its own subprocess (peak RSS is monotonic within a process):
the child builds the model and inputs, warms up on a tiny batch, records its
baseline, runs the measured computation once and reports its peak minus the
baseline (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/bench_slopes_memory.py                  # full size, CPU
    python benchmarks/bench_slopes_memory.py --device cuda
    python benchmarks/bench_slopes_memory.py --tokens 2048 --vocab 8000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _build(args):
    import torch
    from torch import nn

    class TinyHeadLM(nn.Module):
        def __init__(self, vocab: int, d: int):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.ln(self.emb(idx)))

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = TinyHeadLM(args.vocab, args.d).to(device)
    batch = args.tokens // args.seq
    idx = torch.randint(0, args.vocab, (batch, args.seq), device=device)
    return model, idx


def _peak_bytes(device) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(args) -> None:
    import torch

    from ghoststep.evaluation import random_direction
    from ghoststep.measurement import per_sample_spread

    torch.set_num_threads(args.threads)
    model, idx = _build(args)
    direction = random_direction(model, seed=0)

    def run(inputs):
        if args.mode == "forward":
            with torch.no_grad():
                out = model(inputs)
            return out.shape
        spread = per_sample_spread(model, inputs, direction, chunk_size=args.chunk_size)
        return spread.shape

    run(idx[:1, :8])  # warm-up: lazy imports, decompositions, allocator
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _peak_bytes(args.device)
    start = time.perf_counter()
    shape = run(idx)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _peak_bytes(args.device)
    print(json.dumps({"peak_bytes": peak - baseline, "seconds": seconds, "shape": list(shape)}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=8192, help="B*T samples")
    parser.add_argument("--seq", type=int, default=1024, help="sequence length T")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1, help="sequences per JVP chunk")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=["forward", "spread"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokens % args.seq:
        parser.error("--tokens must be a multiple of --seq")
    if args.mode is not None:
        child(args)
        return

    results = {}
    for mode in ("forward", "spread"):
        cmd = [sys.executable, __file__, "--mode", mode]
        for key in ("device", "tokens", "seq", "vocab", "d", "chunk_size", "threads"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])

    mib = 1024**2
    fwd, spr = results["forward"], results["spread"]
    logits_mib = args.tokens * args.vocab * 4 / mib
    print(
        f"device={args.device} samples B*T={args.tokens} (B={args.tokens // args.seq}, "
        f"T={args.seq}) vocab={args.vocab} d={args.d} chunk_size={args.chunk_size} "
        f"(float32 logits alone: {logits_mib:.0f} MiB)"
    )
    print(
        f"plain forward (logits {fwd['shape']}):    peak {fwd['peak_bytes'] / mib:8.1f} MiB  "
        f"{fwd['seconds']:.2f} s"
    )
    print(
        f"chunked per-sample spread ({spr['shape']}): peak {spr['peak_bytes'] / mib:8.1f} MiB  "
        f"{spr['seconds']:.2f} s"
    )
    ratio = spr["peak_bytes"] / max(fwd["peak_bytes"], 1)
    print(f"ratio spread / forward = {ratio:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
