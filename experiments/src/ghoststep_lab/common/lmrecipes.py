"""Optimizer recipes LLM teams use, for the TinyLM experiments: Muon for the hidden
matrices with AdamW for the rest, and Kimi K2's QK-Clip.

* **Muon + AdamW** (Jordan et al. 2024; Liu et al., "Muon is Scalable for LLM
  Training", 2025): the 2-D weight matrices inside the transformer blocks go to
  ``torch.optim.Muon`` (momentum 0.95, Nesterov, five Newton-Schulz steps, the update
  scaled to AdamW's RMS by ``adjust_lr_fn="match_rms_adamw"`` so the AdamW learning rate
  and weight decay carry over); embeddings (tied with the output layer), LayerNorm gains
  and biases go to AdamW. The fused ``qkv`` matrix is orthogonalized as one matrix.
* **QK-Clip** (Kimi Team, "Kimi K2: Open Agentic Intelligence", arXiv:2507.20534):
  after each optimizer step, every attention head whose largest pre-softmax logit
  ``S_max^h = max_{batch, i, j} q_i . k_j / sqrt(d_head)`` in that step's forward
  exceeded ``tau`` has its query and key projections multiplied by
  ``sqrt(gamma_h)``, ``gamma_h = tau / S_max^h``; the forward and backward are
  unchanged. K2 uses tau = 100 (with Muon: "MuonClip").
* **Head radius clip** (ours, a heuristic): QK-Clip's per-head action driven by the
  attention radius instead of the logit size. After a step Delta, one forward-mode
  pass at the old parameters gives each head's attention-logit tangents along Delta
  and its radius ``rho_h = pi ||Delta|| / spread_h`` (a distance in parameter space,
  like the controller's rho_a: ``spread_h`` is the largest spread of the tangents
  along Delta over the keys attended to); every head with ``||Delta|| > r* rho_h``
  gets only its query and key rows of Delta shortened, by ``gamma_h = r* rho_h /
  ||Delta||``. The rest of the update is applied unchanged.
  Not a bound: the head's logits also move with the layer's input (earlier layers'
  updates), which the rescale leaves as it is.
"""

from __future__ import annotations

import math

import torch

from ghoststep.evaluation import directional, trainable_parameters

__all__ = [
    "hidden_matrices",
    "muon_adamw",
    "head_max_logits",
    "head_spreads",
    "QKClip",
    "HeadRadiusClip",
]


def hidden_matrices(model: torch.nn.Module) -> tuple[list, list]:
    """(2-D weights inside ``model.blocks``, every other trainable parameter).

    The embeddings and the (tied) output layer stay with AdamW, as in the Muon recipe:
    their rows are per-token vectors, not a linear map to orthogonalize."""
    hidden = {id(p): p for p in model.blocks.parameters() if p.requires_grad and p.ndim == 2}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden]
    return list(hidden.values()), rest


def muon_adamw(model: torch.nn.Module, lr: float, weight_decay: float, adam_eps: float = 1e-8):
    """``[Muon(hidden matrices), AdamW(the rest)]`` at peak LR ``lr`` (one list: step
    both, or wrap both in one ``RadiusController``)."""
    hidden, rest = hidden_matrices(model)
    muon = torch.optim.Muon(
        hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    adamw = torch.optim.AdamW(
        rest, lr=lr, betas=(0.9, 0.95), eps=adam_eps, weight_decay=weight_decay
    )
    return [muon, adamw]


def head_max_logits(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the (H,) largest pre-softmax logit of each head over the batch, the
    queries and the keys attended to (masked entries, at -inf, never win a max)."""
    out = []
    for s in scores:
        m = s.detach().amax(dim=(0, 2, 3))  # (B, H, T, T) -> (H,)
        out.append(m)
    return out


def head_spreads(scores: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """(H,) largest spread over the keys attended to (max_k - min_k of the tangents) of
    each head, over the batch and the queries: (B, H, T_q, T_k) scores with masked keys
    at -inf (left out) and their tangents."""
    masked = scores == -math.inf
    hi = tangents.masked_fill(masked, -math.inf).amax(-1)
    lo = tangents.masked_fill(masked, math.inf).amin(-1)
    spread = (hi - lo).nan_to_num(nan=0.0, neginf=0.0)  # a query with no key: no spread
    return spread.amax(dim=(0, 2)).clamp(min=0.0)


def _qk_rows(attn, head: int) -> tuple[slice, slice]:
    """Head ``head``'s query rows and key rows of the fused ``qkv`` linear."""
    d = attn.qkv.in_features
    d_head = d // attn.n_heads
    return slice(head * d_head, (head + 1) * d_head), slice(
        d + head * d_head, d + (head + 1) * d_head
    )


class QKClip:
    """Kimi K2's per-head QK-Clip for :class:`~ghoststep_lab.common.models.SelfAttention`
    (fused ``qkv`` linear: rows ``[0, d)`` the queries, ``[d, 2d)`` the keys, head h
    at rows ``h*d_head .. (h+1)*d_head`` of each).

    ``clip(model)`` after the optimizer step reads the attention logits the model
    recorded in that step's forward (``model.record = True``) and rescales the heads
    above ``tau``; the query bias is scaled with its weights (a query is ``W_q x + b_q``,
    so both must shrink for the logit to shrink by ``gamma``). ``clipped`` counts the
    head rescales so far.
    """

    def __init__(self, tau: float = 100.0):
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        self.tau = float(tau)
        self.clipped = 0

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> None:
        scores = model.last_attention_logits
        for block, s_max in zip(model.blocks, head_max_logits(scores)):
            attn = block.attn
            for h in torch.nonzero(s_max > self.tau).flatten().tolist():
                v = float(s_max[h])
                if not math.isfinite(v):
                    continue  # a non-finite forward: the run has diverged, nothing to save
                factor = math.sqrt(self.tau / v)
                for rows in _qk_rows(attn, h):
                    attn.qkv.weight[rows].mul_(factor)
                    if attn.qkv.bias is not None:
                        attn.qkv.bias[rows].mul_(factor)
                self.clipped += 1


class HeadRadiusClip:
    """The head radius clip (module docstring) for
    :class:`~ghoststep_lab.common.models.SelfAttention` models that take
    ``return_internals=True``.

    ``snapshot(model)`` before the optimizer step keeps the old parameters;
    ``clip(model, inputs)`` after it measures each head's radius along the applied
    update Delta on the step's batch ``inputs`` and shortens the query / key rows of
    the heads it binds. ``shortened`` counts the head rescales so far; ``last_rho``
    holds the last step's per-layer (H,) radii, distances along Delta / ||Delta||.
    """

    def __init__(self, target_r: float = 1.0):
        if not target_r > 0:
            raise ValueError(f"target_r must be > 0, got {target_r!r}")
        self.target_r = float(target_r)
        self.shortened = 0
        self.last_rho: list[torch.Tensor] = []
        self._old: list[torch.Tensor] | None = None

    @torch.no_grad()
    def snapshot(self, model: torch.nn.Module) -> None:
        self._old = [p.detach().clone() for _, p in trainable_parameters(model)]

    @torch.no_grad()
    def clip(self, model: torch.nn.Module, inputs: torch.Tensor) -> None:
        if self._old is None:
            raise RuntimeError("HeadRadiusClip.clip called without a snapshot before the step")
        named = trainable_parameters(model)
        old, self._old = self._old, None
        delta = [p.detach() - o for (_, p), o in zip(named, old, strict=True)]
        norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta))
        if not (norm > 0 and math.isfinite(norm)):
            return  # nothing moved, or a non-finite step: nothing a rescale can save
        record, model.record = model.record, False  # keep the step's recorded logits
        scores, tangents = directional(
            model, (inputs,), {"return_internals": True}, delta, primals=old,
            output_fn=lambda out: tuple(out[1]["attention_logits"]),
        )  # fmt: skip
        model.record = record
        where = {id(p): i for i, (_, p) in enumerate(named)}
        self.last_rho = []
        for block, s, t in zip(model.blocks, scores, tangents, strict=True):
            rho = math.pi * norm / head_spreads(s, t).double()  # t = 1 is the whole step
            self.last_rho.append(rho)
            gamma = (self.target_r * rho / norm).clamp(max=1.0)
            attn = block.attn
            for h in torch.nonzero(gamma < 1.0).flatten().tolist():
                for p in (attn.qkv.weight, attn.qkv.bias):
                    if p is None:
                        continue
                    i = where[id(p)]
                    for rows in _qk_rows(attn, h):
                        p[rows] = old[i][rows] + float(gamma[h]) * delta[i][rows]
                self.shortened += 1
