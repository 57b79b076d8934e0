"""``RadiusController``: a ``torch.optim`` wrapper that keeps each update inside the
radius, and its grouped options ``Sampling`` (which samples set the radius),
``Measuring`` (how the spreads are evaluated) and ``Recording`` (what is kept and
written). The parts it sequences (the capture of training forwards, the proposed
update, the policy, the saved state) are private modules. ``internal_radii``: the
attention and FFN radii of a transformer along a direction; ``AllRadiiController``: the
controller limited by them, read from its own measuring pass."""

from ._controller import RadiusController
from ._internal_radii import AllRadiiController, internal_radii
from ._options import Measuring, Recording
from ._plan import Sampling

__all__ = [
    "RadiusController",
    "Sampling",
    "Measuring",
    "Recording",
    "AllRadiiController",
    "internal_radii",
]
