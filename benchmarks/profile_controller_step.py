"""Where a controlled step's time goes: the torch profiler over a few steps of one
variant of ``bench_controller_overhead``'s models (the operators with the most self
time, and the host syncs: device-to-host copies and ``aten::item``).

    .venv/bin/python benchmarks/profile_controller_step.py --model mlp_res --variant fast
    python benchmarks/profile_controller_step.py --device cuda --model resnet18 --batch 128
"""

from __future__ import annotations

import argparse

import torch
from bench_controller_overhead import SETUPS, loss_of, variants
from torch.profiler import ProfilerActivity, profile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=list(SETUPS))
    parser.add_argument("--variant", default="fast", help="plain | jvp | fast | fast+sample")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    runs = {
        label: (model, opt) for label, model, opt in variants(args.model, args.device, 0, "clip")
    }
    model, opt = runs[args.variant]
    gen = torch.Generator().manual_seed(1)
    batches = [
        tuple(t.to(args.device) for t in SETUPS[args.model].batch(gen, args.batch))
        for _ in range(args.steps + 3)
    ]

    def step(x, y):
        opt.zero_grad()
        loss_of(model(x), y).backward()
        opt.step()

    for x, y in batches[:3]:
        step(x, y)
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for x, y in batches[3:]:
            step(x, y)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"{args.model} {args.variant} on {args.device}, {args.steps} steps")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.device.startswith("cuda"):
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    syncs = {e.key: e.count for e in events if e.key in ("aten::item", "aten::_local_scalar_dense")}
    syncs.update({e.key: e.count for e in events if "Synchronize" in e.key or "DtoH" in e.key})
    print("host syncs over the profiled steps:", syncs)


if __name__ == "__main__":
    main()
