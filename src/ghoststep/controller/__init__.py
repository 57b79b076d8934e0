"""``RadiusController``: a ``torch.optim`` wrapper that keeps each update inside the
radius, and its ``Sampling`` options. The parts it sequences (the capture of training
forwards, the proposed update, the meter, the saved state) are private modules."""

from ._controller import RadiusController
from ._sampling import Sampling

__all__ = ["RadiusController", "Sampling"]
