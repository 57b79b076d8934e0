"""Language models on real text: the radius at vocabularies of 256 to 50257 tokens.

Open question: with tens of thousands of classes per token and the max
over B*T positions, is rho_a = pi / max spread so small that a radius controller
stalls a language model (r >> 1 at every update at a standard learning rate)? How
does r scale with the vocabulary size V?

Data: the Python standard library's own source (:mod:`ghoststep_lab.common.text`),
split by file, byte-level BPE tokenizers trained on the training split at each V.
Model: :class:`~ghoststep_lab.common.models.TinyLM` (GPT-style decoder: pre-LN,
learned positions, weight-tied output, ReLU FFN so the FFN kink radius is defined),
AdamW (betas 0.9 / 0.95) with linear warmup and cosine decay.

Two parts:

* **measure** (one run per V, standard LR): the controller in monitor mode records,
  every step, r = ||p|| / rho_a of the actual AdamW update p, rho_a, the bottleneck
  position (its token, frequency rank, position in the window), the q-quantile
  radius next to the max one, and the attention / FFN radii of
  :func:`~ghoststep.controller.internal_radii` (which one binds). At a
  few checkpoints the certified exact radius rho* (:func:`ghoststep.exact_radius`) of
  a few positions (the bottleneck and random ones) along p gives rho*/rho_a.
* **stability** (one V, LR x ``lr_factors``): plain AdamW, the controller (clip,
  r* = 1; and with ``quantile``), z-loss (PaLM: ``zloss * logsumexp(z)^2``) and logit
  soft-capping (Gemma 2: ``cap * tanh(z / cap)``): final validation loss, loss spikes,
  tokens per second.

Run: ``ghoststep run lm`` (paper preset) or ``ghoststep run lm --preset quick``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ghoststep.controller import AllRadiiController, RadiusController, Recording, Sampling
from ghoststep.evaluation import LogitsReader
from ghoststep.measurement import flatten_samples, logit_slopes
from ghoststep.radius import aggregate, exact_radius, logit_spread, rho_bound
from ghoststep_lab.common.figures import new_figure, save_figure
from ghoststep_lab.common.models import TinyLM
from ghoststep_lab.common.results import Claim, ClaimRule, Results, Table, evaluate_claims
from ghoststep_lab.common.runner import parallel_map
from ghoststep_lab.common.text import (
    build_corpus,
    encode_split,
    token_frequency_rank,
    train_tokenizer,
)
from ghoststep_lab.common.training import finite_median, loop, set_seed

METHODS = ("adamw", "controller", "controller_q", "zloss", "softcap")
METHOD_LABELS = {
    "monitor": "AdamW (monitored)",
    "adamw": "plain AdamW",
    "controller": "controller (clip, r* = 1)",
    "controller_q": "controller (clip, r* = 1, quantile)",
    "zloss": "AdamW + z-loss",
    "softcap": "AdamW + logit soft-cap",
}


@dataclass
class Config:
    """Paper preset: sized to finish in about 40 minutes with 2 workers on 2 CPU cores."""

    vocab_sizes: tuple[int, ...] = (256, 8192, 32768, 50257)
    cache_dir: str | None = None  # corpus + tokenizers (None: ~/.cache/ghoststep/lm)
    max_files: int = 0  # standard-library files read, in sorted order (0: all)
    val_fraction: float = 0.1  # share of files (by path hash) in the validation split
    tokenizer_chars: int = 0  # training characters the BPE trainer sees (0: all)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 300
    warmup: int = 30
    base_lr: float = 1e-3  # the "standard" peak LR (x1)
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1  # cosine decays to this share of the peak
    lr_factors: tuple[float, ...] = (1.0, 10.0, 30.0)
    methods: tuple[str, ...] = METHODS
    stability_vocab: int = 8192
    quantile: float = 0.999
    ffn_quantile: float = 0.01
    zloss: float = 1e-4
    softcap: float = 30.0
    exact_checkpoints: int = 3  # steps (spread evenly) with certified exact radii
    exact_positions: int = 6  # positions per checkpoint: the bottleneck + random ones
    val_windows: int = 64
    eval_every: int = 50
    spike_window: int = 20
    spike_ratio: float = 1.25
    seed: int = 0
    workers: int = 2
    threads: int = 1


PRESETS = {
    "quick": {
        "vocab_sizes": (256, 300),
        "stability_vocab": 300,
        "max_files": 30,
        "val_fraction": 0.3,
        "tokenizer_chars": 200_000,
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
        "seq_len": 16,
        "batch_size": 4,
        "steps": 12,
        "warmup": 3,
        "lr_factors": (1.0, 30.0),
        "exact_checkpoints": 2,
        "exact_positions": 2,
        "val_windows": 8,
        "eval_every": 6,
        "spike_window": 4,
        "workers": 1,
    },
    "paper": {},
}


# ----------------------------------------------------------------------------- pieces


class SoftCapped(torch.nn.Module):
    """``cap * tanh(model(x) / cap)``: Gemma 2's logit soft-capping."""

    def __init__(self, model: torch.nn.Module, cap: float):
        super().__init__()
        if not cap > 0:
            raise ValueError(f"soft-cap must be positive, got {cap!r}")
        self.model, self.cap = model, float(cap)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(self.model(idx) / self.cap)


def lr_factor_at(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def count_spikes(losses, window: int, ratio: float) -> int:
    """Steps whose training loss exceeds ``ratio`` x the median of the ``window`` steps
    before it; a non-finite loss counts once (the run stops there)."""
    arr = np.asarray(losses, dtype=float)
    spikes = 0
    for t in range(window, arr.size):
        if not math.isfinite(arr[t]):
            return spikes + 1
        if arr[t] > ratio * np.median(arr[t - window : t]):
            spikes += 1
    return spikes


def _windows(ids: torch.Tensor, starts: torch.Tensor, length: int):
    """Inputs (N, length) and next-token targets (N, length) at ``starts``."""
    idx = starts[:, None] + torch.arange(length + 1)[None, :]
    chunk = ids[idx]
    return chunk[:, :-1], chunk[:, 1:]


def validation_loss(net, val_ids: torch.Tensor, c: Config) -> float:
    """Mean next-token cross-entropy over ``val_windows`` evenly spaced windows."""
    starts = torch.linspace(0, val_ids.numel() - c.seq_len - 2, c.val_windows).long()
    x, y = _windows(val_ids, starts, c.seq_len)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), c.batch_size):
            logits = net(x[i : i + c.batch_size])
            total += float(F.cross_entropy(logits.flatten(0, 1), y[i : i + c.batch_size].flatten(),
                                           reduction="sum"))  # fmt: skip
    return total / y.numel()


def _optimizer(method: str, model: torch.nn.Module, c: Config, lr: float):
    inner = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                              weight_decay=c.weight_decay)  # fmt: skip
    # (B, T, V) logits, the loss's softmax over the vocabulary: the last dim
    if method == "monitor":
        return AllRadiiController(
            inner,
            model,
            mode="monitor",
            limit_by=("out",),
            report=("attn", "ffn"),
            method="jvp",
            ffn_quantile=c.ffn_quantile,
            recording=Recording(keep_samples=True),
            logits_fn=LogitsReader(None, class_dim=-1),
        )
    if method in ("controller", "controller_q"):
        q = c.quantile if method == "controller_q" else None
        return RadiusController(
            inner,
            model,
            mode="clip",
            target_r=1.0,
            sampling=Sampling(quantile=q),
            method="jvp",
            logits_fn=LogitsReader(None, class_dim=-1),
        )
    return inner


# ----------------------------------------------------------------------------- measurements


def exact_sample(model, x, old: dict, new: dict, positions: int, gen) -> dict:
    """rho_a and certified rho* (NaN where not certified) along p = new - old, at the
    old parameters, for the bottleneck position and ``positions - 1`` random ones.

    Radii are in units of the step (t = 1 is the full update), so r = 1 / rho_a.
    """
    params = dict(model.named_parameters())
    direction = {n: new[n] - old[n] for n in params}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(old[n])
        z, a = logit_slopes(model, (x,), direction)
        for n, p in params.items():
            p.copy_(new[n])
    z, a = flatten_samples(z, a)  # (B*T, V)
    bottleneck = int(logit_spread(a).argmax())
    others = torch.randperm(z.shape[0], generator=gen)
    pick = [bottleneck] + [int(i) for i in others if int(i) != bottleneck][: positions - 1]
    zz, aa = z[pick].double(), a[pick].double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # uncertified -> NaN, counted below
        rho_star = exact_radius(zz, aa)
    rho_a = rho_bound(aa)
    return {"positions": pick, "rho_a": rho_a.tolist(), "rho_star": rho_star.tolist(),
            "ratio": (rho_star / rho_a).tolist()}  # fmt: skip


def quantile_over_min(rho_samples: torch.Tensor | None, q: float) -> float:
    """``rho_q / rho_a``: the radius of the q-quantile spread (the convention of
    ``ghoststep.radius.aggregate`` and the controller's ``quantile=q``) over the min
    radius; NaN without per-sample radii or with a NaN among them."""
    if rho_samples is None or bool(torch.isnan(rho_samples).any()):
        return math.nan
    rho = rho_samples.double()
    return float(aggregate(rho, ("quantile", q)) / aggregate(rho, "min"))


def _monitor_row(opt, x, y, ranks: np.ndarray, q: float) -> dict:
    """What the monitor-mode controller saw at this step, with the bottleneck's tokens."""
    st = opt.last
    b, t = divmod(max(st.bottleneck, 0), x.shape[1])
    radii = st.radii or {}
    return {
        "r": st.r_before, "rho_a": st.rho_a, "tau": st.tau,
        "q_over_max": quantile_over_min(st.rho_samples, q),  # rho_q / rho_a
        "radii": {k_: float(v) for k_, v in radii.items()}, "binding": st.binding,
        "token": int(x[b, t]), "target": int(y[b, t]), "position": int(t),
        "rank": int(ranks[int(x[b, t])]), "target_rank": int(ranks[int(y[b, t])]),
    }  # fmt: skip


# ----------------------------------------------------------------------------- one run


def _loss(net, x, y, method: str, c: Config):
    """(objective, cross-entropy) of one batch; z-loss adds ``zloss * mean(lse^2)``."""
    logits = net(x).flatten(0, 1)
    ce = F.cross_entropy(logits, y.flatten())
    if method == "zloss":
        return ce + c.zloss * torch.logsumexp(logits, -1).pow(2).mean(), ce
    return ce, ce


def lm_run(method: str, vocab_size: int, lr_factor: float, config: dict, train_ids, val_ids,
           ranks) -> dict:  # fmt: skip
    """One training run (see the module docstring); ``config`` is ``asdict(Config)``."""
    c = Config(**config)
    gen = set_seed(c.seed)
    model = TinyLM(vocab_size=vocab_size, d_model=c.d_model, n_layers=c.n_layers,
                   n_heads=c.n_heads, max_len=c.seq_len, activation="relu")  # fmt: skip
    with torch.no_grad():  # GPT-2's embedding init (TinyLM's default N(0, 1) is far too big)
        model.tok_emb.weight.normal_(0.0, 0.02)
        model.pos_emb.weight.normal_(0.0, 0.02)
    net = SoftCapped(model, c.softcap) if method == "softcap" else model
    peak = c.base_lr * lr_factor
    opt = _optimizer(method, model, c, peak)
    # copies: joblib hands large arrays to workers as read-only memmaps
    train_ids, val_ids = torch.from_numpy(np.array(train_ids)), torch.from_numpy(np.array(val_ids))
    checkpoints = set(np.linspace(0, c.steps - 1, c.exact_checkpoints).round().astype(int).tolist())
    rec = {"method": method, "vocab_size": vocab_size, "lr_factor": lr_factor, "losses": [],
           "monitor": [], "exact": [], "eval_steps": [], "val_loss": [], "seconds": 0.0,
           "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    high = train_ids.numel() - c.seq_len - 1
    peak_factor = functools.partial(lr_factor_at, steps=c.steps, warmup=c.warmup,
                                    min_ratio=c.min_lr_ratio)  # fmt: skip
    batches = (_windows(train_ids, torch.randint(0, high, (c.batch_size,), generator=gen),
                        c.seq_len) for _ in range(c.steps))  # fmt: skip
    old: dict = {}

    def after_loss(info) -> str | None:
        rec["losses"].append(info.loss)
        return None if math.isfinite(float(info.objective)) else "stop"  # diverged

    def before_step(info) -> None:
        if method == "monitor" and info.step in checkpoints:
            old.update({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_step(info) -> None:
        rec["seconds"] += info.seconds
        if method == "monitor":
            rec["monitor"].append(_monitor_row(opt, info.inputs, info.targets, ranks, c.quantile))
        if method == "monitor" and info.step in checkpoints:
            new = {n: p.detach().clone() for n, p in model.named_parameters()}
            sample = exact_sample(model, info.inputs, old, new, c.exact_positions, gen)
            rec["exact"].append({"step": info.step, **sample})
        if info.step % c.eval_every == 0 or info.step == c.steps - 1:
            rec["eval_steps"].append(info.step)
            rec["val_loss"].append(validation_loss(net, val_ids, c))

    # the remaining steps of a diverged run are missing
    loop(net, opt, batches, c.steps, lr_schedule=peak_factor,
         forward=lambda x, y: _loss(net, x, y, method, c), after_loss=after_loss,
         before_step=before_step, on_step=on_step)  # fmt: skip
    rec["tokens_per_s"] = len(rec["losses"]) * c.batch_size * c.seq_len / max(rec["seconds"], 1e-9)
    rec["final_val"] = rec["val_loss"][-1] if len(rec["losses"]) == c.steps else math.nan
    rec["spikes"] = count_spikes(rec["losses"], c.spike_window, c.spike_ratio)
    return rec


# ----------------------------------------------------------------------------- the experiment


def prepare_data(c: Config) -> dict[int, dict]:
    """Per vocabulary size: train / val ids, frequency ranks, the trained vocabulary."""
    corpus = build_corpus(c.cache_dir, max_files=c.max_files, val_fraction=c.val_fraction)
    out = {}
    for v in sorted(set(c.vocab_sizes) | {c.stability_vocab}):
        tok = train_tokenizer(corpus, v, max_chars=c.tokenizer_chars)
        train_ids = encode_split(corpus, tok, "train")
        out[v] = {"train": train_ids, "val": encode_split(corpus, tok, "val"),
                  "ranks": token_frequency_rank(train_ids, v),
                  "trained_vocab": tok.get_vocab_size()}  # fmt: skip
    out["files"] = {k: len(v) for k, v in corpus.files.items()}
    return out


def _jobs(c: Config, data: dict) -> list[dict]:
    cfg = dataclasses.asdict(c)

    def job(method, v, factor):
        d = data[v]
        return dict(method=method, vocab_size=v, lr_factor=factor, config=cfg,
                    train_ids=d["train"], val_ids=d["val"], ranks=d["ranks"])  # fmt: skip

    measure = [job("monitor", v, 1.0) for v in sorted(c.vocab_sizes, reverse=True)]
    return measure + [job(m, c.stability_vocab, f) for f in c.lr_factors for m in c.methods]


def summarize_vocab(rec: dict, ranks: np.ndarray, train_ids: np.ndarray) -> dict:
    """Per-V statistics of a monitor run (medians over steps; certified samples only)."""
    rows = rec["monitor"]
    r = np.array([m["r"] for m in rows])
    ratios = [x for e in rec["exact"] for x in e["ratio"]]
    certified = [x for x in ratios if math.isfinite(x)]
    binding = [m["binding"] for m in rows]
    sample = train_ids[:: max(1, train_ids.size // 200_000)]
    return {
        "r_median": finite_median(r), "r_min": float(np.nanmin(r)), "r_max": float(np.nanmax(r)),
        "share_r_gt_1": float(np.mean(r > 1)), "share_r_gt_10": float(np.mean(r > 10)),
        "rho_a_median": finite_median(m["rho_a"] for m in rows),
        "tau_median": finite_median(m["tau"] for m in rows),
        "q_over_max_median": finite_median(m["q_over_max"] for m in rows),
        "exact_ratio_median": finite_median(certified), "exact_ratio_min":
            float(min(certified)) if certified else math.nan,
        "exact_certified": len(certified), "exact_sampled": len(ratios),
        "binding": {k: binding.count(k) for k in ("out", "attn", "ffn")},
        "bottleneck_rank_median": finite_median(m["rank"] for m in rows),
        "bottleneck_target_rank_median": finite_median(m["target_rank"] for m in rows),
        "token_rank_median": float(np.median(ranks[sample])),
        "share_position_0": float(np.mean([m["position"] == 0 for m in rows])),
        "final_val": rec["final_val"], "tokens_per_s": rec["tokens_per_s"],
        "params": rec["params"],
    }  # fmt: skip


def log_slope(xs, ys) -> float:
    """Least-squares slope of log y against log x (NaN with fewer than 2 finite points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return math.nan
    return float(np.polyfit(*zip(*pts), 1)[0])


def run(config: Config, out_dir: Path, progress: bool) -> Results:
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    data = prepare_data(config)
    jobs = _jobs(config, data)
    records = parallel_map(lm_run, jobs, workers=config.workers, threads=config.threads,
                           progress=progress, desc="lm runs")  # fmt: skip
    measure = {rec["vocab_size"]: rec for rec in records if rec["method"] == "monitor"}
    per_v = {v: summarize_vocab(measure[v], data[v]["ranks"], data[v]["train"])
             for v in sorted(measure)}  # fmt: skip
    for v in per_v:
        per_v[v]["trained_vocab"] = data[v]["trained_vocab"]
    stab = {(rec["method"], rec["lr_factor"]): rec for rec in records if rec["method"] != "monitor"}
    slope = log_slope(list(per_v), [s["r_median"] for s in per_v.values()])
    claims = _claims(config, per_v, stab, slope)
    figures = [_plot_measure(config, measure, out_dir), _plot_stability(config, stab, out_dir)]
    v_max = max(per_v)
    summary = (
        f"TinyLM (d = {config.d_model}, {config.n_layers} layers, {config.seq_len} tokens, "
        f"batch {config.batch_size}, {config.steps} AdamW steps) on the Python standard "
        f"library ({data['files']['train']} training / {data['files']['val']} validation "
        f"files). At the standard LR {config.base_lr:g} the median r of the AdamW update "
        + ", ".join(f"is {s['r_median']:.3g} at V = {v}" for v, s in per_v.items())
        + f" (log-log slope of r vs V {slope:.3g}); at V = {v_max} a share "
        f"{per_v[v_max]['share_r_gt_1']:.2f} of the updates has r > 1."
    )
    return Results(
        title="Language models: the radius at vocabularies up to 50257 tokens",
        summary=summary, claims=claims, figures=figures,
        tables=[_vocab_table(per_v), _stability_table(config, stab)],
        metrics={"per_vocab": {str(v): s for v, s in per_v.items()}, "r_vs_V_slope": slope,
                 "runs": [{k: v for k, v in rec.items()} for rec in records],
                 "files": data["files"]},
        notes=_notes(config),
    )  # fmt: skip


def _notes(c: Config) -> list[str]:
    return [
        "r = ||p|| / rho_a of the AdamW update p actually applied (controller in monitor "
        "mode, radius over all B*T positions of the training batch, measured at the old "
        "parameters). rho_q: the radius of the q-quantile spread (q = "
        f"{c.quantile:g}); q_over_max = rho_q / rho_a.",
        "Exact radius at K up to 50257: the certified solver of ghoststep.radius seeds "
        "Newton's method from the Newton polygon of a reduced set of 384 classes (those "
        "leading c_k + b_k x on a grid of x, then the largest logits); Newton's iterations "
        "and the argument-principle certificate run on all K classes, so the radius is "
        "certified or NaN. NaN samples are left out of the medians and counted.",
        f"A loss spike: a step whose training loss exceeds {c.spike_ratio:g}x the median "
        f"of the {c.spike_window} steps before it (a non-finite loss counts once and ends "
        "the run). Tokens per second: training tokens / wall time of the training steps "
        "(forward, backward, optimizer, controller), evaluation excluded, "
        f"{c.threads} torch thread(s) per run, {c.workers} runs in parallel.",
        "Bottleneck rank: frequency rank (0 = most frequent) in the training split of the "
        "input token at the position with the largest spread; compared with the median "
        "rank of a training token.",
        "Attention radius: masked (causal) keys are left out of the spread; FFN radius: "
        f"the {c.ffn_quantile:g}-quantile of |h| / |h_dot| (ReLU kinks, a proxy).",
    ]


def _top(key: str):
    """``key`` of the largest vocabulary's summary."""
    return lambda x: x.top[key]


def _pair(lr: str):
    """(plain AdamW, controller) records at the smallest (``"lo"``) or largest LR."""

    def measure(x):
        plain, ctrl = (
            x.stab.get(("adamw", getattr(x, lr))),
            x.stab.get(("controller", getattr(x, lr))),
        )
        return (plain, ctrl) if plain and ctrl else None

    return measure


# The hypotheses, stated with their thresholds before the paper run.
CLAIMS = (
    ClaimRule(
        "No stall at V = {v_max}: the median r of AdamW updates at the standard LR is below 10",
        "< 10",
        _top("r_median"),
        holds=lambda r, x: r < 10,
        ours=lambda r, x: f"{r:.3g}",
    ),
    ClaimRule(
        "r grows slower than sqrt(V): log-log slope of median r vs V below 0.5",
        "< 0.5",
        lambda x: x.slope,
        holds=lambda slope, x: slope < 0.5,
        ours=lambda slope, x: f"{slope:.3g}",
    ),
    ClaimRule(
        "rho_a is a lower bound: rho*/rho_a >= 1 at every certified sample",
        ">= 1",
        lambda x: list(x.per_v.values()),
        holds=lambda vs, x: all(
            s["exact_ratio_min"] >= 1 - 1e-6 for s in vs if s["exact_certified"]
        ),
        ours=lambda vs, x: f"min {min(s['exact_ratio_min'] for s in vs):.4g}",
    ),
    ClaimRule(
        "The exact radius certifies at >= 80% of the sampled positions at every V",
        ">= 80%",
        lambda x: x.per_v,
        holds=lambda per_v, x: all(
            s["exact_certified"] >= 0.8 * s["exact_sampled"] for s in per_v.values()
        ),
        ours=lambda per_v, x: ", ".join(
            f"V={v}: {s['exact_certified']}/{s['exact_sampled']}" for v, s in per_v.items()
        ),
    ),
    ClaimRule(
        "The max over B*T positions is conservative at V = {v_max}: the {c.quantile:g}-"
        "quantile radius is >= 1.5x rho_a (median over steps)",
        ">= 1.5",
        _top("q_over_max_median"),
        holds=lambda q, x: q >= 1.5,
        ours=lambda q, x: f"{q:.3g}",
        note=lambda q, x: (
            f"a batch has {x.c.batch_size * x.c.seq_len} positions: the {x.c.quantile:g}-quantile "
            "spread lies between the two largest spreads, so it can only be as loose as "
            "the gap between the largest two"
        ),
        always_note=True,
    ),
    ClaimRule(
        "Bottlenecks sit at rare tokens at V = {v_max}: median frequency rank of the "
        "bottleneck's input token above that of a training token",
        "above",
        lambda x: x.top,
        holds=lambda t, x: t["bottleneck_rank_median"] > t["token_rank_median"],
        ours=lambda t, x: f"{t['bottleneck_rank_median']:.0f} vs {t['token_rank_median']:.0f}",
    ),
    ClaimRule(
        "The output-logit radius binds in most steps at V = {v_max}",
        "> 50%",
        _top("binding"),
        holds=lambda b, x: b["out"] > 0.5 * sum(b.values()),
        ours=lambda b, x: f"{b['out']}/{sum(b.values())}",
        note=lambda b, x: (
            "steps binding out / attn / ffn: "
            + " / ".join(str(b.get(k, 0)) for k in ("out", "attn", "ffn"))
            + " (the FFN term is a proxy: a low quantile of |h| / |h_dot| over ReLU inputs)"
        ),
        always_note=True,
    ),
    ClaimRule(
        "The controller does not stall at LR x{lo:g}: final validation loss within 5% "
        "of plain AdamW",
        "<= 1.05x",
        _pair("lo"),
        holds=lambda pc, x: pc[1]["final_val"] <= 1.05 * pc[0]["final_val"],
        ours=lambda pc, x: f"{pc[1]['final_val']:.4g} vs {pc[0]['final_val']:.4g}",
    ),
    ClaimRule(
        "At LR x{hi:g} the controller ends with a lower validation loss than plain AdamW",
        "lower",
        _pair("hi"),
        # NaN (diverged) plain counts as higher
        holds=lambda pc, x: not pc[0]["final_val"] <= pc[1]["final_val"],
        ours=lambda pc, x: f"{pc[1]['final_val']:.4g} vs {pc[0]['final_val']:.4g}",
    ),
    ClaimRule(
        "At LR x{hi:g} the controller has no more loss spikes than plain AdamW",
        "<=",
        _pair("hi"),
        holds=lambda pc, x: pc[1]["spikes"] <= pc[0]["spikes"],
        ours=lambda pc, x: f"{pc[1]['spikes']} vs {pc[0]['spikes']}",
    ),
)


def _claims(c: Config, per_v: dict, stab: dict, slope: float) -> list[Claim]:
    v_max = max(per_v)
    return evaluate_claims(
        CLAIMS, c=c, per_v=per_v, stab=stab, slope=slope, v_max=v_max, top=per_v[v_max],
        lo=min(c.lr_factors), hi=max(c.lr_factors),
    )  # fmt: skip


def _vocab_table(per_v: dict) -> Table:
    rows = [[v, s["trained_vocab"], s["params"], f"{s['r_median']:.3g}",
             f"{s['r_min']:.3g}-{s['r_max']:.3g}", f"{s['share_r_gt_1']:.2f}",
             f"{s['rho_a_median']:.3g}", f"{s['q_over_max_median']:.3g}",
             f"{s['exact_ratio_median']:.3g} ({s['exact_certified']}/{s['exact_sampled']})",
             "/".join(str(s["binding"][k]) for k in ("out", "attn", "ffn")),
             f"{s['bottleneck_rank_median']:.0f} / {s['token_rank_median']:.0f}",
             f"{s['share_position_0']:.2f}", f"{s['final_val']:.4g}"]
            for v, s in per_v.items()]  # fmt: skip
    return Table(
        title="r and rho*/rho_a vs vocabulary size (standard LR, monitor mode; medians over "
              "steps)",
        columns=["V", "trained V", "params", "median r", "r range", "share r > 1",
                 "median rho_a", "rho_q / rho_a", "rho*/rho_a (certified/sampled)",
                 "binds out/attn/ffn", "bottleneck rank / token rank", "share at t = 0",
                 "final val loss"],
        rows=rows)  # fmt: skip


def _stability_table(c: Config, stab: dict) -> Table:
    rows = [[METHOD_LABELS[m], f"x{f:g}", f"{rec['final_val']:.4g}", rec["spikes"],
             f"{rec['tokens_per_s']:.0f}", "yes" if len(rec["losses"]) < c.steps else "no"]
            for (m, f), rec in stab.items()]  # fmt: skip
    return Table(
        title=f"Stability at high learning rate (V = {c.stability_vocab}, base LR {c.base_lr:g})",
        columns=["method", "LR", "final val loss", "loss spikes", "tokens/s", "diverged"],
        rows=rows)  # fmt: skip


def _plot_measure(c: Config, measure: dict, out_dir: Path):
    fig, (ax_r, ax_q) = new_figure(1, 2, figsize=(10, 3.6))
    for v, rec in sorted(measure.items()):
        steps = np.arange(len(rec["monitor"]))
        ax_r.plot(steps, [m["r"] for m in rec["monitor"]], label=f"V = {v}", lw=0.8)
        ax_q.plot(steps, [m["q_over_max"] for m in rec["monitor"]], label=f"V = {v}", lw=0.8)
    ax_r.axhline(1.0, color="k", ls=":", lw=0.8)
    ax_r.set_yscale("log")
    ax_r.set_title("r = ||p|| / ρa of the AdamW update")
    ax_q.set_title(f"ρ_q / ρa (q = {c.quantile:g})")
    for ax in (ax_r, ax_q):
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return save_figure(
        fig,
        out_dir,
        "lm_r_vs_vocab.png",
        "r of the AdamW update and the quantile radius over the max one, per V",
    )


def _plot_stability(c: Config, stab: dict, out_dir: Path):
    fig, axes = new_figure(1, len(c.lr_factors), figsize=(4.2 * len(c.lr_factors), 3.4))
    axes = np.atleast_1d(axes)
    for ax, f in zip(axes, c.lr_factors):
        for m in c.methods:
            rec = stab.get((m, f))
            if rec:
                ax.plot(rec["losses"], label=METHOD_LABELS[m], lw=0.7)
        ax.set_title(f"LR x{f:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    axes[0].legend(fontsize=7)
    return save_figure(
        fig,
        out_dir,
        "lm_stability.png",
        f"Training loss at LR x{c.lr_factors} (V = {c.stability_vocab})",
    )
