"""Speed of the certified exact radius (issue target: 10,000 x 10 in < 2 s on one core).

python benchmarks/bench_exact_radius.py [--samples 10000] [--classes 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ghoststep.radius import exact_radius, rho_bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logit-scale", type=float, default=3.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.samples, args.classes, generator=gen) * args.logit_scale
    slopes = torch.randn(args.samples, args.classes, generator=gen)
    logits, slopes = logits.to(args.device), slopes.to(args.device)
    exact_radius(logits[:100], slopes[:100])  # warm-up
    times = []
    for _ in range(args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        rho = exact_radius(logits, slopes)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    ratio = rho / rho_bound(slopes)
    print(
        f"exact_radius {args.samples} x {args.classes} on {args.device} "
        f"({args.threads} thread(s)): median {statistics.median(times):.3f} s, "
        f"min {min(times):.3f} s over {args.repeats} runs; "
        f"uncertified {int(torch.isnan(rho).sum())}; "
        f"rho*/rho_a median {ratio.median().item():.3f}, min {ratio.min().item():.3f}"
    )


if __name__ == "__main__":
    main()
