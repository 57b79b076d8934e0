"""Natural instability: ResNet-18 on CIFAR-10 (paper Fig. 12, Table 3, Section 6.7).

No spike is injected. ResNet-18 trains from scratch for 10 epochs with SGD + momentum
0.9 (batch 128) at four fixed learning rates, and r = tau / rho_a is logged every 50
steps of an epoch from the current batch (at most 256 rows), with tau the length of the
actual momentum update. Against them, four set-controllers
``RadiusController(mode="set", target_r=r*)`` choose every step's length as
``tau = r* rho_a`` along the momentum direction -- no base learning rate.

Paper (median final accuracy / max r): eta = 0.005: 80.4% / 1.11; 0.01: 82.6% / 1.23;
0.1: 78.5% / 5.87; 0.5: 57.5% / 29.3; r* = 0.5: 80.4%; 1: 85.3%; 2: 84.4%; 4: 72.1%.

Needs CIFAR-10 on disk (``--data-dir``, python-pickle batches) and, for the paper
protocol, a GPU (``device="auto"`` picks CUDA). ``--set fake_data=true`` (the quick
preset) runs the same code on random CIFAR-shaped data with a narrow network: a smoke
test of the pipeline, not of the paper's claim.

Run: ``ghoststep run resnet --data-dir ~/data/cifar10`` (40 runs of 3900 steps: about 1.8 h
on one H100 -- 16 ms per fixed-LR step, 67 ms per set-controller step) or
``--preset quick`` (fake data, about 1 s).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ghoststep.controller import RadiusController, Recording, Sampling
from ghoststep.monitor import StepStats
from ghoststep_lab.common.data import fake_cifar10, load_cifar10
from ghoststep_lab.common.figures import new_figure, save_figure
from ghoststep_lab.common.models import build_model
from ghoststep_lab.common.results import Claim, ClaimRule, Results, Table, evaluate_claims
from ghoststep_lab.common.runner import parallel_map, progress_bar
from ghoststep_lab.common.training import loop, median_iqr, set_seed

# Paper Table 3: max r, logged steps with r > 1, median final accuracy, IQR.
PAPER_TABLE3 = {
    "lr=0.005": (1.11, 1, 0.804, "80.0-81.9%"),
    "lr=0.01": (1.23, 13, 0.826, "82.6-83.4%"),
    "lr=0.1": (5.87, 58, 0.785, "78.1-81.7%"),
    "lr=0.5": (29.34, 70, 0.575, "48.1-64.8%"),
    "set r*=0.5": (0.50, 0, 0.804, "80.2-80.5%"),
    "set r*=1": (1.00, 0, 0.853, "85.1-85.4%"),
    "set r*=2": (2.00, 80, 0.844, "84.3-84.5%"),
    "set r*=4": (4.00, 80, 0.721, "38.9-74.2%"),
}


@dataclass
class Config:
    """Defaults are the paper's protocol (Fig. 12 / Table 3)."""

    data_dir: str = ""  # folder with CIFAR-10's python batches (--data-dir)
    fake_data: bool = False  # random CIFAR-shaped data instead (smoke test)
    fake_train: int = 1024
    fake_test: int = 256
    epochs: int = 10
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0  # not stated in the paper
    augment: bool = True  # random crop (pad 4) + horizontal flip; not stated in the paper
    lrs: tuple[float, ...] = (0.005, 0.01, 0.1, 0.5)
    targets: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # set-controller r*
    set_base_lr: float = 0.1  # nominal LR of the set-controller's inner SGD (no effect on tau)
    width: int = 64  # stem width of ResNet-18 (64 = the standard network)
    log_every: int = 50  # r logged every 50 steps of an epoch
    measure_rows: int = 256  # rows of the current batch the radius is measured on
    max_steps_per_epoch: int = 0  # 0: full epochs
    device: str = "auto"  # "auto": CUDA when available
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    # claim thresholds (stated before running)
    r4_drop: float = 0.05  # r* = 4 degrades: >= 5 points below r* = 1
    r2_keep: float = 0.03  # r* = 2 retains: within 3 points of r* = 1


PRESETS = {
    "quick": {
        "fake_data": True,
        "fake_train": 64,
        "fake_test": 32,
        "width": 4,
        "epochs": 2,
        "batch_size": 16,
        "max_steps_per_epoch": 2,
        "lrs": (0.01, 0.5),
        "targets": (1.0,),
        "seeds": [0],
        "log_every": 1,
        "threads": 1,
    },
    "paper": {},
}


def _load(config: Config):
    if config.fake_data:
        return (fake_cifar10(config.fake_train, seed=0), fake_cifar10(config.fake_test, seed=1))
    if not config.data_dir:
        raise FileNotFoundError(
            "the resnet experiment needs CIFAR-10 on disk: pass --data-dir DIR (the folder "
            "holding data_batch_1..5 and test_batch, or its parent), or run the smoke test "
            "with --preset quick / --set fake_data=true"
        )
    return load_cifar10(config.data_dir, train=True), load_cifar10(config.data_dir, train=False)


def run(config: Config, out_dir: Path, progress: bool) -> Results:
    train_data, test_data = _load(config)
    device = pick_device(config.device)
    common = dict(
        train_data=train_data,
        test_data=test_data,
        epochs=config.epochs,
        batch_size=config.batch_size,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        augment=config.augment,
        width=config.width,
        log_every=config.log_every,
        measure_rows=config.measure_rows,
        max_steps_per_epoch=config.max_steps_per_epoch or None,
        set_base_lr=config.set_base_lr,
        device=device,
        progress=progress,
    )
    jobs = [dict(common, seed=s, lr=float(lr)) for lr in config.lrs for s in config.seeds] + [
        dict(common, seed=s, target_r=float(t)) for t in config.targets for s in config.seeds
    ]
    records = parallel_map(
        resnet_run, jobs, workers=1, threads=config.threads, progress=progress, desc="resnet runs"
    )
    groups: dict[str, list] = {}
    for rec in records:
        groups.setdefault(rec.label, []).append(rec)

    summary = {}
    for label, recs in groups.items():
        med, q25, q75 = median_iqr([r.final_acc for r in recs])
        summary[label] = {
            "median": med,
            "q25": q25,
            "q75": q75,
            "max_r": float(np.nanmax([r.max_r for r in recs])),
            "median_max_r": median_iqr([r.max_r for r in recs])[0],
            "r_gt_1": int(np.median([sum(v > 1.0 + 1e-9 for v in r.r_after) for r in recs])),
            "n_logged": len(recs[0].r_after),
            "per_seed": [r.final_acc for r in recs],
            "step_ms": 1000 * float(np.median([r.step_seconds for r in recs])),
        }
    claims = _claims(config, summary)
    fixed = [
        f"{lab} {s['median']:.1%} (max r {s['max_r']:.3g})"
        for lab, s in summary.items()
        if lab.startswith("lr=")
    ]
    ctrl = [f"{lab} {s['median']:.1%}" for lab, s in summary.items() if lab.startswith("set")]
    data_txt = (
        "random fake data (smoke test; accuracies are chance)" if config.fake_data else "CIFAR-10"
    )
    text = (
        f"ResNet-18 (width {config.width}) on {data_txt}, SGD momentum {config.momentum:g}, "
        f"batch {config.batch_size}, {config.epochs} epoch(s), on {device.type}. "
        "Median final test accuracy: fixed LRs "
        + ", ".join(fixed)
        + "; set-controllers "
        + ", ".join(ctrl)
        + "."
    )
    notes = [
        "r is logged at steps 0, 50, 100, ... of each epoch from the current batch (at most "
        f"{config.measure_rows} rows, JVP), with tau the norm of the actual SGD update "
        "(momentum and weight decay included). Set-controllers measure rho_a every step "
        "(they need it to choose the step); their logged r is the applied one.",
        f"Not stated in the paper, our choices: augmentation {config.augment} (random crop "
        f"+ flip), weight decay {config.weight_decay:g}, no LR schedule, BatchNorm in train "
        "mode when measuring (the training function).",
        f"Median time per training step on {device.type}: "
        + ", ".join(f"{lab} {s['step_ms']:.1f} ms" for lab, s in summary.items())
        + ".",
    ]
    if config.fake_data:
        notes.insert(
            0,
            "FAKE DATA: random images with random labels and a narrow network; "
            "this run checks the pipeline only, no claim can be reproduced.",
        )
    return Results(
        title="ResNet-18 / CIFAR-10: r at fixed learning rates vs the set-controller",
        summary=text,
        claims=claims,
        tables=[_table3(summary)],
        figures=[_plot(config, groups, out_dir)],
        metrics={
            "summary": summary,
            "runs": {lab: list(recs) for lab, recs in groups.items()},
            "device": device.type,
        },
        notes=notes,
    )


def _best(x) -> str | None:
    """The config with the highest median accuracy, when r* = 1 ran beside others."""
    if "set r*=1" in x.summary and len(x.summary) > 1:
        return max(x.summary, key=lambda lab: x.summary[lab]["median"])
    return None


def _fixed_column(key: str):
    """``key`` of every fixed-LR config, in increasing LR (None: no fixed LR ran)."""
    return lambda x: [x.fixed[lab][key] for lab in x.labels] or None


def _set_pair(other: str):
    """(median at r* = 1, median at r* = ``other``) when both ran."""
    keys = ("set r*=1", f"set r*={other}")

    def pair(x) -> tuple[float, float] | None:
        if all(k in x.sets for k in keys):
            return x.sets[keys[0]]["median"], x.sets[keys[1]]["median"]
        return None

    return pair


def _set_error(x) -> float | None:
    """Largest relative gap between max r and r* over the set-controller runs."""
    r_star = {lab: float(lab.split("=")[1]) for lab in x.sets}
    errors = [abs(s["max_r"] - r_star[lab]) / r_star[lab] for lab, s in x.sets.items()]
    return max(errors) if errors else None


# The paper's claims (Fig. 12, Table 3), in report order.
CLAIMS = (
    ClaimRule(
        "The set-controller at r* = 1 reaches the highest median accuracy of all configs",
        "r* = 1: 85.3% (best)",
        _best,
        holds=lambda best, x: best == "set r*=1",
        ours=lambda best, x: (
            f"r* = 1: {x.summary['set r*=1']['median']:.1%}; best: {best} "
            f"{x.summary[best]['median']:.1%}"
        ),
    ),
    ClaimRule(
        "No fixed LR keeps r below 1 throughout (max logged r > 1 for every fixed LR, "
        "even 0.005, via momentum)",
        "1.11 / 1.23 / 5.87 / 29.3",
        lambda x: [s["max_r"] for s in x.fixed.values()] or None,
        holds=lambda maxr, x: all(r > 1.0 for r in maxr),
        ours=lambda maxr, x: " / ".join(f"{r:.3g}" for r in maxr),
    ),
    ClaimRule(
        "Max r grows with the fixed learning rate",
        "increasing",
        _fixed_column("max_r"),
        holds=lambda maxr, x: all(a < b for a, b in zip(maxr, maxr[1:])),
        ours=lambda maxr, x: " < ".join(f"{v:.3g}" for v in maxr),
    ),
    ClaimRule(
        "The most aggressive fixed LR (deepest in r > 1) degrades most",
        "0.5: 57.5% (lowest fixed)",
        _fixed_column("median"),
        holds=lambda accs, x: x.labels[accs.index(min(accs))] == x.labels[-1],  # first lowest
        ours=lambda accs, x: ", ".join(f"{lab[3:]}: {a:.1%}" for lab, a in zip(x.labels, accs)),
    ),
    ClaimRule(
        "The set-controller holds r at r* exactly (max r = r*)",
        "0.50 / 1.00 / 2.00 / 4.00",
        _set_error,
        holds=lambda err, x: err < 1e-6,
        ours=lambda err, x: " / ".join(f"{s['max_r']:.6g}" for s in x.sets.values()),
    ),
    ClaimRule(
        "r* = 4 degrades (>= {c.r4_drop:.0%} points below r* = 1)",
        "72.1% vs 85.3%",
        _set_pair("4"),
        holds=lambda a, x: a[1] <= a[0] - x.c.r4_drop,
        ours=lambda a, x: f"{a[1]:.1%} vs {a[0]:.1%}",
    ),
    ClaimRule(
        "r* = 2 retains accuracy (within {c.r2_keep:.0%} points of r* = 1: "
        "confidence-margin slack)",
        "84.4% vs 85.3%",
        _set_pair("2"),
        holds=lambda a, x: a[1] >= a[0] - x.c.r2_keep,
        ours=lambda a, x: f"{a[1]:.1%} vs {a[0]:.1%}",
    ),
)


FAKE_NOTE = "fake data: pipeline smoke test, the claim is not tested"


def _claims(config: Config, summary: dict) -> list[Claim]:
    fixed = {lab: s for lab, s in summary.items() if lab.startswith("lr=")}
    return evaluate_claims(
        CLAIMS,
        untested=FAKE_NOTE if config.fake_data else None,
        c=config,
        summary=summary,
        sets={lab: s for lab, s in summary.items() if lab.startswith("set")},
        fixed=fixed,
        labels=sorted(fixed, key=lambda lab: float(lab[3:])),
    )


def _table3(summary: dict) -> Table:
    rows = []
    for lab, s in summary.items():
        p = PAPER_TABLE3.get(lab)
        rows.append(
            [
                lab,
                f"{s['max_r']:.3g}" + (f" ({p[0]:g})" if p else ""),
                f"{s['r_gt_1']}/{s['n_logged']}" + (f" ({p[1]})" if p else ""),
                f"{s['median']:.1%}" + (f" ({p[2]:.1%})" if p else ""),
                f"{s['q25']:.1%}-{s['q75']:.1%}" + (f" ({p[3]})" if p else ""),
            ]
        )
    return Table(
        title="Table 3: ours (paper) -- max r, logged steps with r > 1 (median seed), "
        "median final accuracy, IQR",
        columns=["config", "max r", "r > 1", "acc (median)", "IQR"],
        rows=rows,
    )


def _plot(config: Config, groups: dict, out_dir: Path) -> dict:
    fig, (ax_loss, ax_acc, ax_r) = new_figure(1, 3, figsize=(13, 3.6))
    cmap_fixed = ["#9ecae1", "#4292c6", "#08519c", "#08306b"]
    cmap_set = ["#fdd49e", "#fc8d59", "#d7301f", "#7f0000"]
    fixed = [lab for lab in groups if lab.startswith("lr=")]
    sets = [lab for lab in groups if lab.startswith("set")]
    for labels, cmap, style in ((fixed, cmap_fixed, "-"), (sets, cmap_set, "--")):
        for i, lab in enumerate(labels):
            recs = groups[lab]
            color = cmap[i % len(cmap)]
            epochs = np.arange(1, len(recs[0].test_acc) + 1)
            for ax, key in ((ax_loss, "test_loss"), (ax_acc, "test_acc")):
                arr = np.array([getattr(r, key) for r in recs], dtype=float)
                med, q25, q75 = median_iqr(arr, axis=0)
                ax.plot(epochs, med, style, color=color, label=lab)
                ax.fill_between(epochs, q25, q75, color=color, alpha=0.15, linewidth=0)
            maxr = np.array([r.max_r_per_epoch(len(epochs)) for r in recs], dtype=float)
            with np.errstate(all="ignore"):
                ax_r.plot(
                    epochs, np.nanmedian(maxr, axis=0), style, marker="o", color=color, label=lab
                )
    ax_loss.set_title("test loss")
    ax_acc.set_title("test accuracy")
    ax_r.set_title("max r per epoch (r = 1 dashed)")
    ax_r.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax_r.set_yscale("log")
    for ax in (ax_loss, ax_acc, ax_r):
        ax.set_xlabel("epoch")
    ax_acc.legend(fontsize=7)
    return save_figure(
        fig,
        out_dir,
        "fig12_resnet.png",
        "Fig. 12: ResNet-18 on CIFAR-10, fixed LRs (solid) vs set-controllers "
        "(dashed); median and IQR over seeds"
        + (" -- FAKE DATA smoke test" if config.fake_data else ""),
    )


# ----------------------------------------------------------------------------- ResNet / CIFAR


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def augment_cifar(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, per image.

    ``generator`` lives on the CPU (the draws are moved to ``x``'s device) so the
    augmentation stream is the same on every device.
    """
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass
class ResNetRecord:
    """One ResNet-18 run: per-epoch test metrics, the radius columns at the logged steps."""

    label: str
    seed: int
    lr: float | None
    target_r: float | None
    epochs_done: int = 0
    steps: int = 0
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # mean minibatch loss per epoch
    log_steps: list[int] = field(default_factory=list)
    log_epoch: list[int] = field(default_factory=list)
    # StepStats columns at the logged steps (``tau_applied = scale * tau``, the length
    # of the update actually applied; ``lr_applied`` = group lr times scale)
    r_after: list[float] = field(default_factory=list)
    r_before: list[float] = field(default_factory=list)
    tau_applied: list[float] = field(default_factory=list)
    rho_a: list[float] = field(default_factory=list)
    lr_applied: list[float] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: float = 0.0

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else math.nan

    @property
    def max_r(self) -> float:
        finite = [v for v in self.r_after if math.isfinite(v)]
        return max(finite) if finite else math.nan

    def log(self, stats: StepStats, step: int, epoch: int) -> None:
        """Record the controller's ``stats`` of (0-based) ``step`` in ``epoch``."""
        self.log_steps.append(step)
        self.log_epoch.append(epoch)
        self.r_after.append(stats.r_after)
        self.r_before.append(stats.r_before)
        self.tau_applied.append(stats.tau * stats.scale)
        self.rho_a.append(stats.rho_a)
        self.lr_applied.append(stats.lr * stats.scale)

    def max_r_per_epoch(self, epochs: int) -> list[float]:
        out = []
        for e in range(epochs):
            logged = zip(self.r_after, self.log_epoch)
            vals = [v for v, ep in logged if ep == e and math.isfinite(v)]
            out.append(max(vals) if vals else math.nan)
        return out


@torch.no_grad()
def _evaluate_batched(model, X, y, batch_size: int = 1000):
    was = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, X.shape[0], batch_size):
        logits = model(X[i : i + batch_size])
        total_loss += float(F.cross_entropy(logits, y[i : i + batch_size], reduction="sum"))
        correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
    model.train(was)
    n = X.shape[0]
    return total_loss / n, correct / n


def _epoch_batches(X, y, batches, aug_gen):
    """The minibatches of one epoch (``batches``: index tensors), augmented with
    ``aug_gen`` (None: not augmented), drawn lazily in step order."""
    for idx in batches:
        xb, yb = X[idx], y[idx]
        yield (xb if aug_gen is None else augment_cifar(xb, aug_gen)), yb


def _train_epoch(
    model, opt, inner, X, y, batches, aug_gen, log_every, rec, epoch, step, bar
) -> list[torch.Tensor]:
    """One epoch of :func:`~ghoststep_lab.common.training.loop` over ``batches``
    (index tensors); returns the minibatch losses (0-d, on the device). In set mode
    (``rec.target_r``) every step goes through the controller ``opt``; otherwise only
    the logged steps (every ``log_every``-th of the epoch) do, and the others call the
    shared ``inner`` optimizer (the same update, no radius cost). ``aug_gen`` None: no
    augmentation."""
    losses = []

    def logged(info) -> bool:
        return (info.step - step) % log_every == 0

    def optimizer_step(info) -> None:
        if rec.target_r is not None or logged(info):
            opt.step()
        else:
            inner.step()

    def on_step(info) -> None:
        if logged(info):
            rec.log(opt.last, info.step, epoch)
        losses.append(info.loss_tensor)
        bar.update(1)

    loop(
        model, opt, _epoch_batches(X, y, batches, aug_gen), len(batches),
        optimizer_step=optimizer_step, on_step=on_step, start_step=step,
    )  # fmt: skip
    return losses


def resnet_run(
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    *,
    seed: int,
    lr: float | None = None,
    target_r: float | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    augment: bool = True,
    width: int = 64,
    log_every: int = 50,
    measure_rows: int = 256,
    max_steps_per_epoch: int | None = None,
    set_base_lr: float = 0.1,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> ResNetRecord:
    """ResNet-18 on CIFAR-10 with SGD + momentum: a fixed ``lr`` or a set-controller.

    Exactly one of ``lr`` (fixed learning rate, r monitored every ``log_every`` steps of
    an epoch) and ``target_r`` (``RadiusController(mode="set", target_r=...)`` every
    step: ``tau = r* rho_a`` along the momentum update; ``set_base_lr`` only sets the
    inner optimizer's nominal rate) must be given. The radius is measured on (at most
    ``measure_rows`` rows of) the current training batch, along the actual update
    ``p`` (momentum and weight decay included). The monitor shares the inner
    optimizer: on logged steps ``monitor.step()`` (s = 1, bitwise the plain step), on
    the others ``inner.step()``.

    Returns:
        A :class:`ResNetRecord` (test loss / accuracy after each epoch, r at logged steps).
    """
    if (lr is None) == (target_r is None):
        raise ValueError("give exactly one of lr (fixed) and target_r (set-controller)")
    device = torch.device(device)
    generator = set_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 10_000)
    model = build_model("resnet18", width=width).to(device)
    inner = torch.optim.SGD(
        model.parameters(),
        lr=set_base_lr if lr is None else lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    subset = measure_rows if measure_rows < batch_size else None
    if target_r is not None:
        opt = RadiusController(
            inner,
            model,
            mode="set",
            target_r=target_r,
            sampling=Sampling(subset=subset, seed=seed),
            recording=Recording(history_size=0),
            method="jvp",
        )
        label = f"set r*={target_r:g}"
    else:
        opt = RadiusController(
            inner,
            model,
            mode="monitor",
            sampling=Sampling(subset=subset, seed=seed),
            recording=Recording(history_size=0),
            method="jvp",
        )
        label = f"lr={lr:g}"
    rec = ResNetRecord(label=label, seed=seed, lr=lr, target_r=target_r)
    X, y = train_data
    X, y = X.to(device), y.to(device)
    Xt, yt = test_data[0].to(device), test_data[1].to(device)
    n = X.shape[0]
    per_epoch = n // batch_size
    if max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, max_steps_per_epoch)
    if per_epoch < 1:
        raise ValueError(f"{n} training images are fewer than one batch of {batch_size}")
    t0 = time.perf_counter()
    step = 0
    bar = progress_bar(
        total=epochs * per_epoch, desc=f"resnet {label} seed {seed}", enabled=progress
    )
    model.train()
    train_seconds = 0.0
    for epoch in range(epochs):
        te = time.perf_counter()
        order = torch.randperm(n, generator=generator).to(device)
        batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)]
        losses = _train_epoch(
            model, opt, inner, X, y, batches, aug_gen if augment else None, log_every,
            rec, epoch, step, bar,
        )  # fmt: skip
        step += per_epoch
        rec.train_loss.append(float(torch.stack(losses).mean()))  # syncs the device
        train_seconds += time.perf_counter() - te
        test_loss, test_acc = _evaluate_batched(model, Xt, yt)
        rec.test_loss.append(test_loss)
        rec.test_acc.append(test_acc)
        rec.epochs_done = epoch + 1
    bar.close()
    opt.close()
    rec.steps = step
    rec.seconds = time.perf_counter() - t0
    rec.step_seconds = train_seconds / max(step, 1)
    return rec
