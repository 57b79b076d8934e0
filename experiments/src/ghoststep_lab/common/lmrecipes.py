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
"""

from __future__ import annotations

import math

import torch

__all__ = ["hidden_matrices", "muon_adamw", "head_max_logits", "QKClip"]


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
            d = attn.qkv.in_features
            d_head = d // attn.n_heads
            for h in torch.nonzero(s_max > self.tau).flatten().tolist():
                v = float(s_max[h])
                if not math.isfinite(v):
                    continue  # a non-finite forward: the run has diverged, nothing to save
                factor = math.sqrt(self.tau / v)
                for start in (h * d_head, d + h * d_head):  # query rows, key rows
                    rows = slice(start, start + d_head)
                    attn.qkv.weight[rows].mul_(factor)
                    if attn.qkv.bias is not None:
                        attn.qkv.bias[rows].mul_(factor)
                self.clipped += 1
