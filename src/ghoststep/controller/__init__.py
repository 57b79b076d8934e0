"""``RadiusController``: a ``torch.optim`` wrapper that keeps each update inside the
radius, and its ``Sampling`` options. The parts it sequences (the capture of training
forwards, the proposed update, the meter, the saved state) are private modules.
``internal_radii`` / ``AllRadiiController``: an ``extra_radii`` provider (attention and
FFN radii of a transformer) and the controller limited by it."""

from ._controller import RadiusController
from ._internal_radii import AllRadiiController, internal_radii
from ._sampling import Sampling

__all__ = ["RadiusController", "Sampling", "AllRadiiController", "internal_radii"]
