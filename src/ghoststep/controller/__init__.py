"""``RadiusController``: a ``torch.optim`` wrapper that keeps each update inside the
radius, and its grouped options ``Sampling`` (which samples set the radius),
``Measuring`` (how the spreads are evaluated) and ``Recording`` (what is kept and
written). The parts it sequences (the capture of training forwards, the proposed
update, the policy, the saved state) are private modules. ``internal_radii`` /
``AllRadiiController``: an ``extra_radii`` provider (attention and FFN radii of a
transformer) and the controller limited by it."""

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
