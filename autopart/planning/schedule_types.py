"""The vocabulary of pipeline schedules: actions (``1F0``, ``1I0``, ``1W0``, ``1B0``), the schedule
kinds torch runs, and which rank holds which stage. :mod:`autopart.planning.schedule` builds and
simulates schedules from these."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from autopart._compat import StrEnum
from autopart.errors import AutopartError

__all__ = [
    "SPLIT_BACKWARD",
    "V_SHAPED",
    "Action",
    "ActionKind",
    "Schedule",
    "ScheduleError",
    "ScheduleKind",
    "format_schedule",
    "parse_schedule",
    "stage_ranks",
]


class ScheduleError(AutopartError):
    """A pipeline schedule cannot be built, parsed, simulated or fitted in memory."""


class ActionKind(StrEnum):
    """What one action computes (torch's ``_ComputationType`` letters)."""

    FORWARD = "F"
    BACKWARD = "B"
    """The whole backward: input and weight gradients."""
    BACKWARD_INPUT = "I"
    """The input gradients only (zero-bubble schedules); its ``W`` follows later."""
    BACKWARD_WEIGHT = "W"
    """The weight gradients of a micro-batch whose ``I`` ran before."""


class ScheduleKind(StrEnum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"
    INTERLEAVED_ZB = "interleaved-zb"
    """torch's ``ScheduleInterleavedZeroBubble`` (ZB1P of Qi et al. 2024, looped stages)."""
    ZBV = "zbv"
    """torch's ``ScheduleZBVZeroBubble``: two stages per rank in a V (Qi et al. 2024, section 6)."""
    DUALPIPEV = "dualpipev"
    """torch's ``ScheduleDualPipeV`` (DeepSeek-V3's DualPipe, folded into a V)."""


V_SHAPED = (ScheduleKind.ZBV, ScheduleKind.DUALPIPEV)
"""Kinds that place stage ``s`` and stage ``2p - 1 - s`` on rank ``s`` (first and last on rank 0)."""

SPLIT_BACKWARD = (ScheduleKind.INTERLEAVED_ZB, ScheduleKind.ZBV, ScheduleKind.DUALPIPEV)
"""Kinds that run some backwards as ``I`` then ``W``."""

_ACTION = re.compile(r"(\d+)([FBIW])(\d+)")


@dataclass(frozen=True, slots=True)
class Action:
    """One compute step: ``Action(1, ActionKind.FORWARD, 0)`` prints and parses as ``"1F0"``."""

    stage: int
    kind: ActionKind
    micro_batch: int

    def __post_init__(self) -> None:
        if self.stage < 0 or self.micro_batch < 0:
            raise ScheduleError(f"{self!r}: stage and micro_batch must be >= 0 (they are indices)")
        if type(self.kind) is not ActionKind:  # a letter or string: the enum member
            object.__setattr__(self, "kind", ActionKind(self.kind))

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.micro_batch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        match = _ACTION.fullmatch(text.strip())
        if match is None:
            raise ScheduleError(
                f"cannot read {text!r} as a pipeline action: write STAGE, F (forward), B "
                "(backward), I (input gradients) or W (weight gradients), MICRO_BATCH, e.g. "
                "'1F0' for stage 1's forward of micro-batch 0"
            )
        return cls(int(match.group(1)), ActionKind(match.group(2)), int(match.group(3)))


Schedule = tuple[tuple[Action, ...], ...]
"""One ordered tuple of actions per device (rank)."""


def format_schedule(schedule: Schedule) -> list[list[str]]:
    return [[str(action) for action in actions] for actions in schedule]


def parse_schedule(rows: Sequence[Sequence[str]]) -> Schedule:
    return tuple(tuple(Action.parse(text) for text in row) for row in rows)


def stage_ranks(
    kind: ScheduleKind | str, num_devices: int, stages_per_device: int = 1
) -> tuple[int, ...]:
    """The rank of every stage: looped (stage ``s`` on rank ``s % p``), or for the V-shaped kinds
    down and back up (torch's ``generate_stage_to_rank_mapping(style="v")``): stage ``s`` and
    stage ``2p - 1 - s`` on rank ``s``, so the first and the last stage share rank 0 and the two
    middle stages rank ``p - 1``."""
    p, v = num_devices, stages_per_device
    if ScheduleKind(kind) not in V_SHAPED:
        return tuple(s % p for s in range(p * v))
    ranks = []
    for s in range(p * v):
        lap, offset = divmod(s, p)
        ranks.append(offset if lap % 2 == 0 else p - 1 - offset)
    return tuple(ranks)
