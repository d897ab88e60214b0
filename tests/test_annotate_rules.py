"""The deterministic rules annotator."""

from __future__ import annotations

import pyarrow as pa

from annotators.config import PromptConfig
from annotators.rules import rules_reasoning
from annotators.schema import ANNOTATION_FIELDS
from annotators.synthetic import make_rows


def test_rules_are_deterministic_and_agree_with_the_labels():
    rows = make_rows(8, width=16, height=12)
    for row in rows:
        a = rules_reasoning(row, PromptConfig())
        b = rules_reasoning(dict(row), PromptConfig())
        assert a == b
        assert (a.lateral, a.longitudinal) == (row["meta_lateral"], row["meta_longitudinal"])
        assert a.scene and a.intent and 1 <= len(a.objects) <= 3
        assert all(o["name"] and o["location"] and o["behaviour"] and o["why"] for o in a.objects)


def test_rules_output_fits_the_schema_and_handles_no_objects():
    rows = make_rows(4, width=16, height=12, with_objects=False)
    cols = [rules_reasoning(r, PromptConfig()).columns() for r in rows]
    schema = pa.schema([f for f in ANNOTATION_FIELDS if f.name in cols[0]])
    table = pa.Table.from_pylist(cols, schema=schema)
    assert table.num_rows == 4
    assert cols[0]["reasoning_objects"][0]["name"] == "road ahead"


def test_rules_mentions_the_conflicting_object():
    row = make_rows(2, width=16, height=12)[1]  # a left turn with a crossing pedestrian
    r = rules_reasoning(row, PromptConfig())
    assert "pedestrian" in [o["name"] for o in r.objects]
