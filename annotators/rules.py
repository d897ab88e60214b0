"""The deterministic ``rules`` annotator: the four reasoning parts from labels and trajectories.

It writes the same columns as the VLM annotator from what the sample already
knows: speed and command, the history and future meta-actions, and the
labelled objects (position, motion, which camera shows them, whether their
constant-velocity path meets the ego future). Used only when asked for
(``--annotator rules``): the pipeline then runs with no VLM, e.g. in the demo.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from annotators.config import PromptConfig
from annotators.grounding import ObjectFact, object_facts
from annotators.parsing import Reasoning
from annotators.prompts import PromptError

RULES_VERSION = "rules-v1"
_VULNERABLE = ("pedestrian", "cyclist", "bicycle", "motorcycle")
_CMD = {
    "left": "turn left at the next opportunity",
    "right": "turn right at the next opportunity",
    "straight": "continue straight",
    "unknown": "follow the road (no route command is given)",
}
_LON_WHY = {
    "stop": "stay stopped",
    "deceleration to zero": "slow down to a stop",
    "constant speed": "hold its current speed",
    "quick acceleration": "accelerate briskly",
    "acceleration": "speed up",
    "quick deceleration": "brake firmly",
    "deceleration": "slow down",
}


def _conflict(f: ObjectFact, future: np.ndarray | None) -> tuple[float, float] | None:
    """(time s, gap m) where the object's constant-velocity path is closest to the ego future, if < 3 m."""
    if future is None or len(future) == 0:
        return None
    t = np.arange(1, len(future) + 1) * 0.5
    gap = np.hypot(f.x + f.vx * t - future[:, 0], f.y + f.vy * t - future[:, 1])
    k = int(np.argmin(gap))
    return (float(t[k]), float(gap[k])) if gap[k] < 3.0 else None


def _relevance(f: ObjectFact, future: np.ndarray | None) -> tuple[int, float]:
    if _conflict(f, future) is not None:
        return (0, f.distance)
    if f.x > 0 and abs(f.y) < 2.0:
        return (1, f.distance)
    if f.category.lower() in _VULNERABLE and f.distance < 20:
        return (2, f.distance)
    return (3, f.distance)


def _why(f: ObjectFact, future: np.ndarray | None) -> str:
    hit = _conflict(f, future)
    if hit is not None:
        return f"its path comes within {hit[1]:.1f} m of the ego vehicle's planned path in about {hit[0]:.1f} s"
    if f.x > 0 and abs(f.y) < 2.0:
        return "it is in the ego lane ahead, so it sets the safe speed and following distance"
    if f.category.lower() in _VULNERABLE:
        return "a vulnerable road user near the ego path can change direction at short notice"
    return "it is close to the ego vehicle and must be kept in view while manoeuvring"


def rules_reasoning(row: Mapping[str, Any], cfg: PromptConfig) -> Reasoning:
    """The four parts for one sample; raises PromptError without a future meta-action."""
    sid = row["sample_id"]
    lat, lon = row.get("meta_lateral"), row.get("meta_longitudinal")
    if not lat or not lon:
        raise PromptError(
            f"sample {sid!r} has no future meta-action; the rules annotator needs one"
        )
    v = np.asarray(row["velocity"], dtype=np.float64)
    speed = float(math.hypot(v[0], v[1]))
    cmd = row.get("command") or "unknown"
    fut_raw = row.get("future")
    future = None if fut_raw is None else np.asarray(fut_raw, dtype=np.float64).reshape(-1, 3)
    facts = object_facts(row, max(cfg.max_objects, 3), cfg.clip_for(row["dataset"]).cameras)

    moving = (
        "stationary" if speed < 0.3 else f"travelling at {speed:.1f} m/s ({speed * 3.6:.0f} km/h)"
    )
    scene = [f"The ego vehicle is {moving}; the route says to {_CMD.get(cmd, cmd)}."]
    if facts:
        counts = Counter(f.category for f in facts)
        listed = ", ".join(f"{n} {c}{'s' if n > 1 else ''}" for c, n in sorted(counts.items()))
        near = facts[0]
        scene.append(
            f"Labelled traffic nearby: {listed}; the nearest is a {near.category} {near.where()}."
        )
    else:
        scene.append(
            "No labelled objects are available, so the lane geometry and the route decide the action."
        )

    ranked = sorted(facts, key=lambda f: (_relevance(f, future), f.track_id))[:3]
    if len(ranked) > 2 and _relevance(ranked[2], future)[0] == 3:
        ranked = ranked[:2]  # a third object only when it matters
    objects = [
        {
            "name": f.category,
            "location": f"{f.image_location()}, {f.where()}",
            "behaviour": f.motion(),
            "why": _why(f, future),
        }
        for f in ranked
    ]
    if not objects:
        objects = [
            {
                "name": "road ahead",
                "location": "front camera, centre part",
                "behaviour": "clear of labelled objects",
                "why": "nothing labelled constrains the ego vehicle, so the route and lane decide",
            }
        ]

    hist_lon, hist_lat = row.get("history_meta_longitudinal"), row.get("history_meta_lateral")
    intent = [f"The route asks the ego vehicle to {_CMD.get(cmd, cmd)}."]
    if hist_lon:
        past = hist_lon if hist_lat in (None, "none") else f"{hist_lat} with {hist_lon}"
        intent.append(f"So far it has been doing: {past}.")
    lon_text = _LON_WHY.get(lon, lon)
    if lat in ("none", None):
        intent.append(f"It should {lon_text} and not move laterally")
    else:
        intent.append(f"It should {lat} and {lon_text}")
    first = ranked[0] if ranked else None
    if first is not None and _relevance(first, future)[0] <= 1:
        intent[-1] += f", keeping clear of the {first.category} {first.where()}."
    else:
        intent[-1] += ", as the road ahead allows."
    return Reasoning(
        scene=" ".join(scene),
        objects=tuple(objects),
        intent=" ".join(intent),
        lateral=str(lat),
        longitudinal=str(lon),
        source="rules",
    )
