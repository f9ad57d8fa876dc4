"""Former name of :mod:`harness`, kept so that scripts written against it still run; use harness."""

try:
    from .harness import *  # noqa: F401,F403
except ImportError:  # run as a script next to harness.py
    from harness import *  # noqa: F401,F403
