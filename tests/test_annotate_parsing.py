"""Answer parsing: the JSON schema first, markdown sections as the fallback."""

from __future__ import annotations

import json

import pytest

from annotators.parsing import ParseError, normalize_lateral, normalize_longitudinal, parse_answer
from annotators.schema import answer_json_schema
from annotators.testserver import make_answer
from schemas.enums import Lateral, Longitudinal


def test_json_answer():
    r = parse_answer(make_answer("k" * 64, "turn left", "deceleration"))
    assert r.source == "json" and (r.lateral, r.longitudinal) == ("turn left", "deceleration")
    assert len(r.objects) == 2 and all(
        set(o) == {"name", "location", "behaviour", "why"} for o in r.objects
    )
    cols = r.columns()
    assert cols["reasoning_action_lateral"] == "turn left" and cols["reasoning_scene"]


def test_fenced_json_with_prose_around_it():
    body = make_answer("k" * 64, "move forward", "stop")
    r = parse_answer(f"Here is my analysis.\n```json\n{body}\n```\nDone.")
    assert r.source == "json" and r.longitudinal == "stop"


def test_markdown_fallback():
    r = parse_answer(make_answer("k" * 64, "change lane to right", "acceleration", fmt="markdown"))
    assert r.source == "markdown"
    assert (r.lateral, r.longitudinal) == ("change lane to right", "acceleration")
    assert r.objects[0]["name"] == "grey car" and r.objects[0]["location"].startswith(
        "front camera"
    )
    assert r.objects[1]["why"] == "it may step onto the road"


def test_markdown_with_bold_headings_and_synonyms():
    text = """**Scene description:**
A wet two-lane road at night.

**Critical objects:**
1. Cyclist (front camera, right part): riding along the kerb; may swerve.
2. Bus - location: front left camera; behaviour: pulling out; why: blocks the lane

**Reasoning:**
The ego vehicle should pass the cyclist with care.

**Final action:**
- Lateral: go straight
- Longitudinal: slow down
"""
    r = parse_answer(text)
    assert (r.lateral, r.longitudinal) == ("move forward", "deceleration")
    assert (
        r.objects[0]["name"] == "Cyclist" and r.objects[0]["location"] == "front camera, right part"
    )
    assert r.objects[1]["behaviour"] == "pulling out" and r.objects[1]["why"] == "blocks the lane"


@pytest.mark.parametrize(
    "text",
    [
        "",
        '{"scene": "x", "critical_objects": [',  # truncated JSON
        json.dumps(
            {
                "scene": "x",
                "critical_objects": [],
                "intent": "y",
                "action": {"lateral": "turn left", "longitudinal": "stop"},
            }
        ),
        json.dumps(
            {
                "scene": "x",
                "critical_objects": [{"name": "a"}],
                "intent": "y",
                "action": {"lateral": "fly", "longitudinal": "stop"},
            }
        ),
        "## Scene\nA road.\n## Intent\nGo.",  # sections missing
        # critical objects with empty parts: what an unconstrained server answers (issue 13)
        "## Scene\nA road.\n## Critical objects\n- grey car\n- pedestrian\n## Intent\nGo on.\n"
        "## Action\nLateral: move forward\nLongitudinal: constant speed",
        "## Scene\nA road.\n## Critical objects\n- Bus - behaviour: pulling out; why: blocks the lane\n"
        "## Intent\nGo on.\n## Action\nLateral: move forward\nLongitudinal: constant speed",
        json.dumps(
            {
                "scene": "x",
                "critical_objects": [{"name": "a", "location": "", "behaviour": "", "why": ""}],
                "intent": "y",
                "action": {"lateral": "turn left", "longitudinal": "stop"},
            }
        ),
        "I cannot help with that.",
    ],
)
def test_rejected_answers(text):
    with pytest.raises(ParseError):
        parse_answer(text)


def test_vocabularies_roundtrip_and_schema_enums():
    for v in Lateral.values():
        assert normalize_lateral(v) == v
    for v in Longitudinal.values():
        assert normalize_longitudinal(v) == v
    props = answer_json_schema()["properties"]
    assert list(props) == [
        "scene",
        "critical_objects",
        "intent",
        "action",
    ]  # reasoning before the action
    assert props["action"]["properties"]["lateral"]["enum"] == list(Lateral.values())
