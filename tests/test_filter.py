"""Reasoning filters: each reason fires on its own, duplicates are found, the stage keeps reasons."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from annotators.config import ClientConfig
from annotators.filters import (
    CopyFilter,
    DedupConfig,
    Deduplicator,
    FilterConfig,
    RowFilters,
    check_action,
    check_structure,
    normalize_action,
)
from annotators.judge import Judge, JudgeConfig, parse_verdict
from pipelines.core.runner import run_stage
from pipelines.core.shards import read_table, write_table_atomic
from pipelines.stages.filter import FilterStage, FilterStageConfig, filter_stats

FEW_SHOT = [
    "A three-lane motorway under an overcast sky with light traffic. Lane markings are clear and the left lane "
    "ahead is free for a long stretch. slow articulated truck front camera centre part about 30 m ahead"
]


def good_row(i: int = 0, **kw) -> dict:
    row = {
        "sample_id": f"nuscenes/scene-{i // 4}/{i}",
        "dataset": "nuscenes",
        "scene_id": f"scene-{i // 4}",
        "think_mode": "slow",
        "annotation_status": "ok",
        "annotation_error": None,
        "command": "left",
        "velocity": [6.0, 0.0],
        "acceleration": [-1.0, 0.0],
        "history_meta_lateral": "move forward",
        "history_meta_longitudinal": "constant speed",
        "meta_lateral": "turn left",
        "meta_longitudinal": "deceleration",
        "reasoning_scene": f"A suburban junction number {i} with a stop line, parked cars on the right side and "
        f"a bus shelter {i * 7 % 13} metres past the corner.",
        "reasoning_objects": [
            {"name": f"red hatchback {i}", "location": "front camera, centre part", "behaviour": "waiting to turn",
             "why": f"it occupies the junction for about {i % 5 + 2} seconds"},
        ],
        "reasoning_intent": f"The route turns left here, so the ego vehicle slows for the bend and yields to the "
        f"hatchback before turning; case {i} needs {i % 3 + 1} seconds of margin.",
        "reasoning_action_lateral": "turn left",
        "reasoning_action_longitudinal": "slow down",
    }
    row.update(kw)
    return row


def test_synonyms_normalise():
    assert normalize_action("Go straight", "lateral") == "move forward"
    assert normalize_action("keep lane", "lateral") == "move forward"
    assert normalize_action("slow down", "longitudinal") == "deceleration"
    assert normalize_action("brake to a stop", "longitudinal") == "deceleration to zero"
    assert normalize_action("fly", "longitudinal") is None


def test_each_filter_gives_its_reason():
    f = RowFilters(FilterConfig(), few_shot=FEW_SHOT)
    assert f.reasons(good_row()) == []
    assert check_structure(good_row(reasoning_intent="  ")) == (False, "structure: missing or empty intent")
    assert check_structure(good_row(reasoning_objects=[])) [1].endswith("objects")
    ok, why = check_action(good_row(reasoning_action_lateral="go straight"))
    assert not ok and why.startswith("action_mismatch: lateral 'move forward' != ground truth 'turn left'")
    assert check_action(good_row(meta_lateral="none", reasoning_action_lateral="move forward",
                                 meta_longitudinal="stop", reasoning_action_longitudinal="stay stopped")) is True
    keys = lambda row: [r.split(":")[0] for r in f.reasons(row)]  # noqa: E731
    assert keys(good_row(reasoning_scene="Road.", reasoning_intent="Turn.", reasoning_objects=[{"name": "car"}])) == [
        "too_short"
    ]
    assert keys(good_row(reasoning_intent="I'm sorry, as an AI I cannot see the images in this request.")) == [
        "refusal"
    ]
    assert keys(good_row(reasoning_scene=FEW_SHOT[0])) == ["few_shot_copy"]
    long = " ".join(["word"] * 800)
    assert keys(good_row(reasoning_intent=long)) == ["too_long"]
    # several problems at once: all reported
    assert keys(good_row(reasoning_intent="", reasoning_action_longitudinal="acceleration")) == [
        "structure", "action_mismatch", "too_short"
    ]


def test_copy_filter_uses_the_annotators_few_shot_texts():
    from annotators.prompts import few_shot_texts

    texts = few_shot_texts("v1")
    f = RowFilters(FilterConfig())
    copied = good_row(reasoning_scene=texts[0][:300])
    assert any(r.startswith("few_shot_copy") for r in f.reasons(copied))
    assert CopyFilter(texts, 8, 0.2)(good_row()) is True


def test_dedup_exact_and_near_keeps_first_in_id_order():
    base = good_row(1)["reasoning_intent"] + " " + good_row(1)["reasoning_scene"]
    items = [
        ("b/s/2", base.upper() + "!!"),  # exact after normalisation
        ("b/s/1", base),
        ("b/s/3", base.replace("corner", "bend")),  # last word changed: near
        ("b/s/4", good_row(2)["reasoning_intent"] + " something completely different about a roundabout exit"),
    ]
    dups = Deduplicator(DedupConfig()).duplicates(items)
    assert set(dups) == {"b/s/2", "b/s/3"}
    assert dups["b/s/2"].startswith("duplicate: same text as b/s/1")
    assert dups["b/s/3"].startswith("near_duplicate:") and "b/s/1" in dups["b/s/3"]
    assert Deduplicator(DedupConfig()).duplicates(list(reversed(items))) == dups  # order independent


def _write_annotated(dir_, rows_per_shard):
    for k, rows in enumerate(rows_per_shard):
        write_table_atomic(pa.Table.from_pylist(rows), dir_ / "shards" / f"part-{k:05d}.parquet")


def test_filter_stage_keeps_reasons_and_counts(tmp_path):
    rows = [good_row(i) for i in range(12)]
    rows[1] = good_row(1, reasoning_action_lateral="turn right")
    rows[2] = good_row(2, think_mode="fast", annotation_status="skipped_fast")
    rows[9] = good_row(3)  # copy of row 3 in another shard: duplicate
    rows[9]["sample_id"] = "nuscenes/scene-2/9"
    rows[10] = good_row(10, annotation_status="failed", annotation_error="Timeout: gave up",
                        reasoning_scene=None)
    _write_annotated(tmp_path / "ann", [rows[:6], rows[6:]])
    stage = FilterStage(tmp_path / "ann", FilterStageConfig(), few_shot=FEW_SHOT)
    summary = run_stage(stage, tmp_path / "filt", progress=False)
    assert summary.written == 12 and summary.seen == 12
    out = {r["sample_id"]: r for r in read_table(tmp_path / "filt").to_pylist()}
    assert out["nuscenes/scene-0/2"]["filter_passed"] is None
    assert out["nuscenes/scene-0/1"]["filter_reasons"][0].startswith("action_mismatch")
    assert out["nuscenes/scene-2/9"]["filter_reasons"][0].startswith("duplicate: same text as nuscenes/scene-0/3")
    assert out["nuscenes/scene-2/10"]["filter_reasons"] == ["annotation_failed: Timeout: gave up"]
    stats = filter_stats(tmp_path / "filt")
    assert stats == {
        "rows": 12, "fast": 1, "slow": 11, "accepted": 8, "rejected": 3, "acceptance_rate": 8 / 11,
        "rejected_by_reason": {"action_mismatch": 1, "annotation_failed": 1, "duplicate": 1},
        "rejected_by_first_reason": {"action_mismatch": 1, "annotation_failed": 1, "duplicate": 1},
    }
    # a rerun reuses the markers
    again = run_stage(FilterStage(tmp_path / "ann", FilterStageConfig(), few_shot=FEW_SHOT), tmp_path / "filt",
                      progress=False)
    assert all(p.skipped for p in again.partitions)


def _judge_responder(seen):
    def handler(body: dict) -> tuple[int, dict]:
        seen.append(body)
        assert "response_format" in body and body["messages"][0]["role"] == "system"
        text = body["messages"][1]["content"]
        verdict = {"verdict": "fail", "reason": "generic filler"} if "junction number 1 " in text else {
            "verdict": "pass", "reason": "fine"}
        return 200, {"choices": [{"message": {"content": json.dumps(verdict)}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 5}}

    return handler


def test_judge_through_the_annotator_client():
    from annotators.testserver import FakeVLMServer

    seen: list = []
    with FakeVLMServer(responder=_judge_responder(seen)) as srv:
        cfg = JudgeConfig(enabled=True, client=ClientConfig(endpoints=(srv.base_url,), preflight=False))
        out = Judge(cfg).judge([good_row(0), good_row(1)])
    assert out == {"nuscenes/scene-0/0": True, "nuscenes/scene-0/1": (False, "judge: generic filler")}
    assert len(seen) == 2
    with pytest.raises(Exception, match="not JSON"):
        parse_verdict("looks good")


def test_judge_failure_is_a_reason_not_a_pass():
    from annotators.testserver import FakeVLMServer

    with FakeVLMServer(responder=lambda body: (404, {"error": {"message": "no such model"}})) as srv:
        cfg = JudgeConfig(enabled=True, client=ClientConfig(endpoints=(srv.base_url,), preflight=False))
        out = Judge(cfg).judge([good_row(0)])
    assert out == {"nuscenes/scene-0/0": (False, "judge_failed: NotFound")}


def test_judge_against_the_annotators_test_server():
    """Pre-flight, client and retries against annotators.testserver (which answers annotation JSON, not verdicts)."""
    from annotators.testserver import FakeVLMServer, FaultConfig

    with FakeVLMServer(FaultConfig(latency_s=0.0)) as srv:
        client = ClientConfig(endpoints=(srv.base_url,), model=srv.faults.model, max_attempts=2, backoff_base_s=0.01)
        rows = [good_row(0), good_row(1)]
        out = Judge(JudgeConfig(enabled=True, client=client)).judge(rows)
        assert out == {r["sample_id"]: (False, "judge_failed: MalformedAnswer") for r in rows}
        assert len(srv.log) == 4  # one retry per request for an unparseable answer
        kept = Judge(JudgeConfig(enabled=True, on_error="keep", client=client)).judge(rows[:1])
        assert kept == {rows[0]["sample_id"]: True}
