"""Backports for the oldest Python autopart supports (3.10)."""

from __future__ import annotations

import sys
from enum import Enum

__all__ = ["StrEnum"]

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)
