"""What a controlled step costs: plain optimizer vs RadiusController, side by side.

Four parts, every number measured in this one process:

1. **Time.** For each model, identical copies train on the same batches, interleaved
   step by step (the order rotates, so machine load and cache warmth hit every variant
   alike): plain optimizer, controller ``method="jvp"`` (exact), ``method="fast"`` (one
   extra forward), for the MLP and the TinyLM ``"fast"`` with ``subset=16,
   buffer_size=16``, and the always-on mode ``method="fast", every=10`` (on CUDA also
   ``method="auto", every=10``; on a CPU ``"auto"`` is ``"fast"``). One timed step is
   zero_grad, forward, cross-entropy, backward, step; the table gives the median after
   a warm-up and the ratio to plain; for an always-on column the amortized cost (the
   medians of its measured and its unmeasured steps weighted by their counts), the
   median of its unmeasured steps over plain ("between": what a step between
   measurements costs) and how many timed steps it measured ("meas"); the floor of
   ``"fast"`` (1 + one no-grad forward / plain step) and what one forward-mode JVP
   costs in no-grad forwards (``"jvp"``'s extra work).
2. **Agreement.** Monitor-mode runs of a ``"fast"`` and a sampled ``"fast"``
   controller; after each step, the exact radius of the update just applied (a
   full-float32 JVP at the same parameters and batch): per step the radius of
   ``"fast"`` over the exact one (share within 2 %, largest overshoot), and how often
   the sampled radius exceeds the whole-batch one by > 10 %.
3. **Memory.** Peak memory allocated inside ``step()`` (the torch profiler's CPU
   allocation events), in units of the trainable parameters' bytes, on a model whose
   activations are small next to its parameters.
4. **Protection** (``--protect-steps``, default 300). Three copies of each model from
   one init train on the same batches: plain, exact (``RadiusController(opt, model)``,
   the default: measured every step) and always-on (``RadiusController(opt, model,
   every=10)``), with the learning rate held at 10^4 times its value for the sixth of
   the run that starts at its first third (steps 100..149 of 300). The data can be
   learned: the MLP's labels are the argmax of a fixed random linear map of its N(0, 1)
   input, the image models' the argmax of one of a 4 x 4 x 3 N(0, 1) grid that the
   image shows as 8 x 8 blocks under N(0, 0.25) pixel noise; the TinyLM reads sequences
   of a fixed random bigram Markov chain on 1024 of its tokens (each token followed by
   its first successor with probability 0.8, else its second; the best next-token
   accuracy is 80 %) and predicts the next token.
   Per variant: accuracy and cross-entropy on a held-out batch (eval mode) at the end;
   for the always-on run (``--check-exact``: the exact one too) the realised r of every
   applied update, re-measured over the whole training batch in float64 at the old
   parameters (a float64 copy of the model, a float64 JVP of the logits along new -
   old; r = max over positions of (max_k t_k - min_k t_k) / pi): the share of steps
   with r <= 1.1, the largest r, the steps with r > 1.5; and how many steps the
   controller measured. ``--protect-batch MODEL=N`` and ``--protect-resnet-width``
   shrink the models to fit a CPU's time (the documented run: ``cnn_bn=32 tinylm=16
   resnet18=32`` and width 16, see docs/benchmarks.md).

Models: ``cnn_bn`` (3 conv-BN-ReLU-pool blocks, 3x32x32, batch 128, Adam), ``mlp_res``
(residual GELU MLP, 256 features, width 512, 4 blocks, batch 256, Adam), ``tinylm``
(V = 8192, d = 128, 2 layers, B x T = 64 x 32 = 2048 positions, Adam), ``resnet18``
(CIFAR ResNet-18, 3x32x32, batch 64, SGD momentum 0.9; in the protection part batch 16
by default). Adam at 1e-3, SGD at 0.01. Parts 1-3 draw random inputs and labels: cost
and agreement do not need real data.

    .venv/bin/python benchmarks/bench_controller_overhead.py --threads 1 2 --skip protection
    .venv/bin/python benchmarks/bench_controller_overhead.py --models mlp_res --steps 20
    .venv/bin/python benchmarks/bench_controller_overhead.py --skip time agreement memory \
        --threads 2 --protect-batch cnn_bn=32 tinylm=16 resnet18=32 --protect-resnet-width 16
    python benchmarks/bench_controller_overhead.py --device cuda --models resnet18 --batch 128
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import statistics
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ghoststep.controller import RadiusController
from ghoststep.evaluation import directional, full_float32, trainable_parameters
from ghoststep_lab.common.models import TinyLM, resnet18_cifar


class CNNBatchNorm32(nn.Module):
    """Three conv(3x3)-BN-ReLU-maxpool blocks (32, 64, 128 channels) and a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(128 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class ResidualMLP(nn.Module):
    """x + W2 GELU(W1 LN(x)) blocks on 256 features, width 512, then a linear head."""

    def __init__(self, features: int = 256, width: int = 512, blocks: int = 4, classes=10):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(features),
                nn.Linear(features, width),
                nn.GELU(),
                nn.Linear(width, features),
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class Setup:
    """A model factory, a batch sampler and an optimizer factory."""

    def __init__(self, build, batch: Callable, optimizer: Callable, sampled: bool):
        self.build, self.batch, self.optimizer, self.sampled = build, batch, optimizer, sampled


def _images(n: int, gen: torch.Generator):
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _tokens(n: int, gen: torch.Generator, vocab: int = 8192, length: int = 32):
    idx = torch.randint(0, vocab, (n, length + 1), generator=gen)
    return idx[:, :-1], idx[:, 1:]


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3)


SETUPS = {
    "cnn_bn": Setup(CNNBatchNorm32, lambda g, b: _images(b or 128, g), _adam, False),
    "mlp_res": Setup(
        ResidualMLP,
        lambda g, b: (
            torch.randn(b or 256, 256, generator=g),
            torch.randint(0, 10, (b or 256,), generator=g),
        ),
        _adam,
        True,
    ),
    "tinylm": Setup(
        lambda: TinyLM(vocab_size=8192, d_model=128, n_layers=2, n_heads=4, max_len=32),
        lambda g, b: _tokens(b or 64, g),
        _adam,
        True,
    ),
    "resnet18": Setup(
        resnet18_cifar,
        lambda g, b: _images(b or 64, g),
        lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        False,
    ),
}


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


CONTROLLERS = {
    "jvp": {"method": "jvp"},
    "fast": {"method": "fast"},
    "fast+sample": {"method": "fast", "subset": 16, "buffer_size": 16},
    "on fast/10": {"method": "fast", "every": 10},
    "on auto/10": {"method": "auto", "every": 10},
}
ALWAYS_ON = ("on fast/10", "on auto/10")


def timing_labels(name: str, device: str) -> list[str]:
    """The controller columns of the time table: the sampled one for the sampled
    models; ``"auto"`` always-on on CUDA only (on a CPU ``"auto"`` is ``"fast"``)."""
    labels = ["jvp", "fast", "fast+sample", *ALWAYS_ON]
    if not SETUPS[name].sampled:
        labels.remove("fast+sample")
    if not device.startswith("cuda"):
        labels.remove("on auto/10")
    return labels


def variants(name: str, device: str, seed: int, mode: str, labels):
    """(label, model, optimizer) for plain and each controller setting in ``labels``
    (keys of :data:`CONTROLLERS`); identical init."""
    setup = SETUPS[name]
    torch.manual_seed(seed)
    base = setup.build().to(device)
    out = []
    for label in ("plain", *labels):
        model = copy.deepcopy(base)
        opt = setup.optimizer(model.parameters())
        if label != "plain":
            opt = RadiusController(opt, model, mode=mode, **CONTROLLERS[label])
        out.append((label, model, opt))
    return out


def _timed(fn: Callable[[], object], on_cuda: bool) -> float:
    """Seconds of ``fn()``, the device synchronized before and after."""
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def timed_step(model, opt, x, y) -> float:
    def step():
        opt.zero_grad()
        loss_of(model(x), y).backward()
        opt.step()

    return _timed(step, x.is_cuda)


def timed_forward(model, x) -> float:
    """One forward without grad (what ``"fast"`` adds): 1 + this / plain is its floor."""
    return _timed(torch.no_grad()(lambda: model(x)), x.is_cuda)


def timed_dual_forward(model, x) -> float:
    """One forward-mode JVP along a random direction (what ``"jvp"`` adds): over
    :func:`timed_forward`, how many forwards PyTorch's forward-mode rules cost."""
    tangents = [torch.randn_like(p) for _, p in trainable_parameters(model)]
    return _timed(lambda: directional(model, (x,), {}, tangents, method="jvp"), x.is_cuda)


def bench_time(name: str, *, steps: int, warmup: int, batch, device: str, seed: int):
    """Median ms per label (``"forward"``, ``"dual"`` too); for an always-on label the
    amortized ms (the medians of its measured and unmeasured steps weighted by their
    counts: robust to a loaded machine, unlike a mean), its ``" between"`` median (the
    unmeasured steps) and its ``" measured"`` count of the timed steps."""
    runs = variants(name, device, seed, "clip", timing_labels(name, device))
    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    times["forward"], times["dual"] = [], []
    measured: dict[str, list[bool]] = {label: [] for label, _, _ in runs}
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(warmup + steps):
        x, y = (t.to(device) for t in SETUPS[name].batch(gen, batch))
        k = i % len(runs)
        for label, model, opt in runs[k:] + runs[:k]:  # rotate the order every step
            seconds = timed_step(model, opt, x, y)
            if i >= warmup:
                times[label].append(seconds)
                measured[label].append(getattr(opt, "last", None) is None or opt.last.measured)
        if i >= warmup:
            times["forward"].append(timed_forward(runs[0][1], x))
            times["dual"].append(timed_dual_forward(runs[0][1], x))
    ms = {label: statistics.median(v) * 1e3 for label, v in times.items()}
    for label in ALWAYS_ON:
        if label in measured:
            ms.update(_amortized(label, times[label], measured[label]))
    return ms


def _amortized(label: str, seconds: list[float], measured: list[bool]) -> dict[str, float]:
    on = [s for s, m in zip(seconds, measured, strict=True) if m]
    off = [s for s, m in zip(seconds, measured, strict=True) if not m]
    between = statistics.median(off) * 1e3 if off else math.nan
    mean = sum(statistics.median(part) * 1e3 * len(part) for part in (on, off) if part)
    return {label: mean / len(seconds), f"{label} between": between, f"{label} measured": len(on)}


def exact_rho(model: nn.Module, x: torch.Tensor, old, new) -> float:
    """The exact (JVP) radius of the update new - old along the batch x, at old."""
    params = [p for _, p in trainable_parameters(model)]
    update = torch._foreach_sub(new, old)
    tau = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(update)).double()))
    torch._foreach_copy_(params, old)
    try:
        with full_float32():
            _, slopes = directional(model, (x,), {}, update, method="jvp")
    finally:
        torch._foreach_copy_(params, new)
    slopes = slopes.reshape(-1, slopes.shape[-1])
    return math.pi * tau / float((slopes.amax(-1) - slopes.amin(-1)).max())


@torch.no_grad()
def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in trainable_parameters(model)]


def bench_agreement(name: str, *, steps: int, batch, device: str, seed: int):
    """Monitor mode: each "fast" controller's radius over the exact JVP radius of the
    update it just applied, at the same parameters and batch (measured after the step,
    so the two see one state; a comparison across model copies would not survive the
    nondeterministic kernels of a GPU, which let copies drift apart)."""
    labels = ["fast", "fast+sample"] if SETUPS[name].sampled else ["fast"]
    runs = variants(name, device, seed, "monitor", labels)[1:]
    gen = torch.Generator().manual_seed(seed + 2)
    ratios: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for _ in range(steps):
        x, y = (t.to(device) for t in SETUPS[name].batch(gen, batch))
        for label, model, opt in runs:
            opt.zero_grad()
            loss_of(model(x), y).backward()
            old = _snapshot(model)
            opt.step()
            rho = opt.last.rho_a
            with torch.no_grad():
                ratios[label].append(rho / exact_rho(model, x, old, _snapshot(model)))
    fast = ratios["fast"]
    within = sum(abs(r - 1.0) <= 0.02 for r in fast) / len(fast)
    sampled = ratios.get("fast+sample")
    over = sum(r > 1.10 for r in sampled) / len(sampled) if sampled else None
    return within, max(r - 1.0 for r in fast), max(abs(r - 1.0) for r in fast), over


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops allocate while active (peak over the run)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                try:
                    inputs.add(t.untyped_storage().data_ptr())
                except RuntimeError:
                    pass
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel():
                try:
                    storage = t.untyped_storage()
                    key, nbytes = storage.data_ptr(), storage.nbytes()
                except RuntimeError:  # e.g. forward-AD wrappers: their tangents count
                    continue
                if nbytes and key not in self._seen and key not in inputs:  # new storage
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key, nbytes)
        return out


def bench_memory(device: str, seed: int) -> dict[str, tuple[float, float]]:
    """(kept between steps, peak allocated inside step()) in parameter copies; mlp_res
    at batch 8, where the activations are small next to the parameters."""
    runs = variants("mlp_res", device, seed, "clip", ["jvp", "fast"])
    gen = torch.Generator().manual_seed(seed + 3)
    param_bytes = sum(p.numel() * p.element_size() for p in runs[0][1].parameters())
    out = {}
    for label, model, opt in runs[:3]:
        for _ in range(3):  # the optimizer state and the spare exist before the last step
            x, y = (t.to(device) for t in SETUPS["mlp_res"].batch(gen, 8))
            opt.zero_grad()
            loss_of(model(x), y).backward()
            with _LiveBytes() as tracker:
                opt.step()
        proposal = getattr(opt, "_proposal", None)
        spare = (proposal.spare if proposal is not None else None) or []
        kept = sum(t.numel() * t.element_size() for t in spare)
        out[label] = (kept / param_bytes, tracker.peak / param_bytes)
    return out


# ------------------------------------------------------------------- 4. protection


@dataclass(frozen=True)
class Task:
    """Learnable data for the protection table: ``batch(gen, n)`` draws (x, y) whose
    labels a fixed random teacher sets; ``optimizer(params, lr=lr)``; ``size`` rows per
    training batch, ``held_out`` rows in the held-out batch."""

    build: Callable[[], nn.Module]
    batch: Callable
    optimizer: Callable
    lr: float
    size: int
    held_out: int = 512


def _teacher(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def linear_teacher(features: int, classes: int = 10, seed: int = 1234):
    """x ~ N(0, 1) of ``features``, y = argmax of a fixed random linear map of x."""
    weight = _teacher((features, classes), seed)

    def batch(gen: torch.Generator, n: int):
        x = torch.randn(n, features, generator=gen)
        return x, (x @ weight).argmax(1)

    return batch


def image_teacher(cells: int = 4, noise: float = 0.5, classes: int = 10, seed: int = 1234):
    """3x32x32 images: a ``cells`` x ``cells`` N(0, 1) grid per channel, each cell a
    constant block, plus N(0, ``noise``^2) pixel noise; y = argmax of a fixed random
    linear map of the grid (a CNN learns it in a few hundred steps; a linear teacher
    on white-noise pixels it does not)."""
    weight = _teacher((3 * cells * cells, classes), seed)

    def batch(gen: torch.Generator, n: int):
        grid = torch.randn(n, 3, cells, cells, generator=gen)
        x = F.interpolate(grid, scale_factor=32 // cells, mode="nearest")
        x = x + noise * torch.randn(x.shape, generator=gen)
        return x, (grid.flatten(1) @ weight).argmax(1)

    return batch


def bigram_chain(states: int = 1024, length: int = 32, keep: float = 0.8, seed: int = 1234):
    """Token sequences of a fixed random bigram Markov chain on ``states`` tokens: each
    token is followed by its first successor with probability ``keep``, else by its
    second (entropy 0.5 nat, best next-token accuracy ``keep``); y = the next token."""
    successors = torch.randint(
        0, states, (states, 2), generator=torch.Generator().manual_seed(seed)
    )

    def batch(gen: torch.Generator, n: int):
        tokens = [torch.randint(0, states, (n,), generator=gen)]
        for _ in range(length):
            second = (torch.rand(n, generator=gen) >= keep).long()
            tokens.append(successors[tokens[-1], second])
        seq = torch.stack(tokens, 1)
        return seq[:, :-1], seq[:, 1:]

    return batch


def protection_tasks(batches: dict[str, int], resnet_width: int = 64) -> dict[str, Task]:
    """The four models' tasks; ``batches`` overrides their training batch sizes."""
    tasks = {
        "cnn_bn": Task(CNNBatchNorm32, image_teacher(), torch.optim.Adam, 1e-3, 128),
        "mlp_res": Task(ResidualMLP, linear_teacher(256), torch.optim.Adam, 1e-3, 256),
        "tinylm": Task(SETUPS["tinylm"].build, bigram_chain(), torch.optim.Adam, 1e-3, 64, 256),
        "resnet18": Task(
            functools.partial(resnet18_cifar, width=resnet_width),
            image_teacher(),
            functools.partial(torch.optim.SGD, momentum=0.9),
            0.01,
            16,
        ),
    }
    return {
        name: dataclasses.replace(t, size=batches.get(name, t.size)) for name, t in tasks.items()
    }


PROTECTED = {"plain": None, "exact": {}, "always-on": {"every": 10}}


@torch.no_grad()
def realised_r(twin64: nn.Module, x: torch.Tensor, old, new) -> float:
    """The normalized step of the update ``new - old`` applied, re-measured over the
    whole batch in float64 at ``old``: max over positions of (max_k t_k - min_k t_k)
    / pi, t the float64 JVP of the logits along the update (``twin64``: a float64 copy
    of the model, in its train/eval mode; temperature 1)."""
    params = [p for _, p in trainable_parameters(twin64)]
    torch._foreach_copy_(params, old)
    update = [n.double() - o.double() for n, o in zip(new, old, strict=True)]
    x64 = x.double() if x.is_floating_point() else x
    with torch.autocast(x.device.type, enabled=False):
        _, slopes = directional(twin64, (x64,), {}, update, method="jvp")
    slopes = slopes.reshape(-1, slopes.shape[-1])
    return float((slopes.amax(-1) - slopes.amin(-1)).max()) / math.pi


class Protected:
    """One variant of the protection run: its model, optimizer and, when checked, the
    realised r of every applied update and whether the controller measured it."""

    def __init__(self, model: nn.Module, inner, controller: dict | None, checked: bool):
        self.model, self.inner = model, inner
        # the float64 copy before the controller attaches its hooks to the model
        self.twin64 = copy.deepcopy(model).double() if checked else None
        self.opt = inner if controller is None else RadiusController(inner, model, **controller)
        self.realised: list[float] = []
        self.measured = 0

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.opt.zero_grad()
        loss_of(self.model(x), y).backward()
        old = _snapshot(self.model) if self.twin64 is not None else None
        self.opt.step()
        if self.opt is not self.inner:
            self.measured += bool(self.opt.last.measured)
        if old is not None:
            self.realised.append(realised_r(self.twin64, x, old, _snapshot(self.model)))

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(accuracy, loss) on a held-out batch, the model in eval mode."""
        self.model.eval()
        logits = self.model(x)
        self.model.train()
        accuracy = (logits.argmax(-1) == y).double().mean()
        return float(accuracy), float(loss_of(logits, y))


def bench_protection(name: str, task: Task, *, steps: int, spike, device: str, seed: int, checked):
    """``steps`` steps of plain / exact (the default controller, every step) /
    always-on (``every=10``) from one init on the same batches, the learning rate
    ``spike[0]`` times its value on steps ``spike[1]`` to ``spike[2] - 1``; returns per
    variant its :class:`Protected` and (accuracy, loss) on a held-out batch."""
    torch.manual_seed(seed)
    base = task.build().to(device)
    runs = {}
    for label, controller in PROTECTED.items():
        model = copy.deepcopy(base)
        runs[label] = Protected(
            model, task.optimizer(model.parameters(), lr=task.lr), controller, label in checked
        )
    gen = torch.Generator().manual_seed(seed + 4)
    factor, start, stop = spike
    for i in range(steps):
        x, y = (t.to(device) for t in task.batch(gen, task.size))
        lr = task.lr * (factor if start <= i < stop else 1.0)
        for run in runs.values():
            run.step(x, y, lr)
    held_out = task.batch(torch.Generator().manual_seed(seed + 5), task.held_out)
    held_out = [t.to(device) for t in held_out]
    return {label: (run, run.evaluate(*held_out)) for label, run in runs.items()}


def protection_row(name: str, label: str, run: Protected, accuracy: float, loss: float) -> str:
    cells = [f"{name:9s} {label:10s} {100 * accuracy:8.1f} {loss:9.4g}"]
    if run.realised:
        r = torch.tensor(run.realised)
        cells.append(
            f"{100 * float((r <= 1.1).double().mean()):9.1f}% {float(r.max()):8.3f}"
            f" {int((r > 1.5).sum()):7d}"
        )
    else:
        cells.append(f"{'-':>10s} {'-':>8s} {'-':>7s}")
    cells.append(f"{run.measured:9d}" if run.opt is not run.inner else f"{'-':>9s}")
    return " ".join(cells)


def print_time(args) -> None:
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n## step time, {threads} thread(s): median ms (ratio to plain), interleaved")
        print(
            f"{'model':9s} {'plain':>8s} {'jvp':>15s} {'fast':>15s} {'fast+sample':>15s} "
            + "".join(f"{label:>16s} {'between':>8s} {'meas':>4s}" for label in ALWAYS_ON)
            + f" {'fast floor':>11s} {'dual/forward':>13s}"
        )
        for name in args.models:
            steps = max(6, args.steps // 3) if name == "resnet18" else args.steps
            ms = bench_time(
                name,
                steps=steps,
                warmup=args.warmup,
                batch=args.batch,
                device=args.device,
                seed=args.seed,
            )
            print(f"{name:9s} " + " ".join(time_cells(ms)), flush=True)


def time_cells(ms: dict[str, float]) -> list[str]:
    def ratio(label: str, width: int = 15) -> str:
        if label not in ms:
            return f"{'-':>{width}s}"
        return f"{ms[label]:{width - 8}.1f} ({ms[label] / ms['plain']:.2f}x)"

    cells = [f"{ms['plain']:8.1f}", *(ratio(label) for label in ("jvp", "fast", "fast+sample"))]
    for label in ALWAYS_ON:
        cells.append(ratio(label, 16))
        between = ms.get(f"{label} between", math.nan) / ms["plain"]
        cells.append(f"{between:7.2f}x" if math.isfinite(between) else f"{'-':>8s}")
        cells.append(f"{ms[label + ' measured']:4d}" if label in ms else f"{'-':>4s}")
    cells.append(f"{1 + ms['forward'] / ms['plain']:10.2f}x")
    cells.append(f"{ms['dual'] / ms['forward']:12.2f}x")
    return cells


def print_agreement(args) -> None:
    torch.set_num_threads(max(args.threads))
    print(
        f"\n## agreement, {args.agree_steps} monitor-mode steps vs the exact radius of each update"
    )
    print(
        f"{'model':9s} {'fast within 2%':>15s} {'max overshoot':>14s} {'max |error|':>12s} "
        f"{'sampled > +10%':>15s}"
    )
    for name in args.models:
        within, worst, err, over = bench_agreement(
            name,
            steps=args.agree_steps,
            batch=args.batch,
            device=args.device,
            seed=args.seed,
        )
        over_text = "-" if over is None else f"{100 * over:.0f}%"
        print(
            f"{name:9s} {100 * within:14.0f}% {100 * worst:+13.3f}% {100 * err:11.3f}% "
            f"{over_text:>15s}",
            flush=True,
        )


def print_memory(args) -> None:
    print("\n## memory in parameter copies (mlp_res, batch 8; Adam state not counted)")
    print(f"{'':6s} {'kept between steps':>19s} {'peak inside step()':>19s}")
    for label, (kept, peak) in bench_memory(args.device, args.seed).items():
        print(f"{label:6s} {kept:19.2f} {peak:19.2f}")


def print_protection(args) -> None:
    torch.set_num_threads(max(args.threads))
    steps = args.protect_steps
    spike = (1e4, steps // 3, steps // 3 + steps // 6)
    checked = {"always-on", "exact"} if args.check_exact else {"always-on"}
    print(
        f"\n## protection, {steps} steps, learning rate x{spike[0]:g} on steps {spike[1]}.."
        f"{spike[2] - 1}; realised r of every applied update (float64, whole batch)"
    )
    print(
        f"{'model':9s} {'variant':10s} {'acc %':>8s} {'loss':>9s} {'r <= 1.1':>10s} "
        f"{'max r':>8s} {'r > 1.5':>7s} {'measured':>9s}"
    )
    for name, task in protection_tasks(dict(args.protect_batch), args.protect_resnet_width).items():
        if name not in args.models:
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():  # "training is nearly frozen": the spike, clipped
            warnings.filterwarnings("ignore", "RadiusController: the step scale", RuntimeWarning)
            results = bench_protection(
                name,
                task,
                steps=steps,
                spike=spike,
                device=args.device,
                seed=args.seed,
                checked=checked,
            )
        for label, (run, (accuracy, loss)) in results.items():
            print(protection_row(name, label, run, accuracy, loss), flush=True)
        print(f"{'':9s} ({time.perf_counter() - start:.0f} s)", flush=True)


def _model_batch(text: str) -> tuple[str, int]:
    name, _, size = text.partition("=")
    if name not in SETUPS or not size.isdigit():
        raise argparse.ArgumentTypeError(f"expected MODEL=N with MODEL in {list(SETUPS)}")
    return name, int(size)


PARTS = {
    "time": print_time,
    "agreement": print_agreement,
    "memory": print_memory,
    "protection": print_protection,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=30, help="timed steps (resnet18: a third)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--agree-steps", type=int, default=20)
    parser.add_argument("--protect-steps", type=int, default=300)
    parser.add_argument(
        "--protect-batch",
        nargs="*",
        default=[],
        type=_model_batch,
        metavar="MODEL=N",
        help="protection: training batch per model (default cnn_bn=128 mlp_res=256 "
        "tinylm=64 resnet18=16)",
    )
    parser.add_argument(
        "--protect-resnet-width",
        type=int,
        default=64,
        help="protection: resnet18's base width (64: the standard one)",
    )
    parser.add_argument(
        "--check-exact",
        action="store_true",
        help="protection: re-measure the exact mode's updates too (the always-on ones always)",
    )
    parser.add_argument("--batch", type=int, default=None, help="override every model's batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--no-tf32",
        action="store_true",
        help="CUDA: float32 convolutions and matmuls in full precision for training too",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=list(PARTS))
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    print(
        f"torch {torch.__version__}, device {args.device}, seed {args.seed}"
        + (f", TF32 {'allowed' if tf32 else 'off'}" if args.device.startswith("cuda") else "")
    )
    for part, run in PARTS.items():
        if part not in args.skip:
            run(args)


if __name__ == "__main__":
    main()
