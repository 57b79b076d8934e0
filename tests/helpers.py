"""Tiny models and the digits data for the core tests, independent of
``ghoststep_lab`` (the library's core must be testable without it).

The models are built like the experiments' architectures of the same names (same
layers created in the same order, so the same seed gives the same weights): the
tests' numeric thresholds were set on those. Digit classifiers take flat (B, 64)
inputs; ``tinylm`` takes (B, T) token ids and returns (B, T, vocab) logits.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from datetime import timedelta

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ARCHITECTURES = ("linear", "mlp", "mlp_ln", "cnn", "cnn_bn", "transformer")


def load_digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """sklearn digits, features / 16, stratified 80/20 split by ``seed``:
    ``(X_train, y_train, X_test, y_test)``, float32 (N, 64) in [0, 1], int64 (N,)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
    return tuple(torch.from_numpy(p) for p in (X_tr, y_tr, X_te, y_te))


class Flat(nn.Sequential):
    """``nn.Sequential`` on the flattened input: (B, ...) -> (B, features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))


class MLP(nn.Module):
    """64 -> hidden -> 10 with ReLU (dropout after it when ``dropout > 0``)."""

    def __init__(self, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        self.net = Flat(nn.Linear(64, hidden), nn.ReLU(), *drop, nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two 3x3 conv (BatchNorm) ReLU 2x2-max-pool blocks on the 8x8 image, linear head."""

    def __init__(self, channels: int = 16, batch_norm: bool = False):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            bn = [nn.BatchNorm2d(c_out)] if batch_norm else []
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)
            return [conv, *bn, nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(1, channels), *block(channels, 2 * channels))
        self.head = nn.Linear(8 * channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)).flatten(1))


class Block(nn.Module):
    """Pre-LayerNorm transformer block, attention with an explicit softmax (forward AD
    runs on the CPU): x + attn(LN x); x + FFN(LN x), FFN width 4 d."""

    def __init__(self, d: int, heads: int, activation, causal: bool = False):
        super().__init__()
        self.heads, self.causal, self.activation = heads, causal, activation
        self.ln1 = nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff_in, self.ff_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.internals(x)[0]

    def internals(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, scores, pre)``: the block's output, its pre-softmax attention logits
        (B, H, T, T; masked keys at -inf) and its FFN pre-activations (B, T, 4 d)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        if self.causal:
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        x = x + self.out((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, t, d))
        pre = self.ff_in(self.ln2(x))
        return x + self.ff_out(self.activation(pre)), scores, pre


def _through(blocks: nn.Sequential, h: torch.Tensor, return_internals: bool):
    """``h`` through the blocks; with ``return_internals`` also the ``internal_radii``
    dict of every block's attention logits and FFN pre-activations."""
    if not return_internals:
        return blocks(h), None
    internals: dict[str, list[torch.Tensor]] = {"attention_logits": [], "ffn_preacts": []}
    for block in blocks:
        h, scores, pre = block.internals(h)
        internals["attention_logits"].append(scores)
        internals["ffn_preacts"].append(pre)
    return h, internals


class Transformer(nn.Module):
    """Digit classifier: the 8 image rows are 8 tokens; 2 blocks (ReLU FFN), final
    LayerNorm, mean pooling, linear head. ``return_internals=True``: ``(logits,
    internals)`` as ``ghoststep.controller.internal_radii`` reads them."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(0.02 * torch.randn(8, d))
        self.blocks = nn.Sequential(*(Block(d, 4, F.relu) for _ in range(2)))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor, return_internals: bool = False):
        h = self.embed(x.reshape(-1, 8, 8)) + self.pos
        h, internals = _through(self.blocks, h, return_internals)
        logits = self.head(self.ln_f(h).mean(dim=1))
        return (logits, internals) if return_internals else logits


class TinyLM(nn.Module):
    """Causal LM, 2 blocks (GELU FFN), with tied embeddings:
    ``lm_head.weight is tok_emb.weight``. (B, T) ids -> (B, T, vocab_size) logits."""

    def __init__(self, vocab_size: int = 97, max_len: int = 64, d: int = 32):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab_size, d), nn.Embedding(max_len, d)
        self.blocks = nn.Sequential(*(Block(d, 4, F.gelu, causal=True) for _ in range(2)))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, return_internals: bool = False):
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.tok_emb(idx) + self.pos_emb(pos)
        h, internals = _through(self.blocks, h, return_internals)
        logits = self.lm_head(self.ln_f(h))
        return (logits, internals) if return_internals else logits


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

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
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


def resnet18(width: int = 64) -> nn.Module:
    """ResNet-18 for (B, 3, 32, 32) images: 3x3 stem, stages of 2 blocks, 10 classes."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    c_in = width
    for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [BasicBlock(c_in, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))


_MODELS = {
    "linear": lambda: Flat(nn.Linear(64, 10)),
    "mlp": MLP,
    "mlp_ln": lambda: Flat(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 10)),
    "cnn": CNN,
    "cnn_bn": lambda: CNN(batch_norm=True),
    "transformer": Transformer,
    "tinylm": TinyLM,
    "resnet18": resnet18,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """A fresh model by name (weights from the global RNG: seed it first)."""
    return _MODELS[name](**kwargs)


# --------------------------------------------------------------------------- float64 re-measurement
# An independent check of the controller's promise (it shares no code with ghoststep):
# the update actually applied, re-measured with a float64 JVP at the old parameters.


def digit_batches(digits, n: int, size: int = 64, seed: int = 0) -> list[tuple]:
    """``n`` batches of ``size`` rows drawn with replacement from the training split of
    ``digits`` (``load_digits``' (X, y, ...)), from a generator seeded ``seed``."""
    X, y = digits[0], digits[1]
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randint(0, X.shape[0], (size,), generator=g) for _ in range(n)]
    return [(X[idx], y[idx]) for idx in draws]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of the trainable parameters by name (tied weights listed once)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def parameter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of every parameter by name, ``requires_grad`` or not (an
    optimizer keeps moving a frozen parameter; tied weights listed once)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def applied_update(
    old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``new - old`` per parameter, computed in float64 (exact for bf16/fp16/fp32 values)."""
    return {n: new[n].double() - old[n].double() for n in old}


class Exact:
    """A forward call re-measured exactly as made: ``model(*args, **kwargs)`` (inputs for
    :func:`position_spreads` / :func:`realised_r` that are never re-split)."""

    def __init__(self, args: tuple = (), kwargs: dict | None = None):
        self.args, self.kwargs = tuple(args), dict(kwargs or {})


def _to_float64(obj):
    """Floating tensors cast to float64 at any depth (dicts, lists, tuples, named tuples
    such as ``PackedSequence``: their index tensors stay integer)."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_float64(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_float64(v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float64(v) for v in obj)
    return obj


def _default_logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    raise TypeError(f"cannot read logits from {type(out).__name__}; pass logits_fn")


def position_spreads(
    model: nn.Module,
    old_params: dict[str, torch.Tensor],
    inputs,
    applied: dict[str, torch.Tensor],
    *,
    logits_fn=None,
    method: str = "jvp",
    class_dim: int = -1,
    activation: str = "softmax",
) -> torch.Tensor:
    """Flat float64 spread ``max_k t_k - min_k t_k`` of the logit tangent
    ``t = J_z(old; inputs) applied`` at every position (``inputs``: a tensor, a tuple
    of positional arguments, a dict of keyword arguments or an :class:`Exact` call; the
    model in its own train/eval mode; its buffers and the global RNG are left untouched;
    every forward draws from the same RNG state, so use models without active dropout).

    ``method="jvp"``: ``torch.func.jvp``, exact. ``method="central"``: a float64
    central difference at old +- 1e-6 applied, for models with an op that has no
    forward-mode AD (exact for functions quadratic in the parameters, else O(1e-12)).

    How the loss reads the logits: ``class_dim`` (the softmax's axis), ``activation=
    "sigmoid"`` (each element a binary logit: spread |t|); ``logits_fn`` may return a
    tuple / list / dict of heads (their spreads concatenated, head by head); classes
    whose logit is -inf at the old parameters (masked) are left out."""
    logits_fn = logits_fn or _default_logits
    twin = copy.deepcopy(model).double()  # parameters and floating buffers
    twin.train(model.training)
    names = set(old_params)
    for n, p in twin.named_parameters():
        if n not in names:
            p.requires_grad_(False)
    buffers = {n: b.detach() for n, b in twin.named_buffers()}
    primals = {n: old_params[n].detach().double() for n in old_params}
    tangents = {n: applied[n].detach().double().reshape(primals[n].shape) for n in old_params}
    if isinstance(inputs, Exact):
        args, kwargs = _to_float64(inputs.args), _to_float64(inputs.kwargs)
    elif isinstance(inputs, dict):
        args, kwargs = (), _to_float64(inputs)
    elif isinstance(inputs, tuple):
        args, kwargs = _to_float64(inputs), {}
    else:
        args, kwargs = (_to_float64(inputs),), {}

    def logits(params):
        # buffers cloned inside the differentiated function (train-mode BatchNorm
        # updates its running statistics in place)
        state = {**{n: b.clone() for n, b in buffers.items()}, **params}
        out = torch.func.functional_call(twin, state, args, kwargs, tie_weights=True)
        return logits_fn(out)

    def at(t: float) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            return logits({n: primals[n] + t * tangents[n] for n in primals})

    with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.autocast("cpu", enabled=False):
        if method == "jvp":
            value, tangent = torch.func.jvp(logits, (primals,), (tangents,))
        elif method == "central":
            h = 1e-6
            value, tangent = at(0.0), _heads_difference(at(h), at(-h), 2 * h)
        else:
            raise ValueError(f"method must be 'jvp' or 'central', got {method!r}")
    values, slopes = _as_heads(value), _as_heads(tangent)
    return torch.cat(
        [_head_spread(z, t, class_dim, activation) for z, t in zip(values, slopes, strict=True)]
    )


def _as_heads(out) -> list[torch.Tensor]:
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _heads_difference(plus, minus, width: float):
    if isinstance(plus, torch.Tensor):
        return (plus - minus) / width
    return [(a - b) / width for a, b in zip(_as_heads(plus), _as_heads(minus), strict=True)]


def _head_spread(value, tangent, class_dim: int, activation: str) -> torch.Tensor:
    """Flat spread of one head: |t| per element (sigmoid, or one logit per position:
    the two-class softmax [0, z]); else max - min over the classes on ``class_dim``
    whose old logit is not -inf."""
    if activation == "sigmoid" or tangent.ndim == 1:
        return tangent.abs().reshape(-1)
    value, tangent = value.movedim(class_dim, -1), tangent.movedim(class_dim, -1)
    if tangent.shape[-1] == 1:
        return tangent.abs().reshape(-1)
    kept = value != -math.inf
    high = tangent.masked_fill(~kept, -math.inf).amax(-1)
    low = tangent.masked_fill(~kept, math.inf).amin(-1)
    return torch.where(kept.any(-1), high - low, torch.zeros_like(high)).reshape(-1)


def realised_r(
    model: nn.Module,
    old_params: dict[str, torch.Tensor],
    inputs,
    applied: dict[str, torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
    logits_fn=None,
    temperature: float = 1.0,
    method: str = "jvp",
    class_dim: int = -1,
    activation: str = "softmax",
) -> float:
    """The normalized step r = max_x spread(J_z(old; x) applied) / (pi T) of an applied
    update, re-measured in float64; ``mask`` (bool, the positions' shape) drops the
    False positions. ``old_params`` / ``applied`` are dicts by parameter name (see
    :func:`trainable_state`, :func:`applied_update`); ``method``, ``class_dim``,
    ``activation``: see :func:`position_spreads`."""
    spread = position_spreads(
        model,
        old_params,
        inputs,
        applied,
        logits_fn=logits_fn,
        method=method,
        class_dim=class_dim,
        activation=activation,
    )
    if mask is not None:
        spread = spread[torch.as_tensor(mask, dtype=torch.bool).reshape(-1)]
    if spread.numel() == 0:
        return 0.0
    return float(spread.max()) / (math.pi * temperature)


# --------------------------------------------------------------------------- spawned ranks


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, init_file: str, timeout: float = 60.0):
    """A gloo process group for one spawned test rank (file rendezvous, a timeout).

    On success the rank ends with ``os._exit(0)`` right after the group is destroyed:
    the worker's DDP reducer, freed when the worker returns, destroys its gloo process
    group while holding the GIL and joins gloo's worker thread, which may be waiting for
    the GIL to free a finished all-reduce's tensors -- a teardown deadlock of torch
    (seen here 2 times in 8 runs). The rank's results are on disk by then. An error
    destroys the group and propagates (``torch.multiprocessing`` reports it)."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout),
    )  # fmt: skip
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, args, nprocs: int = 2, timeout: float = 120.0) -> None:
    """``torch.multiprocessing`` spawn with a deadline: a hang fails the test (and the
    processes are terminated) instead of blocking the suite."""
    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"the ranks did not finish within {timeout:.0f} s (a hang)")


def shard_or_replicate(model: nn.Module, kind: str) -> nn.Module:
    """What a rank trains: ``kind`` "fsdp": the model sharded by FSDP2 (every linear layer
    but the last its own unit, the last left to the root unit, which FSDP2 does not
    reshard after a forward: its all-gathered copy must not go stale when the controller
    changes the shards); "ddp*": wrapped in DDP; else the model itself (replicas whose
    gradients the loop all-reduces)."""
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]:
            fully_shard(layer)
        fully_shard(model)
        return model
    if kind.startswith("ddp"):
        return nn.parallel.DistributedDataParallel(model)
    return model


def linear_case(seed: int = 0):
    """A float64 ``nn.Linear(4, 5)``, a (6, 4) batch and a direction (dW, db) for it."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 5).double()
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    dw = torch.randn(5, 4, generator=g, dtype=torch.float64)
    db = torch.randn(5, generator=g, dtype=torch.float64)
    return model, x, dw, db
