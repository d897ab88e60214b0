"""Columns written by the annotation stage, and the JSON schema the VLM answers in.

One definition used by the VLM annotator, the rules annotator, the cache, the
stage, the filters and the dataset build, so the reasoning columns cannot drift.
"""

from __future__ import annotations

import copy
from typing import Any

import pyarrow as pa

from schemas.enums import Lateral, Longitudinal, StrEnum
from schemas.sample import THINK_MODE_FIELD, schema_with


class AnnotationStatus(StrEnum):
    OK = "ok"  # reasoning written (VLM or rules)
    FAILED = "failed"  # the request failed; ``annotation_error`` says why
    SKIPPED_FAST = "skipped_fast"  # fast-thinking sample, not sent to the VLM


CRITICAL_OBJECT_TYPE = pa.struct(
    [
        ("name", pa.string()),  # short label, e.g. "white sedan", "pedestrian"
        ("location", pa.string()),  # where in the images, e.g. "front camera, centre, 15 m ahead"
        ("behaviour", pa.string()),  # what it does / is expected to do
        ("why", pa.string()),  # why it matters for the ego vehicle
    ]
)

PROVENANCE_TYPE = pa.struct(
    [
        ("annotator", pa.string()),  # "vlm" or "rules"
        ("model", pa.string()),  # served model id (and revision) or "rules-<version>"
        ("server", pa.string()),  # base URL that answered (no credentials)
        ("params_json", pa.string()),  # sampling params, canonical JSON
        ("request_key", pa.string()),  # sha256 of the canonical request (cache key)
        ("image_hashes", pa.list_(pa.string())),  # sha256 of each raw JPEG sent, in prompt order
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("latency_s", pa.float32()),  # of the successful attempt
        ("finish_reason", pa.string()),
        ("attempts", pa.int32()),  # HTTP attempts made, retries included
        ("template_version", pa.string()),
    ]
)

ANNOTATION_FIELDS: list[pa.Field] = [
    pa.field("reasoning_scene", pa.string()),
    pa.field("reasoning_objects", pa.list_(CRITICAL_OBJECT_TYPE)),  # 2-3 critical objects
    pa.field("reasoning_intent", pa.string()),
    pa.field("reasoning_action_lateral", pa.string()),  # Lateral value
    pa.field("reasoning_action_longitudinal", pa.string()),  # Longitudinal value
    THINK_MODE_FIELD,  # ThinkMode value
    pa.field("think_reasons", pa.list_(pa.string())),  # why the selector chose slow/fast
    pa.field("think_score", pa.float32()),  # complexity score behind the decision
    pa.field("annotation_status", pa.string()),  # AnnotationStatus value
    pa.field("annotation_error", pa.string()),  # "<ErrorClass>: <message>" when failed
    pa.field("annotation_provenance", PROVENANCE_TYPE),
]
ANNOTATION_COLUMNS: tuple[str, ...] = tuple(f.name for f in ANNOTATION_FIELDS)
REASONING_COLUMNS: tuple[str, ...] = (
    "reasoning_scene",
    "reasoning_objects",
    "reasoning_intent",
    "reasoning_action_lateral",
    "reasoning_action_longitudinal",
)


def annotation_schema(base: pa.Schema) -> pa.Schema:
    """``base`` (the input stage's schema) plus the annotation columns."""
    return schema_with(*ANNOTATION_FIELDS, base=base)


def empty_annotation() -> dict[str, Any]:
    """All annotation columns set to null (callers fill what applies)."""
    return {name: None for name in ANNOTATION_COLUMNS}


# The answer format. Key order matters: guided decoding emits properties in
# schema order, so the reasoning is generated before the final action.
_ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "scene": {"type": "string", "minLength": 1},
        "critical_objects": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "location": {"type": "string"},
                    "behaviour": {"type": "string"},
                    "why": {"type": "string"},
                },
                "required": ["name", "location", "behaviour", "why"],
                "additionalProperties": False,
            },
        },
        "intent": {"type": "string", "minLength": 1},
        "action": {
            "type": "object",
            "properties": {
                "lateral": {"type": "string", "enum": list(Lateral.values())},
                "longitudinal": {"type": "string", "enum": list(Longitudinal.values())},
            },
            "required": ["lateral", "longitudinal"],
            "additionalProperties": False,
        },
    },
    "required": ["scene", "critical_objects", "intent", "action"],
    "additionalProperties": False,
}


def answer_json_schema() -> dict[str, Any]:
    """The JSON schema of one VLM answer (a fresh copy; callers may not mutate ours)."""
    return copy.deepcopy(_ANSWER_SCHEMA)
