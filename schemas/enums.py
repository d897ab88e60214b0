"""Closed vocabularies shared by every stage (DESIGN.md sections 2 and 5)."""

from __future__ import annotations

from enum import Enum
from functools import cache


class StrEnum(str, Enum):
    """A string enum whose values are what we store in Arrow columns."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return _values(cls)


@cache
def _values(cls: type[StrEnum]) -> tuple[str, ...]:
    # enums never change: the validator asks for the same tuples for every row
    return tuple(m.value for m in cls)


class Camera(StrEnum):
    """Canonical camera names; each source maps its own names onto these."""

    FRONT = "front"
    FRONT_LEFT = "front_left"
    FRONT_RIGHT = "front_right"
    SIDE_LEFT = "side_left"
    SIDE_RIGHT = "side_right"
    BACK_LEFT = "back_left"
    BACK = "back"
    BACK_RIGHT = "back_right"


class Command(StrEnum):
    """High-level driving command (WOD-E2E intent, NAVSIM driving_command, nuScenes route)."""

    LEFT = "left"
    STRAIGHT = "straight"
    RIGHT = "right"
    UNKNOWN = "unknown"


class Lateral(StrEnum):
    """Lateral meta-action of a trajectory (DESIGN.md section 5)."""

    MOVE_FORWARD = "move forward"
    TURN_LEFT = "turn left"
    TURN_RIGHT = "turn right"
    CHANGE_LANE_LEFT = "change lane to left"
    CHANGE_LANE_RIGHT = "change lane to right"
    NONE = "none"  # stopped: lateral is not used


class Longitudinal(StrEnum):
    """Longitudinal meta-action of a trajectory (DESIGN.md section 5)."""

    STOP = "stop"
    DECEL_TO_ZERO = "deceleration to zero"
    CONSTANT = "constant speed"
    QUICK_ACCEL = "quick acceleration"
    ACCEL = "acceleration"
    QUICK_DECEL = "quick deceleration"
    DECEL = "deceleration"


class ThinkMode(StrEnum):
    FAST = "fast"
    SLOW = "slow"


class Dataset(StrEnum):
    WAYMO_E2E = "waymo_e2e"
    NUSCENES = "nuscenes"
    NUPLAN = "nuplan"
    BENCH2DRIVE = "bench2drive"  # CARLA expert drives (Thinklab-SJTU/Bench2Drive)


class Split(StrEnum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"
