"""Moved to :mod:`deltacodec.layouts.peft_config` (the PEFT layout's config reader); this name
is kept so that existing imports keep working."""

from .layouts.peft_config import *  # noqa: F401,F403
from .layouts.peft_config import __all__  # noqa: F401
