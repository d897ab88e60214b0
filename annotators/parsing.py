"""Parse a VLM answer: the JSON schema first, markdown sections as the fallback.

Servers with guided decoding return the JSON object of
:func:`annotators.schema.answer_json_schema`; others may wrap it in a code
fence or answer in markdown sections (``## Scene``, ``## Critical objects``,
``## Intent``, ``## Action`` with ``Lateral: ...`` / ``Longitudinal: ...``).
Both give the same :class:`Reasoning`; anything else raises
:class:`ParseError` naming what is missing, including an answer whose
critical objects lack a location, behaviour or reason (the typical answer of
a server that ignored the schema request).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from schemas.enums import Lateral, Longitudinal

OBJECT_KEYS = ("name", "location", "behaviour", "why")


class ParseError(ValueError):
    """The answer has neither a valid JSON object nor the four markdown sections."""


@dataclass(frozen=True, slots=True)
class Reasoning:
    scene: str
    objects: tuple[dict[str, str], ...]  # each with OBJECT_KEYS
    intent: str
    lateral: str  # Lateral value
    longitudinal: str  # Longitudinal value
    source: str  # "json" or "markdown"

    def columns(self) -> dict[str, Any]:
        """As the ``reasoning_*`` columns of :mod:`annotators.schema`."""
        return {
            "reasoning_scene": self.scene,
            "reasoning_objects": [dict(o) for o in self.objects],
            "reasoning_intent": self.intent,
            "reasoning_action_lateral": self.lateral,
            "reasoning_action_longitudinal": self.longitudinal,
        }


_LAT_SYNONYMS = {
    "move forward": Lateral.MOVE_FORWARD, "go straight": Lateral.MOVE_FORWARD, "straight": Lateral.MOVE_FORWARD,
    "keep lane": Lateral.MOVE_FORWARD, "lane keeping": Lateral.MOVE_FORWARD, "forward": Lateral.MOVE_FORWARD,
    "left turn": Lateral.TURN_LEFT, "turn left": Lateral.TURN_LEFT,
    "right turn": Lateral.TURN_RIGHT, "turn right": Lateral.TURN_RIGHT,
    "change lane to left": Lateral.CHANGE_LANE_LEFT, "change lane left": Lateral.CHANGE_LANE_LEFT,
    "lane change left": Lateral.CHANGE_LANE_LEFT, "left lane change": Lateral.CHANGE_LANE_LEFT,
    "change lane to right": Lateral.CHANGE_LANE_RIGHT, "change lane right": Lateral.CHANGE_LANE_RIGHT,
    "lane change right": Lateral.CHANGE_LANE_RIGHT, "right lane change": Lateral.CHANGE_LANE_RIGHT,
    "none": Lateral.NONE, "n/a": Lateral.NONE, "no lateral motion": Lateral.NONE,
}  # fmt: skip
_LON_SYNONYMS = {
    "stop": Longitudinal.STOP, "stopped": Longitudinal.STOP, "stay stopped": Longitudinal.STOP,
    "remain stopped": Longitudinal.STOP,
    "deceleration to zero": Longitudinal.DECEL_TO_ZERO, "decelerate to zero": Longitudinal.DECEL_TO_ZERO,
    "decelerate to a stop": Longitudinal.DECEL_TO_ZERO, "come to a stop": Longitudinal.DECEL_TO_ZERO,
    "constant speed": Longitudinal.CONSTANT, "keep speed": Longitudinal.CONSTANT,
    "maintain speed": Longitudinal.CONSTANT, "keep constant speed": Longitudinal.CONSTANT,
    "quick acceleration": Longitudinal.QUICK_ACCEL, "accelerate quickly": Longitudinal.QUICK_ACCEL,
    "acceleration": Longitudinal.ACCEL, "accelerate": Longitudinal.ACCEL, "speed up": Longitudinal.ACCEL,
    "quick deceleration": Longitudinal.QUICK_DECEL, "brake hard": Longitudinal.QUICK_DECEL,
    "hard braking": Longitudinal.QUICK_DECEL,
    "deceleration": Longitudinal.DECEL, "decelerate": Longitudinal.DECEL, "slow down": Longitudinal.DECEL,
}  # fmt: skip


def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z/ ]+", " ", s.lower())).strip()


def normalize_lateral(value: str) -> str:
    """Map a lateral phrase (vocabulary value or common synonym) to a :class:`Lateral` value."""
    got = _LAT_SYNONYMS.get(_norm_text(value))
    if got is None:
        raise ParseError(f"lateral action {value!r} is not one of {list(Lateral.values())}")
    return got.value


def normalize_longitudinal(value: str) -> str:
    """Map a longitudinal phrase to a :class:`Longitudinal` value."""
    got = _LON_SYNONYMS.get(_norm_text(value))
    if got is None:
        raise ParseError(
            f"longitudinal action {value!r} is not one of {list(Longitudinal.values())}"
        )
    return got.value


def parse_answer(text: str) -> Reasoning:
    """Parse one answer (JSON, fenced JSON, or markdown sections)."""
    if not text or not text.strip():
        raise ParseError("empty answer")
    obj = _find_json(text)
    if obj is not None:
        return _from_json(obj)
    if text.lstrip().startswith(
        "{"
    ):  # JSON that does not parse (truncated): no markdown to fall back to
        raise ParseError(f"answer is malformed JSON: {text[:80]!r}...")
    return _from_markdown(text)


def _find_json(text: str) -> dict[str, Any] | None:
    s = text.strip()
    fence = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", s, re.S)
    candidates = [s] + ([fence.group(1)] if fence else [])
    if "{" in s and "}" in s:
        candidates.append(s[s.index("{") : s.rindex("}") + 1])
    for c in candidates:
        try:
            obj = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _text(obj: dict[str, Any], key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ParseError(f"JSON answer: {key!r} is missing or not a non-empty string")
    return v.strip()


def _from_json(obj: dict[str, Any]) -> Reasoning:
    objs = obj.get("critical_objects")
    if not isinstance(objs, list) or not objs:
        raise ParseError("JSON answer: 'critical_objects' is missing or not a non-empty list")
    parsed = []
    for i, o in enumerate(objs):
        if isinstance(o, str):
            o = {"name": o}
        if not isinstance(o, dict):
            raise ParseError(f"JSON answer: critical_objects[{i}] is not an object")
        parsed.append({k: str(o.get(k) or "").strip() for k in OBJECT_KEYS})
    _require_object_parts(parsed, "JSON")
    action = obj.get("action")
    if not isinstance(action, dict):
        raise ParseError("JSON answer: 'action' is missing or not an object")
    return Reasoning(
        scene=_text(obj, "scene"),
        objects=tuple(parsed),
        intent=_text(obj, "intent"),
        lateral=normalize_lateral(str(action.get("lateral") or "")),
        longitudinal=normalize_longitudinal(str(action.get("longitudinal") or "")),
        source="json",
    )


_HEADINGS = {
    "scene": ("scene description", "scene"),
    "objects": ("critical objects", "key objects", "objects"),
    "intent": ("reasoning about ego intent", "ego intent", "intent", "reasoning"),
    "action": ("best driving action", "final action", "driving action", "action"),
}
_HEADING_RE = re.compile(
    r"^\s*(?:#{1,6}\s*|\*\*)?\s*(?:\d+[.)]\s*)?([A-Za-z][A-Za-z ]*?)\s*(?:\*\*)?\s*:?\s*(?:\*\*)?\s*$"
)


def _section_of(line: str) -> str | None:
    m = _HEADING_RE.match(line)
    if not m:
        return None
    title = m.group(1).strip().lower()
    for name, titles in _HEADINGS.items():
        if title in titles:
            return name
    return None


def _require_object_parts(objects: list[dict[str, str]], form: str) -> None:
    """Every critical object needs all four parts: an answer with empty ones is not usable.

    An unconstrained server (one that ignored the schema request) tends to answer with
    object names only; such a row must not pass as ``ok``.
    """
    for i, o in enumerate(objects):
        empty = [k for k in OBJECT_KEYS if not o.get(k)]
        if empty:
            raise ParseError(
                f"{form} answer: critical object {i} ({o.get('name') or 'unnamed'!r}) has empty {empty}"
            )


def _from_markdown(text: str) -> Reasoning:
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        name = _section_of(line)
        if name is not None:
            current = name
            sections.setdefault(name, [])
        elif current is not None:
            sections[current].append(line)
    missing = [k for k in _HEADINGS if not "".join(sections.get(k, [])).strip()]
    if missing:
        raise ParseError(
            f"answer is neither JSON nor markdown with all sections; missing: {missing}"
        )
    objects = _md_objects(sections["objects"])
    _require_object_parts(objects, "markdown")
    return Reasoning(
        scene=_join(sections["scene"]),
        objects=tuple(objects),
        intent=_join(sections["intent"]),
        lateral=normalize_lateral(_md_field(sections["action"], "lateral")),
        longitudinal=normalize_longitudinal(_md_field(sections["action"], "longitudinal")),
        source="markdown",
    )


def _join(lines: list[str]) -> str:
    return " ".join(x.strip() for x in lines if x.strip())


def _md_objects(lines: list[str]) -> list[dict[str, str]]:
    items: list[str] = []
    for line in lines:
        m = re.match(r"^\s*(?:[-*+]|\d+[.)])\s+(.*)$", line)
        if m:
            items.append(m.group(1).strip())
        elif line.strip() and items:
            items[-1] += " " + line.strip()
    if not items:
        raise ParseError("markdown answer: the critical objects section has no list items")
    out = []
    for it in items:
        it = it.replace("**", "")
        fields = dict.fromkeys(OBJECT_KEYS, "")
        labelled = re.split(r"\b(location|behaviou?r|why)\s*:\s*", it, flags=re.I)
        fields["name"] = labelled[0].strip(" ;,.:-(")
        for label, value in zip(labelled[1::2], labelled[2::2], strict=False):
            key = "behaviour" if label.lower().startswith("behav") else label.lower()
            value = value.strip(" ;,")
            if value.endswith(")") and "(" not in value:  # "name (location: ...)" form
                value = value[:-1].rstrip(" ;,")
            fields[key] = value
        if not fields["location"]:
            paren = re.match(r"^(.*?)\s*\(([^)]*)\)\s*(.*)$", fields["name"])
            if paren:
                fields["name"], fields["location"] = paren.group(1), paren.group(2)
                fields["behaviour"] = fields["behaviour"] or paren.group(3).strip(" :-")
        if not fields["why"] and ";" in fields["behaviour"]:  # "name (where): does X; matters as Y"
            behaviour, why = fields["behaviour"].split(";", 1)
            fields["behaviour"], fields["why"] = behaviour.strip(), why.strip(" .")
        out.append(fields)
    return out


def _md_field(lines: list[str], name: str) -> str:
    text = "\n".join(lines).replace("**", "")
    m = re.search(rf"{name}\s*[:=]\s*\"?([A-Za-z /]+)\"?", text, re.I)
    if not m:
        raise ParseError(
            f"markdown answer: the action section has no '{name.capitalize()}: ...' line"
        )
    return m.group(1).strip()
