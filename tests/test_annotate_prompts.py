"""Prompt builder: clips, ego text, hint, grounding, rendering, request key and body."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from annotators.config import ClientConfig, PromptConfig
from annotators.ego_text import describe_ego_state
from annotators.prompts import PromptError, build_prompt, few_shot_texts, load_templates
from annotators.request import build_chat_request, request_key
from annotators.synthetic import make_row
from schemas.enums import Camera
from schemas.sample import validate_row


@pytest.fixture(scope="module")
def row():
    r = make_row(1, frames=6, hz=2.0, width=32, height=24)
    validate_row(r)
    return r


def test_default_clip_is_four_cameras_four_frames(row):
    p = build_prompt(row, PromptConfig())
    assert len(p.images) == 16 and len(set(p.image_hashes)) == 16
    assert [lab.split()[0] for lab in p.image_labels[::4]] == [
        "front",
        "front_left",
        "front_right",
        "back",
    ]
    assert [lab.split()[1] for lab in p.image_labels[:4]] == [
        "t-1.5s",
        "t-1.0s",
        "t-0.5s",
        "t+0.0s",
    ]
    text = p.render()
    assert describe_ego_state(row) in text
    assert 'lateral = "turn left"; longitudinal = "constant speed"' in text
    assert "Labelled objects near the ego vehicle" in text and "pedestrian" in text
    assert "<image front t+0.0s 32x24" in text and "base64" not in text


def test_waymo_clip_is_three_frames_at_1hz():
    r = make_row(2, dataset="waymo_e2e", frames=5, hz=2.0, width=32, height=24, with_objects=False,
                 cameras=(Camera.FRONT, Camera.FRONT_LEFT, Camera.FRONT_RIGHT, Camera.SIDE_LEFT))  # fmt: skip
    p = build_prompt(r, PromptConfig())
    assert [lab.split()[1] for lab in p.image_labels if lab.startswith("front ")] == [
        "t-2.0s",
        "t-1.0s",
        "t+0.0s",
    ]
    assert "Cameras not available for this sample: back" in p.render()
    assert "No object labels are available" in p.render()


def test_prompt_errors_name_the_sample(row):
    with pytest.raises(PromptError, match="meta_lateral"):
        build_prompt(dict(row, meta_lateral=None), PromptConfig())
    with pytest.raises(PromptError, match="none of the prompt cameras"):
        build_prompt(dict(row, cameras=[dict(row["cameras"][0], name="side_left")]), PromptConfig())
    with pytest.raises(PromptError, match="not found"):
        build_prompt(row, PromptConfig(template_version="v999"))


def test_request_key_and_body(row):
    cfg = ClientConfig(model="m")
    p = build_prompt(row, PromptConfig())
    key = request_key(p, cfg)
    assert key == request_key(build_prompt(row, PromptConfig()), cfg)  # stable
    assert key != request_key(p, dataclasses.replace(cfg, temperature=0.7))
    assert key != request_key(p, dataclasses.replace(cfg, model_revision="abc"))
    p2 = build_prompt(row, PromptConfig())
    p2.image_hashes[3] = hashlib.sha256(b"other jpeg").hexdigest()
    assert request_key(p2, cfg) != key
    req = build_chat_request(p, cfg)
    body = json.loads(req.body(2048))
    assert body["max_tokens"] == 2048 and body["model"] == "m" and "guided_json" not in body
    rf = body["response_format"]  # the default: honoured by current vLLM and SGLang
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["required"] == ["scene", "critical_objects", "intent", "action"]
    urls = [
        c["image_url"]["url"] for c in body["messages"][1]["content"] if c["type"] == "image_url"
    ]
    assert len(urls) == 16 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    both = json.loads(build_chat_request(p, dataclasses.replace(cfg, guided="both")).body())
    assert both["response_format"]["type"] == "json_schema" and "guided_json" in both


def test_few_shot_examples_agree_with_their_hints():
    t = load_templates("v1")
    assert len(t.few_shot) >= 2 and "Example 1." in t.system
    assert all(len(x) > 100 for x in few_shot_texts("v1"))
    assert (
        "turn left" in t.system and "quick deceleration" in t.system
    )  # the vocabularies are listed
