"""Each slope method in each training precision: accuracy, realised r and cost.

Methods ``"jvp"`` (forward-mode AD), ``"fast"`` (one-sided float32 difference) and
``"fd"`` (central float64 difference) x precisions ``fp32``, ``bf16-autocast``
(``torch.autocast(dtype=torch.bfloat16)`` around the training forward),
``bf16-params`` (``model.to(torch.bfloat16)``) and ``fp16-autocast`` (float16 autocast
with ``torch.amp.GradScaler``), on an MLP, the CNN with BatchNorm, the TinyLM and a
tiny Hugging Face GPT-2, each trained with Adam at a learning rate at which the clip
binds on some steps. Random inputs (accuracy and cost need no real data); every
number below is measured in this one process.

1. **Accuracy** (plain Adam run, no controller). At every step the update Adam just
   applied is the direction v; at the old parameters each method runs as
   ``ghoststep.evaluation.directional`` in the precision's measurement context:
   ``"jvp"`` under the training forward's autocast (bf16 / fp16 tangents) or on the
   bf16 parameters, ``"fast"`` and ``"fd"`` with autocast off (``"fast"`` differences
   two float32 forwards, its own float32 baseline; ``"fd"`` is float64 by
   construction, its slopes returned in the parameters' dtype). The reference is a
   float64 JVP of a float64 copy of the model (same batch, same direction, same
   train/eval mode). Per logit position (a row of the logits) the relative error of
   the spread ``max_k a_k - min_k a_k`` (computed, as the library does, in the dtype
   of the returned slopes): median, 99th percentile and max over positions and steps;
   and the relative error of the batch's max spread (the quantity that sets the
   radius): largest |error| and most negative (an under-measured spread lets r
   exceed its target).
2. **Realised r** (``RadiusController(opt, model, mode="clip", target_r=1.0,
   method=m)``, plain Adam beside it). After each step the applied update (parameters
   after minus before) is re-measured in float64 at the old parameters on the training
   batch (:func:`realised_r`): max over the steps of ``max_position spread(J_z(old)
   @ applied) / pi``. ``opt.step()`` runs outside the autocast block (the PyTorch AMP
   recipe); ``--step-in-autocast`` puts it inside. A method the controller refuses,
   or a step that raises, prints as ``refused: <error>`` / ``error: <error>``.
3. **Time** (the same runs, interleaved step by step with a rotating order): median
   of one step (zero_grad, forward, loss, backward, step) after a warm-up, controller
   over plain. CPU bf16 / fp16 timings are not GPU timings.
4. ``--device cuda``: the same controlled runs in bf16 autocast (time and realised r)
   on a GPT-2-small-sized decoder (124M parameters, 8 x 1024 random tokens, eager
   attention for every variant: forward-mode AD has no flash / memory-efficient
   attention) and a CIFAR ResNet-18 at batch 128.

    .venv/bin/python benchmarks/bench_precision.py --threads 1
    .venv/bin/python benchmarks/bench_precision.py --quick
    .venv/bin/python benchmarks/bench_precision.py --models tinylm --precisions bf16-autocast
    python benchmarks/bench_precision.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ghoststep.controller import RadiusController
from ghoststep.evaluation import default_logits_fn, directional, trainable_parameters
from ghoststep.radius import logit_spread
from ghoststep_lab.common.models import MLP, CNNBatchNorm, TinyLM, resnet18_cifar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("jvp", "fast", "fd")


# ----------------------------------------------------------------------- precisions


@dataclass(frozen=True)
class Precision:
    """How the model trains: autocast dtype of the training forward, parameter dtype,
    and whether a GradScaler drives the step."""

    autocast: torch.dtype | None = None
    params: torch.dtype = torch.float32
    scaler: bool = False

    def training(self, device_type: str):
        """The context of the training forward."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast)

    def measuring(self, method: str, device_type: str):
        """The context a method measures in: ``"jvp"`` in the training forward's
        autocast, the differences with autocast off (float32 / float64 forwards)."""
        if method == "jvp":
            return self.training(device_type)
        return torch.autocast(device_type, enabled=False)


PRECISIONS = {
    "fp32": Precision(),
    "bf16-autocast": Precision(autocast=torch.bfloat16),
    "bf16-params": Precision(params=torch.bfloat16),
    "fp16-autocast": Precision(autocast=torch.float16, scaler=True),
}


# ----------------------------------------------------------------------- models


@dataclass
class Setup:
    """A model factory, a batch sampler ``(generator) -> (x, y)`` and Adam's lr."""

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    lr: float


def _features(n: int, gen: torch.Generator):
    return torch.rand(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _images(n: int, gen: torch.Generator):
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _tokens(n: int, length: int, vocab: int, gen: torch.Generator):
    idx = torch.randint(0, vocab, (n, length + 1), generator=gen)
    return idx[:, :-1], idx[:, 1:]


def gpt2(vocab: int, length: int, d: int, layers: int, heads: int) -> nn.Module:
    """A randomly initialised Hugging Face GPT-2 (no download), eager attention (the
    one with forward-mode AD), dropout off (the float64 reference must see the same
    function), no KV cache."""
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=length,
        n_embd=d,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def cpu_setups(quick: bool) -> dict[str, Setup]:
    """MLP 64-128-10 (batch 256), CNN+BN on 8x8 images (batch 128), TinyLM and tiny
    GPT-2 (V = 512, d = 64, 2 layers, 8 x 32 tokens); ``quick``: a quarter of that."""
    n_mlp, n_cnn, (b, t, v) = (64, 32, (4, 16, 128)) if quick else (256, 128, (8, 32, 512))
    return {
        "mlp": Setup(MLP, lambda g: _features(n_mlp, g), 3e-2),
        "cnn_bn": Setup(CNNBatchNorm, lambda g: _features(n_cnn, g), 3e-2),
        "tinylm": Setup(
            lambda: TinyLM(vocab_size=v, d_model=64, n_layers=2, n_heads=4, max_len=t),
            lambda g: _tokens(b, t, v, g),
            1e-2,
        ),
        "gpt2": Setup(
            lambda: gpt2(v, t, d=64, layers=2, heads=4), lambda g: _tokens(b, t, v, g), 1e-2
        ),
    }


def cuda_setups(quick: bool, lm_batch: int, lm_length: int) -> dict[str, Setup]:
    """GPT-2-small-sized decoder (V = 50257, d = 768, 12 layers, 12 heads) on random
    tokens and a CIFAR ResNet-18 at batch 128 (``quick``: 2 layers, 4 x 128 tokens,
    batch 16)."""
    layers, batch, length, images = (2, 4, 128, 16) if quick else (12, lm_batch, lm_length, 128)
    return {
        "gpt2_small": Setup(
            lambda: gpt2(50257, length, d=768, layers=layers, heads=12),
            lambda g: _tokens(batch, length, 50257, g),
            1e-3,
        ),
        "resnet18": Setup(resnet18_cifar, lambda g: _images(images, g), 1e-3),
    }


# ----------------------------------------------------------------------- helpers


def loss_of(output, y: torch.Tensor) -> torch.Tensor:
    logits = default_logits_fn(output)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_step(model, opt, scaler, precision: Precision, x, y, step_in_autocast: bool):
    """zero_grad, forward (in the precision's autocast), loss, backward, step
    (through the GradScaler when there is one)."""
    device_type = x.device.type
    opt.zero_grad(set_to_none=True)
    with precision.training(device_type):
        loss = loss_of(model(x), y)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    with precision.training(device_type) if step_in_autocast else contextlib.nullcontext():
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


@torch.no_grad()
def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in trainable_parameters(model)]


@contextlib.contextmanager
def parameters_at(model: nn.Module, values: Sequence[torch.Tensor]):
    """The trainable parameters set to ``values`` inside the block, then restored."""
    params = [p for _, p in trainable_parameters(model)]
    saved = snapshot(model)
    with torch.no_grad():
        torch._foreach_copy_(params, list(values))
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)


def _timed(fn: Callable[[], object], on_cuda: bool) -> float:
    """Seconds of ``fn()``, the device synchronized before and after."""
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# the first line of each distinct error a cell printed, listed after the tables
MESSAGES: dict[str, str] = {}


def _describe(err: BaseException) -> str:
    kind = "refused" if isinstance(err, (ValueError, NotImplementedError)) else "error"
    text = f"{kind}: {type(err).__name__}"
    MESSAGES.setdefault(f"{text}: {str(err).splitlines()[0][:200] if str(err) else ''}", text)
    return text


# ------------------------------------------------------ the float64 re-measurement


def float64_twin(model: nn.Module) -> nn.Module:
    """A float64 deep copy of ``model`` for :func:`float64_spreads` / :func:`realised_r`
    (build it before a controller attaches its hooks: a deep copy would copy them)."""
    return copy.deepcopy(model).to(torch.float64)


def _wide(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


@torch.no_grad()
def float64_spreads(
    twin64: nn.Module,
    model: nn.Module,
    args: tuple,
    params: Sequence[torch.Tensor],
    direction: Sequence[torch.Tensor],
    kwargs: dict | None = None,
    output_fn: Callable | None = None,
) -> torch.Tensor:
    """Per logit position, the spread of ``J_z(params) @ direction`` by a float64 JVP:
    ``twin64`` (a :func:`float64_twin` of ``model``) takes ``params`` (trainable
    parameters in ``trainable_parameters`` order), ``model``'s buffers and, module by
    module, its train/eval mode; floating inputs are widened to float64."""
    twin_params = [p for _, p in trainable_parameters(twin64)]
    torch._foreach_copy_(twin_params, [p.double() for p in params])
    for b64, b in zip(twin64.buffers(), model.buffers(), strict=True):
        b64.copy_(b)
    for m64, m in zip(twin64.modules(), model.modules(), strict=True):
        m64.training = m.training
    tangents = [v.double() for v in direction]
    args64 = tuple(_wide(a) for a in args)
    kwargs64 = {k: _wide(v) for k, v in (kwargs or {}).items()}
    device_type = twin_params[0].device.type
    with torch.autocast(device_type, enabled=False):
        _, slopes = directional(
            twin64, args64, kwargs64, tangents, method="jvp", output_fn=output_fn
        )
    return logit_spread(slopes.reshape(-1, slopes.shape[-1]))


def realised_r(
    twin64: nn.Module,
    model: nn.Module,
    args: tuple,
    old: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    kwargs: dict | None = None,
    output_fn: Callable | None = None,
) -> float:
    """The normalized step r of the update ``new - old`` actually applied, re-measured
    in float64 at ``old`` on the batch ``args``: ``max over positions of
    spread(J_z(old) @ (new - old)) / pi`` (temperature 1). Independent of how the
    controller measured it."""
    applied = [n.double() - o.double() for n, o in zip(new, old, strict=True)]
    if not any(bool(a.any()) for a in applied):
        return 0.0
    spreads = float64_spreads(twin64, model, args, old, applied, kwargs, output_fn)
    return float(spreads.max()) / math.pi


# ----------------------------------------------------------------------- 1. accuracy


@dataclass
class Accuracy:
    """Per-position relative spread errors and max-spread errors of one method."""

    status: str = ""
    per_position: list[torch.Tensor] = field(default_factory=list)
    max_spread: list[float] = field(default_factory=list)

    def row(self) -> list[str]:
        if self.status or not self.per_position:
            text = self.status or "n/a (no step)"
            return [text] + [""] * 4
        err = torch.cat(self.per_position)
        q = torch.quantile(err[torch.randperm(err.numel())[:1_000_000]], 0.99)
        worst = max(abs(e) for e in self.max_spread)
        under = min(self.max_spread)
        return [
            f"{100 * float(err.median()):.3g} %",
            f"{100 * float(q):.3g} %",
            f"{100 * float(err.max()):.3g} %",
            f"{100 * worst:.3g} %",
            f"{100 * under:+.3g} %",
        ]


def bench_accuracy(setup: Setup, precision: Precision, steps: int, device: str, seed: int):
    """``{method: Accuracy}`` and the number of steps measured (a GradScaler-skipped
    step applies no update, so it has no direction)."""
    torch.manual_seed(seed)
    model = setup.build().to(device=device, dtype=precision.params).train()
    twin = float64_twin(model)
    opt = torch.optim.Adam(model.parameters(), lr=setup.lr)
    scaler = torch.amp.GradScaler(device) if precision.scaler else None
    gen = torch.Generator().manual_seed(seed + 1)
    out = {m: Accuracy() for m in METHODS}
    measured = 0
    for _ in range(steps):
        x, y = setup.batch(gen)
        x = (x.to(precision.params) if x.is_floating_point() else x).to(device)
        y = y.to(device)
        old = snapshot(model)
        train_step(model, opt, scaler, precision, x, y, step_in_autocast=False)
        new = snapshot(model)
        # the applied update, as a tangent in the parameters' dtype (exact in float32;
        # in bf16 the rounded difference, the same direction for every evaluation)
        v = [(n.float() - o.float()).to(n.dtype) for n, o in zip(new, old, strict=True)]
        if not any(bool(t.any()) for t in v):
            continue
        measured += 1
        ref = float64_spreads(twin, model, (x,), old, v)
        keep = ref > 0
        with parameters_at(model, old):
            for method, acc in out.items():
                if acc.status:
                    continue
                try:
                    with precision.measuring(method, x.device.type):
                        _, slopes = directional(model, (x,), {}, v, method=method)
                except Exception as err:  # noqa: BLE001 - a refused cell is a result
                    acc.status = _describe(err)
                    continue
                spread = logit_spread(slopes.reshape(-1, slopes.shape[-1])).double()
                acc.per_position.append(((spread[keep] - ref[keep]).abs() / ref[keep]).cpu())
                acc.max_spread.append(float(spread.max() / ref.max()) - 1.0)
    return out, measured


# ------------------------------------------------------ 2. + 3. realised r and time


@dataclass
class Variant:
    label: str
    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    status: str = ""
    seconds: list[float] = field(default_factory=list)
    r: list[float] = field(default_factory=list)
    reported: list[float] = field(default_factory=list)
    clipped: int = 0


def bench_controlled(
    setup: Setup,
    precision: Precision,
    *,
    steps: int,
    warmup: int,
    device: str,
    seed: int,
    step_in_autocast: bool,
    remeasure: bool = True,
) -> dict[str, Variant]:
    """Plain Adam and one clip controller per method, identical copies on the same
    batches, interleaved with a rotating order; each step timed, its applied update
    re-measured by :func:`realised_r` outside the timed region."""
    torch.manual_seed(seed)
    base = setup.build().to(device=device, dtype=precision.params).train()
    twin = float64_twin(base) if remeasure else None
    runs: list[Variant] = []
    for label in ("plain", *METHODS):
        model = copy.deepcopy(base)
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=setup.lr)
        status = ""
        if label != "plain":
            try:
                opt = RadiusController(opt, model, mode="clip", target_r=1.0, method=label)
            except Exception as err:  # noqa: BLE001 - a refused cell is a result
                status = _describe(err)
        scaler = torch.amp.GradScaler(device) if precision.scaler else None
        runs.append(Variant(label, model, opt, scaler, status))
    gen = torch.Generator().manual_seed(seed + 1)
    on_cuda = device.startswith("cuda")
    for i in range(steps):
        x, y = setup.batch(gen)
        x = (x.to(precision.params) if x.is_floating_point() else x).to(device)
        y = y.to(device)
        k = i % len(runs)
        for run in runs[k:] + runs[:k]:  # rotate the order every step
            if run.status:
                continue
            old = snapshot(run.model) if remeasure else None
            try:
                one_step = functools.partial(
                    train_step, run.model, run.opt, run.scaler, precision, x, y, step_in_autocast
                )
                seconds = _timed(one_step, on_cuda)
            except Exception as err:  # noqa: BLE001 - a failed cell is a result
                run.status = _describe(err)
                continue
            if i >= warmup:
                run.seconds.append(seconds)
            if remeasure:
                run.r.append(realised_r(twin, run.model, (x,), old, snapshot(run.model)))
            last = getattr(run.opt, "last", None)
            if last is not None:
                run.reported.append(float(last.r_after))
                run.clipped += bool(last.scale < 1.0)
    return {run.label: run for run in runs}


# ----------------------------------------------------------------------- printing


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in (header, ["-" * w for w in widths], *rows)
    ]
    return "\n".join(lines)


def _r_cell(run: Variant) -> str:
    if run.status:
        return run.status
    if not run.r:
        return "-"
    text = f"{max(run.r):.5f}"
    if run.reported:
        over = sum(r > 1.001 for r in run.r)
        text += (
            f" (says {max(run.reported):.5f}, clip {run.clipped}/{len(run.reported)}"
            f", >1.001 {over})"
        )
    return text


def _ms_cell(run: Variant, plain: Variant) -> str:
    if run.status:
        return run.status
    if not run.seconds or not plain.seconds:
        return "-"
    ms = statistics.median(run.seconds) * 1e3
    if run is plain:
        return f"{ms:.1f}"
    return f"{ms:.1f} ({ms / (statistics.median(plain.seconds) * 1e3):.2f}x)"


def main(argv: list[str] | None = None) -> None:
    cpu_names, cuda_names = ["mlp", "cnn_bn", "tinylm", "gpt2"], ["gpt2_small", "resnet18"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=cpu_names + cuda_names, default=None)
    parser.add_argument(
        "--precisions", nargs="+", choices=list(PRECISIONS), default=None,
        help="default: all on the CPU, bf16-autocast on CUDA",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="training steps (20; quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (3; quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds", type=int, default=1, help="repeat every run with seeds seed .. seed+N-1"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "controlled"])
    parser.add_argument(
        "--step-in-autocast", action="store_true", help="call opt.step() inside the autocast"
    )
    parser.add_argument(
        "--no-remeasure", action="store_true", help="controlled runs: time only, no realised r"
    )
    parser.add_argument("--lm-batch", type=int, default=8, help="CUDA GPT-2-small batch")
    parser.add_argument("--lm-length", type=int, default=1024, help="CUDA GPT-2-small length")
    args = parser.parse_args(argv)

    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        parser.exit(2, "--device cuda: torch.cuda.is_available() is False here; nothing run\n")
    seeds = range(args.seed, args.seed + args.seeds)
    steps = args.steps or (4 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if on_cuda:
        setups = cuda_setups(args.quick, args.lm_batch, args.lm_length)
        models = args.models or cuda_names
        precisions = args.precisions or ["bf16-autocast"]
        skip = set(args.skip) | {"accuracy"}  # the GPU mode times (and re-measures r)
    else:
        setups = cpu_setups(args.quick)
        models = args.models or cpu_names
        precisions = args.precisions or list(PRECISIONS)
        skip = set(args.skip)
    unknown = [m for m in models if m not in setups]
    if unknown:
        parser.error(f"models {unknown} are for the other --device")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    where = torch.cuda.get_device_name() if on_cuda else f"cpu, {torch.get_num_threads()} thread(s)"
    print(
        f"torch {torch.__version__}, {where}, seeds {list(seeds)}, {steps} steps per run"
        + (" (quick sizes)" if args.quick else "")
        + (", opt.step() inside autocast" if args.step_in_autocast else "")
    )
    start = time.perf_counter()

    summary: dict[tuple[str, str], list] = {}
    if "accuracy" not in skip:
        print(
            "\n## 1. slope accuracy vs a float64 JVP (plain Adam run; the applied update as"
            " the direction)\n\nper-position relative error of the spread: median, 99th"
            " percentile, max over positions and steps; max spread: the batch's largest"
            " spread, largest |relative error| and most negative error over the steps\n"
        )
        rows = []
        for name in models:
            for prec in precisions:
                accs, measured = {m: Accuracy() for m in METHODS}, 0
                for seed in seeds:
                    more, n = bench_accuracy(
                        setups[name], PRECISIONS[prec], steps, args.device, seed
                    )
                    measured += n
                    for method, acc in more.items():
                        accs[method].status = accs[method].status or acc.status
                        accs[method].per_position += acc.per_position
                        accs[method].max_spread += acc.max_spread
                for method, acc in accs.items():
                    rows.append([name, prec, method, str(measured), *acc.row()])
                    summary.setdefault((prec, method), []).append(acc)
                print(f"  ... {name} {prec} ({time.perf_counter() - start:.0f} s)", flush=True)
        header = ["model", "precision", "method", "steps", "median", "p99", "max",
                  "max-spread abs err", "max-spread worst"]  # fmt: skip
        print("\n" + table(header, rows), flush=True)

    realised: dict[tuple[str, str], list[float]] = {}
    if "controlled" not in skip:
        results = {}
        for name in models:
            for prec in precisions:
                for seed in seeds:
                    runs = bench_controlled(
                        setups[name],
                        PRECISIONS[prec],
                        steps=steps,
                        warmup=warmup,
                        device=args.device,
                        seed=seed,
                        step_in_autocast=args.step_in_autocast,
                        remeasure=not args.no_remeasure,
                    )
                    merged = results.setdefault((name, prec), runs)
                    if merged is not runs:
                        for label, run in runs.items():
                            into = merged[label]
                            into.status = into.status or run.status
                            into.seconds += run.seconds
                            into.r += run.r
                            into.reported += run.reported
                            into.clipped += run.clipped
                print(f"  ... {name} {prec} ({time.perf_counter() - start:.0f} s)", flush=True)
        if not args.no_remeasure:
            print(
                "\n## 2. realised r in clip mode (target_r = 1), re-measured in float64 at the"
                " old parameters on the training batch: max over the steps (what the"
                " controller reported, steps it scaled down, steps with r > 1.001)\n"
            )
            rows = []
            for (name, prec), runs in results.items():
                rows.append([name, prec] + [_r_cell(runs[m]) for m in ("plain", *METHODS)])
                for m in METHODS:
                    if not runs[m].status and runs[m].r:
                        realised.setdefault((prec, m), []).append(max(runs[m].r))
            print(table(["model", "precision", "plain", *METHODS], rows), flush=True)
        print(
            f"\n## 3. step time, {where}: median ms after {warmup} warm-up steps (ratio to"
            " plain), interleaved\n"
        )
        rows = []
        for (name, prec), runs in results.items():
            plain = runs["plain"]
            rows.append([name, prec] + [_ms_cell(runs[m], plain) for m in ("plain", *METHODS)])
        print(table(["model", "precision", "plain", *METHODS], rows))
        if not on_cuda:
            print(
                "\nCaveat: CPU timings. bf16 / fp16 on a CPU are not GPU timings: on tensor-core"
                " GPUs bf16 matmuls run several times faster than float32, so a float32"
                ' "fast" forward (or a float64 "fd") beside a bf16 training forward costs'
                " relatively more there. Run `--device cuda` for GPU figures."
            )
        else:
            print(
                "\nAll variants use eager attention (forward-mode AD has no fused attention);"
                f" TF32 {'allowed' if torch.backends.cuda.matmul.allow_tf32 else 'off'} for"
                " float32 matmuls."
            )

    if summary:
        print("\n## summary per method x precision, worst over the models\n")
        rows = []
        for (prec, method), accs in summary.items():
            done = [a for a in accs if not a.status and a.per_position]
            r = realised.get((prec, method))
            r_text = f"{max(r):.5f}" if r else "-"
            if not done:
                statuses = sorted({a.status or "n/a" for a in accs})
                rows.append([prec, method, ", ".join(statuses), "", "", r_text])
                continue
            pos = max(float(torch.cat(a.per_position).max()) for a in done)
            worst = max(max(abs(e) for e in a.max_spread) for a in done)
            under = min(min(a.max_spread) for a in done)
            rows.append(
                [prec, method, f"{100 * pos:.3g} %", f"{100 * worst:.3g} %",
                 f"{100 * under:+.3g} %", r_text]
            )  # fmt: skip
        header = ["precision", "method", "max per-position err", "max-spread abs err",
                  "max-spread worst", "max realised r (controller)"]  # fmt: skip
        print(table(header, rows))
    if MESSAGES:
        print("\nmessages of the refused / failed cells:")
        for message in MESSAGES:
            print(f"- {message}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
