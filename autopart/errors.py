"""One error contract: every mistake a user can make raises a subclass of ``AutopartError`` (itself a
``ValueError``) whose message names the cause and the fix."""

from __future__ import annotations

__all__ = [
    "AutopartError",
    "ModelSpecError",
    "ShardError",
    "TraceError",
    "UnknownDeviceError",
]


class AutopartError(ValueError):
    """Base class of autopart's user-facing errors.

    ``reason`` is the cause in a few words, without the fix (what a table of alternatives, such as
    the mesh search's, shows beside a mesh that failed); the whole message when not given."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message


class TraceError(AutopartError):
    """The model could not be captured as a graph."""


class ModelSpecError(AutopartError):
    """A MODEL string (zoo name, ``hf:...``, ``file.py:factory``) could not be resolved."""


class ShardError(AutopartError):
    """A TP plan does not fit the stage it is applied to (made for another graph: plan it again)."""


class UnknownDeviceError(AutopartError):
    """A device name is not in the device table."""
