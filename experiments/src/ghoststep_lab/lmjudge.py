"""Judging the lmstability runs, fixed before the runs it judges.

Two parts, each with its claims and thresholds stated here before any run of the
setting they judge (the commit that added this module says "pre-registered"):

**The judging table.** For each method against plain AdamW, over the same seeds and
peak-LR grid (the per-run loss is ``min(final validation loss, initial loss)``, a
diverged run counting as its initial loss):

* best loss (lowest mean-over-seeds loss on the grid): within ``no_loss`` = 0.02 nats of
  AdamW's counts as *no loss*; lower by more is a *win*, higher by more a *loss*;
* grid-mean regret: the mean over the grid of the method's loss minus the common best
  (the lowest mean loss of any method at any LR). Its difference to AdamW's is the
  difference of grid means (the common best cancels); a 95 % paired bootstrap interval
  over seeds (the same resampled seeds for both methods, ``bootstrap`` resamples)
  entirely below 0 is a *win*, entirely above 0 a *loss*, else a *tie*;
* LR sensitivity (Wortsman et al.: grid mean minus the method's own best) with the same
  paired interval; a lower sensitivity counts only with the regret: a method whose
  sensitivity drops because its best got worse has not gained (the *verdict* below);
* divergences: runs whose final validation loss is not below the initial one;
* tokens per second relative to AdamW's (a cost above ``cost`` x is a *loss*).

Verdict per method: **win** = regret win and best loss not a loss; **trade-off** =
regret win but best loss a loss; **loss** = regret loss, or regret tie with a best-loss
loss; **tie** otherwise.

**The early-warning table.** In the runs of the monitored methods (plain AdamW and Muon
+ AdamW, wrapped in a ``mode="monitor"`` controller that measures r along every applied
update without changing it), a run *degrades* at the first step where its training
loss, averaged over the trailing ``ew_window`` steps, is ``ew_rise`` nats above the
lowest such average before it (or at its first non-finite loss). A signal *warns* at the
first step at or after ``ew_skip`` where it exceeds its threshold: r_out > 1 and
r_attn > 1 (the normalized step against the output and the attention radius), r =
max of the two > 1, ZClip's gradient-norm z-score > ``zclip_z`` (EMA mean / variance
as ZClip, ``zclip_alpha``), and the max attention logit > ``qkclip_tau`` (QK-Clip's
threshold). Lead = degrade step - warn step (> 0: warned before). The claims: r warns
before the rise in at least 80 % of the degrading runs; its median lead is at least the
z-score's and the max attention logit's; it fires in at most half of the runs that do
not degrade (a warning that always fires tells nothing).
"""

from __future__ import annotations

import math

import numpy as np

from ghoststep_lab.common.figures import new_figure, save_figure
from ghoststep_lab.common.results import ClaimRule, Table

# ----------------------------------------------------------------------------- judging


def loss_matrix(records: list[dict], method: str, seeds, lrs, capped) -> np.ndarray:
    """(seeds, lrs) capped losses of ``method``; NaN where a run is missing."""
    out = np.full((len(seeds), len(lrs)), np.nan)
    index = {(r["seed"], r["lr"]): r for r in records if r["method"] == method}
    for i, s in enumerate(seeds):
        for j, lr in enumerate(lrs):
            if (s, lr) in index:
                out[i, j] = capped(index[(s, lr)])
    return out


def _sensitivity(curve: np.ndarray) -> float:
    return float(curve.mean() - curve.min())


def paired_interval(a: np.ndarray, b: np.ndarray, stat, n: int, ci: float, seed: int = 0):
    """Percentile interval of ``stat(mean_seeds(a)) - stat(mean_seeds(b))`` over ``n``
    bootstrap resamples of the seeds (rows), the same rows for both: ``(lo, hi)``."""
    rng = np.random.default_rng(seed)
    k = a.shape[0]
    idx = rng.integers(0, k, size=(n, k))
    diffs = np.array([stat(a[i].mean(0)) - stat(b[i].mean(0)) for i in idx])
    q = (1 - ci) / 2
    return float(np.quantile(diffs, q)), float(np.quantile(diffs, 1 - q))


def _interval_verdict(lo: float, hi: float) -> str:
    return "win" if hi < 0 else ("loss" if lo > 0 else "tie")


def _verdict(regret: str, best: str) -> str:
    if regret == "win":
        return "trade-off" if best == "loss" else "win"
    if regret == "loss" or best == "loss":
        return "loss"
    return "tie"


def judge(c, records: list[dict], methods, capped, tokens_per_s: dict) -> dict:
    """Per method: the judging quantities and verdicts against AdamW (see the module)."""
    seeds, lrs = list(c.seeds), sorted(c.lrs)
    mats = {m: loss_matrix(records, m, seeds, lrs, capped) for m in methods}
    mats = {m: v for m, v in mats.items() if not np.isnan(v).any()}
    common_best = min(float(v.mean(0).min()) for v in mats.values())
    a = mats["adamw"]
    out = {}
    for m, v in mats.items():
        curve = v.mean(0)
        best_delta = float(curve.min() - a.mean(0).min())
        best_v = (
            "win" if best_delta < -c.no_loss else ("loss" if best_delta > c.no_loss else "no loss")
        )
        r_lo, r_hi = paired_interval(v, a, np.mean, c.bootstrap, c.ci)
        s_lo, s_hi = paired_interval(v, a, _sensitivity, c.bootstrap, c.ci)
        ratio = tokens_per_s["adamw"] / tokens_per_s[m] if tokens_per_s.get(m) else math.nan
        div = sum(1 for r in records if r["method"] == m and r["diverged"])
        regret_v = _interval_verdict(r_lo, r_hi) if m != "adamw" else "-"
        out[m] = {
            "best": float(curve.min()),
            "best_lr": lrs[int(np.argmin(curve))],
            "best_delta": best_delta,
            "best_verdict": best_v if m != "adamw" else "-",
            "regret": float(curve.mean() - common_best),
            "regret_delta": float(curve.mean() - a.mean(0).mean()),
            "regret_ci": (r_lo, r_hi),
            "regret_verdict": regret_v,
            "sensitivity": _sensitivity(curve),
            "sens_delta": _sensitivity(curve) - _sensitivity(a.mean(0)),
            "sens_ci": (s_lo, s_hi),
            "sens_verdict": _interval_verdict(s_lo, s_hi) if m != "adamw" else "-",
            "diverged": div,
            "tokens_per_s": tokens_per_s.get(m, math.nan),
            "cost": ratio,
            "verdict": _verdict(regret_v, best_v) if m != "adamw" else "reference",
        }
    return out


def judging_table(c, j: dict, labels: dict) -> Table:
    rows = []
    for m, v in j.items():
        ref = m == "adamw"
        rows.append(
            [
                labels[m],
                f"{v['best']:.4g} ({v['best_delta']:+.3f})",
                f"{v['regret']:.3f}",
                "-"
                if ref
                else f"{v['regret_delta']:+.3f} [{v['regret_ci'][0]:+.3f}, "
                f"{v['regret_ci'][1]:+.3f}]",
                f"{v['sensitivity']:.3f}",
                "-"
                if ref
                else f"{v['sens_delta']:+.3f} [{v['sens_ci'][0]:+.3f}, {v['sens_ci'][1]:+.3f}]",
                v["diverged"],
                f"{v['tokens_per_s']:.0f} ({v['cost']:.2f}x)",
                v["verdict"],
            ]
        )
    return Table(
        title=f"Judging (fixed before the runs): {len(c.seeds)} seeds x {len(c.lrs)} peak LRs; "
        f"best loss (vs AdamW; within {c.no_loss:g} nats = no loss), grid-mean regret "
        f"against the common best, its difference to AdamW with a {c.ci:.0%} paired "
        "bootstrap interval over seeds, LR sensitivity and its difference, diverged runs, "
        "tokens/s (AdamW's / the method's)",
        columns=[
            "method",
            "best loss (vs AdamW)",
            "regret",
            "regret - AdamW's [CI]",
            "LR sensitivity",
            "sensitivity - AdamW's [CI]",
            "diverged",
            "tokens/s (cost)",
            "verdict",
        ],
        rows=rows,
    )


def _has(*ms):
    return lambda x: tuple(x.j[m] for m in ms) if all(m in x.j for m in ms) else None


def _ci(v, key):
    return f"{v[key + '_delta']:+.3f} [{v[key + '_ci'][0]:+.3f}, {v[key + '_ci'][1]:+.3f}]"


# The pre-registered claims (thresholds in the Config: no_loss, cost, ci, bootstrap).
JUDGED_CLAIMS = (
    ClaimRule(
        "Positive control: qk-layernorm + z-loss lowers the LR sensitivity below plain "
        "AdamW's, the paired bootstrap interval of the difference below 0",
        "lower (Wortsman et al. Fig. 1)",
        _has("qkln_zloss"),
        holds=lambda v, x: v[0]["sens_ci"][1] < 0,
        ours=lambda v, x: _ci(v[0], "sens"),
    ),
    ClaimRule(
        "Positive control: qk-layernorm + z-loss lowers the grid-mean regret (interval "
        "below 0) with no loss in best loss",
        "win",
        _has("qkln_zloss"),
        holds=lambda v, x: v[0]["verdict"] == "win",
        ours=lambda v, x: f"{_ci(v[0], 'regret')}; best {v[0]['best_delta']:+.3f}",
    ),
    ClaimRule(
        "QK-Clip (AdamW) is no loss against AdamW (verdict win or tie)",
        "no loss (Kimi K2)",
        _has("qkclip"),
        holds=lambda v, x: v[0]["verdict"] in ("win", "tie"),
        ours=lambda v, x: f"{v[0]['verdict']}: {_ci(v[0], 'regret')}",
    ),
    ClaimRule(
        "Muon + AdamW reaches AdamW's best loss (no loss: within {c.no_loss:g} nats, or lower)",
        "no loss (Liu et al. 2025)",
        _has("muon"),
        holds=lambda v, x: v[0]["best_verdict"] in ("win", "no loss"),
        ours=lambda v, x: f"{v[0]['best']:.4g} ({v[0]['best_delta']:+.3f})",
    ),
    ClaimRule(
        "MuonClip (Muon + QK-Clip) has a grid-mean regret no higher than Muon's",
        "<= Muon's (Kimi K2)",
        _has("muon_qkclip", "muon"),
        holds=lambda v, x: v[0]["regret"] <= v[1]["regret"],
        ours=lambda v, x: f"{v[0]['regret']:.3f} vs {v[1]['regret']:.3f}",
    ),
    ClaimRule(
        "The controller (clip, out + attn) over AdamW wins: grid-mean regret interval "
        "below AdamW's and no loss in best loss",
        "win",
        _has("ctrl_attn"),
        holds=lambda v, x: v[0]["verdict"] == "win",
        ours=lambda v, x: (
            f"{v[0]['verdict']}: {_ci(v[0], 'regret')}; best {v[0]['best_delta']:+.3f}"
        ),
    ),
    ClaimRule(
        "The controller (clip, out + attn) has a grid-mean regret no higher than "
        "qk-layernorm + z-loss's",
        "<= qk-LN + z-loss",
        _has("ctrl_attn", "qkln_zloss"),
        holds=lambda v, x: v[0]["regret"] <= v[1]["regret"],
        ours=lambda v, x: f"{v[0]['regret']:.3f} vs {v[1]['regret']:.3f}",
    ),
    ClaimRule(
        "One controller (clip, out + attn) over Muon + AdamW has a grid-mean regret no "
        "higher than Muon + AdamW's and no loss in best loss against it (within "
        "{c.no_loss:g} nats)",
        "<= Muon's, best within tolerance",
        _has("muon_ctrl", "muon"),
        holds=lambda v, x: (
            v[0]["regret"] <= v[1]["regret"] and v[0]["best"] <= v[1]["best"] + x.c.no_loss
        ),
        ours=lambda v, x: (
            f"regret {v[0]['regret']:.3f} vs {v[1]['regret']:.3f}; best "
            f"{v[0]['best']:.4g} vs {v[1]['best']:.4g}"
        ),
    ),
    ClaimRule(
        "No controller diverges more often than AdamW",
        "<= AdamW's divergences",
        lambda x: {m: v for m, v in x.j.items() if "ctrl" in m} or None,
        holds=lambda v, x: all(t["diverged"] <= x.j["adamw"]["diverged"] for t in v.values()),
        ours=lambda v, x: (
            ", ".join(f"{m} {t['diverged']}" for m, t in v.items())
            + f" (AdamW {x.j['adamw']['diverged']})"
        ),
    ),
    ClaimRule(
        "The controller (out + attn) over AdamW costs at most {c.cost:g}x in tokens/s",
        lambda x: f"<= {x.c.cost:g}x",
        _has("ctrl_attn"),
        holds=lambda v, x: v[0]["cost"] <= x.c.cost,
        ours=lambda v, x: f"{v[0]['cost']:.2f}x",
    ),
)


# ----------------------------------------------------------------------------- early warning


def degrade_step(losses, window: int, rise: float) -> int | None:
    """First step whose trailing-``window`` mean training loss is ``rise`` above the
    lowest earlier trailing mean, or the first non-finite loss; None: no rise."""
    arr = np.asarray(losses, dtype=float)
    bad = np.flatnonzero(~np.isfinite(arr))
    end = int(bad[0]) if bad.size else arr.size
    lowest = math.inf
    for t in range(window - 1, end):
        avg = float(arr[t - window + 1 : t + 1].mean())
        if avg >= lowest + rise:
            return t
        lowest = min(lowest, avg)
    return end if bad.size else None


def zscores(norms, alpha: float, warmup: int) -> list[float]:
    """ZClip's z-score of each step's gradient norm against the EMA mean and variance
    of the earlier norms (NaN during the ``warmup`` steps that only collect)."""
    out, mean, var = [], None, None
    for t, g in enumerate(norms):
        if not math.isfinite(g):
            out.append(math.inf)
            continue
        if t < warmup or mean is None:
            out.append(math.nan)
            seen = norms[: t + 1]
            mean, var = float(np.mean(seen)), float(np.var(seen))
            continue
        std = math.sqrt(max(var, 1e-24))
        out.append((g - mean) / std)
        mean = alpha * mean + (1 - alpha) * g
        var = alpha * var + (1 - alpha) * (g - mean) ** 2
    return out


def signals(rec: dict, c) -> dict[str, tuple[list[int], list[float], float]]:
    """Per signal: (steps, values, threshold) of one monitored run."""
    rows = rec["controller"]
    steps = [row["step"] for row in rows]

    def r(key):
        return [row["tau"] / row["radii"][key] if row["radii"][key] > 0 else math.inf
                for row in rows]  # fmt: skip

    r_out, r_attn = r("out"), r("attn")
    z = zscores(rec["grad_norms"], c.zclip_alpha, c.zclip_warmup)
    return {
        "r_out": (steps, r_out, 1.0),
        "r_attn": (steps, r_attn, 1.0),
        "r": (steps, [max(a, b) for a, b in zip(r_out, r_attn)], 1.0),
        "grad z": (list(range(len(z))), z, c.zclip_z),
        "max attn logit": (
            [e["step"] for e in rec["log"]],
            [e["max_attn"] for e in rec["log"]],
            c.qkclip_tau,
        ),
    }


SIGNALS = ("r_out", "r_attn", "r", "grad z", "max attn logit")


def first_crossing(steps, values, threshold: float, skip: int) -> int | None:
    for s, v in zip(steps, values):
        if s >= skip and (v > threshold or (isinstance(v, float) and math.isinf(v))):
            return s
    return None


def early_warning(c, records: list[dict]) -> dict:
    """Per signal: leads in the degrading monitored runs, and the share of the other
    monitored runs it fired in."""
    runs = [r for r in records if r["method"] in c.monitor and r["controller"]]
    out = {k: {"leads": [], "missed": 0, "fired_clean": 0} for k in SIGNALS}
    degrading, clean = [], 0
    for rec in runs:
        d = degrade_step(rec["losses"], c.ew_window, c.ew_rise)
        sig = signals(rec, c)
        if d is not None:
            degrading.append((rec["method"], rec["lr"], rec["seed"], d))
        else:
            clean += 1
        for k in SIGNALS:
            hit = first_crossing(*sig[k], c.ew_skip)
            if d is None:
                out[k]["fired_clean"] += hit is not None
            elif hit is None or hit > d:
                out[k]["missed"] += 1
                out[k]["leads"].append(d - hit if hit is not None else None)
            else:
                out[k]["leads"].append(d - hit)
    for v in out.values():
        ok = [x for x in v["leads"] if x is not None and x >= 0]
        v["warned"] = len(ok)
        v["median_lead"] = float(np.median(ok)) if ok else math.nan
    return {"signals": out, "degrading": degrading, "clean": clean, "monitored": len(runs)}


def early_warning_table(c, ew: dict) -> Table:
    n_bad = len(ew["degrading"])
    rows = []
    for k in SIGNALS:
        v = ew["signals"][k]
        thr = {"grad z": c.zclip_z, "max attn logit": c.qkclip_tau}.get(k, 1.0)
        rows.append(
            [
                f"{k} > {thr:g}",
                f"{v['warned']}/{n_bad}",
                f"{v['median_lead']:.0f}" if math.isfinite(v["median_lead"]) else "-",
                f"{v['fired_clean']}/{ew['clean']}",
            ]
        )
    return Table(
        title=f"Early warning in the monitored runs ({', '.join(c.monitor)}; "
        f"{ew['monitored']} runs, {n_bad} degrade: trailing {c.ew_window}-step mean "
        f"training loss {c.ew_rise:g} nats above its lowest, or non-finite); first "
        f"crossing at step >= {c.ew_skip}",
        columns=[
            "signal",
            "warned before the rise",
            "median lead (steps)",
            "fired in runs that do not degrade",
        ],
        rows=rows,
    )


def _ew(x):
    return x.ew if x.ew["monitored"] and x.ew["degrading"] else None


EARLY_WARNING_CLAIMS = (
    ClaimRule(
        "r = max(r_out, r_attn) exceeds 1 before the loss rises in >= 80% of the "
        "degrading monitored runs",
        ">= 80%",
        _ew,
        holds=lambda ew, x: ew["signals"]["r"]["warned"] >= 0.8 * len(ew["degrading"]),
        ours=lambda ew, x: f"{ew['signals']['r']['warned']}/{len(ew['degrading'])}",
    ),
    ClaimRule(
        "r warns at least as early (median lead) as the gradient-norm z-score and the max "
        "attention logit",
        ">= both",
        _ew,
        holds=lambda ew, x: (
            all(
                ew["signals"]["r"]["median_lead"] >= ew["signals"][k]["median_lead"]
                or not math.isfinite(ew["signals"][k]["median_lead"])
                for k in ("grad z", "max attn logit")
            )
            and math.isfinite(ew["signals"]["r"]["median_lead"])
        ),
        ours=lambda ew, x: " / ".join(
            f"{k} {ew['signals'][k]['median_lead']:.0f}" for k in ("r", "grad z", "max attn logit")
        ),
    ),
    ClaimRule(
        "r fires in at most half of the monitored runs that do not degrade",
        "<= 50%",
        lambda x: x.ew if x.ew["clean"] else None,
        holds=lambda ew, x: ew["signals"]["r"]["fired_clean"] <= 0.5 * ew["clean"],
        ours=lambda ew, x: f"{ew['signals']['r']['fired_clean']}/{ew['clean']}",
    ),
)


def plot_early_warning(c, ew: dict, records: list[dict], out_dir):
    """Lead per signal over the degrading runs, and one degrading run's signals."""
    fig, (ax_l, ax_t) = new_figure(1, 2, figsize=(10.0, 3.8))
    for i, k in enumerate(SIGNALS):
        leads = [x for x in ew["signals"][k]["leads"] if x is not None]
        ax_l.plot(leads, [i] * len(leads), "o", alpha=0.5, ms=4)
    ax_l.axvline(0, color="k", lw=0.8)
    ax_l.set_yticks(range(len(SIGNALS)), list(SIGNALS))
    ax_l.set_xlabel("lead: degrade step - first crossing (steps; > 0 warned before)")
    ax_l.set_title("lead per degrading run")
    if ew["degrading"]:
        m, lr, seed, d = max(ew["degrading"], key=lambda t: t[1])
        rec = next(r for r in records if (r["method"], r["lr"], r["seed"]) == (m, lr, seed))
        for k, (steps, vals, thr) in signals(rec, c).items():
            ax_t.plot(steps, np.asarray(vals, dtype=float) / thr, lw=0.8, label=k)
        ax_t.axhline(1.0, color="k", lw=0.6)
        ax_t.axvline(d, color="r", lw=0.8, ls="--", label="loss rises")
        ax_t.set_yscale("log")
        ax_t.set_title(f"{m}, LR {lr:g}, seed {seed}: signal / threshold")
        ax_t.set_xlabel("step")
        ax_t.legend(fontsize=6)
    return save_figure(
        fig,
        out_dir,
        "lmstability_early_warning.png",
        "Early warning: how many steps before the training loss rises each signal "
        "crosses its threshold (left), and the signals of one degrading run (right)",
    )


# ----------------------------------------------------------------------------- post hoc

# Added after the paper preset's first runs, NOT pre-registered: in this setting the
# training loss of the high-LR AdamW runs never rises on a 50-step scale (it descends
# slower and ends higher), while the pre-registered 10-step / 0.1-nat detector fires on
# batch noise in runs at every LR. So this table asks a run-level question instead: which
# signal, early in training, separates the runs that end degraded from those that do not?
DEGRADED_NATS = 0.3  # final loss this far above the same seed's best AdamW loss: degraded
GOOD_NATS = 0.1  # within this of it: good (runs in between are left out)
EARLY_STEP = 100  # "early": crossed by this step (a quarter of the paper preset's 400)


def early_detection(c, records: list[dict], capped) -> dict:
    """Per signal: how many degraded and good monitored runs it crossed its threshold in
    by ``EARLY_STEP`` (first crossing at or after ``ew_skip``), and the median first
    crossing step in the degraded runs."""
    runs = [r for r in records if r["method"] in c.monitor and r["controller"]]
    best = {}
    for r in runs:
        key = (r["method"], r["seed"])
        best[key] = min(best.get(key, (math.inf, 0.0)), (capped(r), r["lr"]))
    groups = {"degraded": [], "good": []}
    for r in runs:
        loss, lr = best[(r["method"], r["seed"])]
        gap = capped(r) - loss
        if gap >= DEGRADED_NATS and r["lr"] > lr:  # above the best LR: not undertrained
            groups["degraded"].append(r)
        elif gap <= GOOD_NATS:
            groups["good"].append(r)
    out = {"n": {k: len(v) for k, v in groups.items()}, "signals": {}}
    for k in SIGNALS:
        hits = {g: [first_crossing(*signals(r, c)[k], c.ew_skip) for r in rs]
                for g, rs in groups.items()}  # fmt: skip
        early = {g: sum(h is not None and h <= EARLY_STEP for h in hs) for g, hs in hits.items()}
        steps = [h for h in hits["degraded"] if h is not None]
        out["signals"][k] = {
            "early": early,
            "median_step": float(np.median(steps)) if steps else math.nan,
        }
    return out


def early_detection_table(c, ed: dict) -> Table:
    rows = [
        [
            k,
            f"{v['early']['degraded']}/{ed['n']['degraded']}",
            f"{v['early']['good']}/{ed['n']['good']}",
            f"{v['median_step']:.0f}" if math.isfinite(v["median_step"]) else "-",
        ]
        for k, v in ed["signals"].items()
    ]
    return Table(
        title=f"Post hoc (not pre-registered): early detection in the monitored runs. "
        f"Degraded: a peak LR above the same seed's best, final loss >= {DEGRADED_NATS:g} "
        "nats above that best; good: "
        f"within {GOOD_NATS:g}. Share whose signal crossed its threshold by step "
        f"{EARLY_STEP} (from step {c.ew_skip})",
        columns=[
            "signal",
            f"degraded runs crossed by step {EARLY_STEP}",
            f"good runs crossed by step {EARLY_STEP}",
            "median first crossing, degraded runs",
        ],
        rows=rows,
    )
