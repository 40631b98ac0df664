"""Moved to :mod:`deltacodec.layouts.patterns`; this name is kept so that existing imports keep
working."""

from .layouts.patterns import *  # noqa: F401,F403
from .layouts.patterns import __all__  # noqa: F401
