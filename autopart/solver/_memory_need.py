"""What a memory-minimising solve proved, worded for an error message.

Both ILPs answer an infeasible memory limit with a second solve that minimises the peak memory per
device. CP-SAT may stop at its time limit: then its objective is a plan that exists (an upper bound
on the minimum) and its best bound a proven lower bound, and the two can differ. This keeps both, so
an error says "at least" only of what is proven and tells the user a limit that a plan meets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ortools.sat.python import cp_model

__all__ = ["MemoryNeed", "memory_need"]


@dataclass(frozen=True, slots=True)
class MemoryNeed:
    """The least peak memory per device that any plan needs, as far as the solve proved it."""

    least_bytes: int
    """Proven: every plan needs at least this much."""
    fits_bytes: int | None
    """A plan with this peak exists (the leanest found); ``None`` when the solve found none."""
    time_limit_s: float

    @property
    def exact(self) -> bool:
        return self.fits_bytes is not None and self.fits_bytes <= self.least_bytes

    def needs(self, fmt: Callable[[int], str]) -> str:
        """``"needs at least X per device"`` with, when not proven optimal, what is known."""
        if self.exact:
            return f"needs at least {fmt(self.least_bytes)} per device"
        if self.fits_bytes is not None:
            return (
                f"needs at least {fmt(self.least_bytes)} per device (the leanest plan found within "
                f"the {self.time_limit_s:g} s time limit holds {fmt(self.fits_bytes)})"
            )
        return (
            f"needs at least {fmt(self.least_bytes)} per device (the memory search found no plan "
            f"within the {self.time_limit_s:g} s time limit to say how much more)"
        )

    def raise_to(self, fmt: Callable[[int], str]) -> str:
        """The advice on --memory: a limit some plan meets, where one is known."""
        if self.fits_bytes is not None:
            return f"Raise --memory to {fmt(max(self.fits_bytes, self.least_bytes))} or more"
        return f"Raise --memory above {fmt(self.least_bytes)} (or the time limit)"


def memory_need(
    status: Any,
    solver: cp_model.CpSolver,
    *,
    unit_bytes: int,
    floor_units: int,
    fallback_units: int | None,
    time_limit_s: float,
) -> MemoryNeed:
    """Read a memory-minimising solve. ``floor_units`` is known to be needed anyway (one unit above
    the limit that was proven infeasible); ``fallback_units`` is the peak of a plan known without
    the solver (its hint), used when the solver found nothing better."""
    assert status not in (cp_model.INFEASIBLE, cp_model.MODEL_INVALID), "callers check these"
    least = floor_units
    fits = fallback_units
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        found = round(solver.objective_value)
        fits = found if fits is None else min(fits, found)
        if status == cp_model.OPTIMAL:
            least = max(least, found)
    if status != cp_model.OPTIMAL and math.isfinite(solver.best_objective_bound):
        least = max(least, math.ceil(solver.best_objective_bound - 1e-6))
    if fits is not None:
        least = min(least, fits)  # a found plan caps the minimum (guards rounding of the bound)
    return MemoryNeed(
        least_bytes=least * unit_bytes,
        fits_bytes=None if fits is None else fits * unit_bytes,
        time_limit_s=time_limit_s,
    )
