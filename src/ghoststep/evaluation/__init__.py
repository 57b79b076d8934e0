"""Evaluating a model along a direction: outputs and directional derivatives.

``directional`` evaluates every method (``"jvp"`` / ``"fd"`` / ``"fast"``; its
docstring states what exactly is differentiated and the side-effect guarantees);
``call_at`` / ``forward`` evaluate the outputs at given parameters. Directions in
parameter space (``resolve_direction``, ``gradient_direction``, ``random_direction``,
``optimizer_update_direction``), which output is the logits (``logits_reader``), and the
RNG / buffer isolation (``capture_rng``) live here too.
"""

from ._directional import (
    FAST_MOVE,
    SLOPE_METHODS,
    call_at,
    directional,
    fast_step,
    forward,
    full_float32,
    refined_step,
    tf32_allowed,
)
from ._directions import (
    direction_norm,
    gradient_direction,
    random_direction,
    resolve_direction,
    trainable_parameters,
)
from ._outputs import (
    LayoutError,
    LogitsReader,
    class_logits,
    default_logits_fn,
    describe_output,
    logits_reader,
)
from ._replay import Call, capture_rng
from ._updates import optimizer_update_direction

__all__ = [
    "Call",
    "SLOPE_METHODS",
    "full_float32",
    "tf32_allowed",
    "fast_step",
    "refined_step",
    "FAST_MOVE",
    "forward",
    "call_at",
    "directional",
    "trainable_parameters",
    "resolve_direction",
    "direction_norm",
    "gradient_direction",
    "random_direction",
    "optimizer_update_direction",
    "default_logits_fn",
    "describe_output",
    "class_logits",
    "logits_reader",
    "LogitsReader",
    "LayoutError",
    "capture_rng",
]
