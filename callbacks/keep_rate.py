"""The keep-rate cosine schedule callback. It lives with the methods (`lightning_modules/schedule.py`), which
add it themselves through `configure_callbacks`; this name is kept for imports from `callbacks`."""
from __future__ import annotations

from lightning_modules.schedule import KeepRateSchedule, reduction_strength

__all__ = ["KeepRateSchedule", "reduction_strength"]
