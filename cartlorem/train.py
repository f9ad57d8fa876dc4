"""``from cartlorem.train import train``: the training API, kept at this address for existing code.

The implementation lives in :mod:`cartlorem.training` (loop, loss, averaging, run folder, logs).
"""

from .training import *  # noqa: F401,F403
from .training import __all__  # noqa: F401
