"""Small architectures for the paper's experiments (paper Section 6).

The six digit classifiers take flat 64-feature inputs (8x8 sklearn digits scaled to
[0, 1]) and reshape inside when they need an image or a token sequence. All are
forward-mode-AD friendly: attention is written out with an explicit softmax (no
``F.scaled_dot_product_attention``, whose CPU kernel has no forward AD), so
``ghoststep.measurement.logit_slopes`` works on every model here.

Construction is deterministic given the global seed: call ``torch.manual_seed``
before ``build_model``.

>>> import torch
>>> from ghoststep_lab.common.models import build_model
>>> _ = torch.manual_seed(0)
>>> build_model("cnn_bn")(torch.rand(4, 64)).shape
torch.Size([4, 10])
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ARCHITECTURES",
    "Linear",
    "MLP",
    "MLPLayerNorm",
    "CNN",
    "CNNBatchNorm",
    "TinyTransformer",
    "TinyLM",
    "ResNet18",
    "resnet18_cifar",
    "build_model",
]

ARCHITECTURES = ("linear", "mlp", "mlp_ln", "cnn", "cnn_bn", "transformer")

IN_FEATURES = 64
NUM_CLASSES = 10


class Linear(nn.Module):
    """Multinomial logistic regression 64 -> 10."""

    def __init__(self, in_features: int = IN_FEATURES, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """64 -> hidden -> 10 with ReLU (the paper's learning-rate-spike model).

    ``dropout > 0`` inserts a Dropout after the activation.
    """

    def __init__(
        self,
        hidden: int = 128,
        in_features: int = IN_FEATURES,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class MLPLayerNorm(nn.Module):
    """64 -> hidden -> 10 with LayerNorm and exact (erf) GELU: Linear-LN-GELU-Linear."""

    def __init__(
        self, hidden: int = 128, in_features: int = IN_FEATURES, num_classes: int = NUM_CLASSES
    ):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Two 3x3 conv layers (ReLU, 2x2 max-pool) on the 8x8 image, then a linear head."""

    def __init__(self, channels: int = 16, num_classes: int = NUM_CLASSES, batch_norm=False):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            return layers + [nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(1, channels), *block(channels, 2 * channels))
        self.head = nn.Linear(2 * channels * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        return self.head(self.features(x).flatten(1))


class CNNBatchNorm(CNN):
    """``CNN`` with BatchNorm2d after each convolution."""

    def __init__(self, channels: int = 16, num_classes: int = NUM_CLASSES):
        super().__init__(channels, num_classes, batch_norm=True)


# ------------------------------------------------------------------------ attention


class SelfAttention(nn.Module):
    """Multi-head self-attention with an explicit softmax (forward-AD friendly).

    The pre-softmax logits ``q k^T / sqrt(d_head)`` (B, H, T, T) are what the
    attention radius rho_attn = pi / Delta_attn is computed from.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)
        if self.causal:
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(y), scores


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN x); x + FFN(LN x)."""

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, activation: str, causal: bool = False
    ):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, causal=causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.ff_out = nn.Linear(d_ff, d_model)
        if activation not in ("relu", "gelu"):
            raise ValueError(f'activation must be "relu" or "gelu", got {activation!r}')
        self.activation = activation

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, scores = self.attn(self.ln1(x))
        x = x + a
        pre = self.ff_in(self.ln2(x))
        act = F.relu(pre) if self.activation == "relu" else F.gelu(pre)
        return x + self.ff_out(act), scores, pre


class _TransformerBase(nn.Module):
    """Shared bookkeeping for the internals (attention logits, FFN pre-activations).

    Two ways to get them:

    * ``record = True`` (attribute or constructor flag): each forward stores detached
      copies in ``last_attention_logits`` / ``last_ffn_preacts`` (lists, one tensor
      per layer). Convenient for values; not for tangents.
    * ``forward(x, return_internals=True)`` returns ``(logits, internals)`` with
      ``internals = {"attention_logits": [...], "ffn_preacts": [...]}``. This is a
      pytree of tensors, so ``torch.func.jvp`` gives the tangents of every internal
      (needed for the FFN kink proxy |h| / |h_dot|).
    """

    def _finish(self, logits, scores, preacts, return_internals: bool):
        if self.record:
            self.last_attention_logits = [s.detach() for s in scores]
            self.last_ffn_preacts = [p.detach() for p in preacts]
        if return_internals:
            return logits, {"attention_logits": scores, "ffn_preacts": preacts}
        return logits


class TinyTransformer(_TransformerBase):
    """Transformer classifier for 8x8 digits: the 8 image rows are 8 tokens of 8 features.

    Linear token embedding + learned positional embedding, ``n_layers`` pre-LN blocks
    (explicit-softmax attention, FFN with ReLU by default), final LayerNorm, mean
    pooling over tokens, linear head.
    """

    def __init__(
        self,
        d_model: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        activation: str = "relu",
        num_classes: int = NUM_CLASSES,
        record: bool = False,
    ):
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(8, d_model))
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff or 4 * d_model, activation) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        self.record = record
        self.last_attention_logits: list[torch.Tensor] = []
        self.last_ffn_preacts: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, return_internals: bool = False):
        h = self.embed(x.reshape(-1, 8, 8)) + self.pos
        scores, preacts = [], []
        for block in self.blocks:
            h, s, p = block(h)
            scores.append(s)
            preacts.append(p)
        logits = self.head(self.ln_f(h).mean(dim=1))
        return self._finish(logits, scores, preacts, return_internals)


class TinyLM(_TransformerBase):
    """Small causal language model with tied input/output embeddings.

    ``lm_head.weight is tok_emb.weight``; input (B, T) token ids, output logits
    (B, T, vocab_size). ``emb_std`` re-initializes both embeddings from N(0, emb_std^2)
    (GPT-2 uses 0.02; None keeps ``nn.Embedding``'s N(0, 1), whose tied logits start
    large).
    """

    def __init__(
        self,
        vocab_size: int = 97,
        d_model: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = 64,
        d_ff: int | None = None,
        activation: str = "gelu",
        record: bool = False,
        emb_std: float | None = None,
    ):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        if emb_std is not None:
            nn.init.normal_(self.tok_emb.weight, std=emb_std)
            nn.init.normal_(self.pos_emb.weight, std=emb_std)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff or 4 * d_model, activation, causal=True)
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.max_len = max_len
        self.record = record
        self.last_attention_logits: list[torch.Tensor] = []
        self.last_ffn_preacts: list[torch.Tensor] = []

    def forward(self, idx: torch.Tensor, return_internals: bool = False):
        t = idx.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        pos = torch.arange(t, device=idx.device)
        h = self.tok_emb(idx) + self.pos_emb(pos)
        scores, preacts = [], []
        for block in self.blocks:
            h, s, p = block(h)
            scores.append(s)
            preacts.append(p)
        logits = self.lm_head(self.ln_f(h))
        return self._finish(logits, scores, preacts, return_internals)


# ---------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (CIFAR): 3x3 stem, no max-pool, stages of 2 blocks.

    ``width`` is the stem width (64 in the standard network; smaller for tests).
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> ResNet18:
    """ResNet-18 adapted to 32x32 images (3x3 conv stem, no max-pool)."""
    return ResNet18(num_classes=num_classes, width=width)


_REGISTRY = {
    "linear": Linear,
    "mlp": MLP,
    "mlp_ln": MLPLayerNorm,
    "cnn": CNN,
    "cnn_bn": CNNBatchNorm,
    "transformer": TinyTransformer,
    "tinylm": TinyLM,
    "resnet18": resnet18_cifar,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build an architecture by name; ``kwargs`` go to its constructor.

    Names: "linear", "mlp", "mlp_ln", "cnn", "cnn_bn", "transformer", "tinylm",
    "resnet18".
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; choose one of {sorted(_REGISTRY)}"
        ) from None
    return factory(**kwargs)
