"""CP-SAT as every ILP of autopart runs it: seeded, one worker, and limited in CP-SAT's
deterministic time (its unit is close to a second of a fast core), so a solve that reaches its
limit stops at the same point however slow or loaded the machine is: the same inputs give the
same plan. A wall-clock limit, :data:`WALL_BACKSTOP` times as long, is only a backstop for a very
slow machine."""

from __future__ import annotations

from ortools.sat.python import cp_model

__all__ = ["WALL_BACKSTOP", "limited_solver"]

WALL_BACKSTOP = 4
"""Wall-clock seconds allowed per second of deterministic time, at most."""


def limited_solver(time_limit_s: float, seed: int) -> cp_model.CpSolver:
    """A solver that stops after ``time_limit_s`` deterministic seconds, seeded with ``seed``,
    on one worker (several workers would race: not the same plan every time)."""
    solver = cp_model.CpSolver()
    solver.parameters.max_deterministic_time = time_limit_s
    solver.parameters.max_time_in_seconds = WALL_BACKSTOP * time_limit_s
    solver.parameters.random_seed = seed
    solver.parameters.num_workers = 1
    return solver
