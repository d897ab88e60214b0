"""The shared training prompt: rendering, chat-template parity, model inputs, parsing, clip patches."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from annotators import training_prompt as tp
from training.tiny import build_tiny_tokenizer, make_built_row
from training.vision import ClipProcessor

K = 16


@pytest.fixture(scope="module")
def processor():
    from tokenizer.tokenizer import register_action_tokens

    tok = build_tiny_tokenizer()
    register_action_tokens(tok, K)
    return ClipProcessor(tokenizer=tok, min_pixels=56 * 56, max_pixels=56 * 56)


def test_module_does_not_import_torch():
    code = "import sys, annotators.training_prompt; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_render_messages_layout():
    row = make_built_row(0, K, slow=True, render=False)
    msgs = tp.render_messages(row, K)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    user = msgs[1]["content"]
    assert user.count(tp.VIDEO_PLACEHOLDER) == len(tp.CAMERAS_FOR_MODEL)
    # cameras in the fixed order, each label right before its clip
    pos = [user.index(f"{tp.camera_label(c)}: {tp.VIDEO_PLACEHOLDER}") for c in tp.CAMERAS_FOR_MODEL]
    assert pos == sorted(pos)
    assert "Ego state: Speed" in user and user.endswith(tp.QUESTION)
    target = msgs[2]["content"]
    assert target.startswith("<think>\nScene: ") and "Meta-action: move forward, constant speed\n</think>" in target
    assert target.endswith("</answer>") and target.count("<action_") == 10


def test_fast_target_has_no_think():
    row = make_built_row(1, K, slow=False, render=False)
    text = tp.build_assistant_text(row, K)
    ids = row["action_tokens"]
    assert text == "<answer>" + "".join(f"<action_{i}>" for i in ids) + "</answer>"


def test_chat_text_matches_qwen_template(processor):
    msgs = tp.render_messages(make_built_row(2, K, slow=True, render=False), K)
    tok = processor.tokenizer
    assert tp.render_chat_text(msgs) == tok.apply_chat_template(msgs, tokenize=False)
    assert tp.render_chat_text(msgs[:2], add_generation_prompt=True) == tok.apply_chat_template(
        msgs[:2], tokenize=False, add_generation_prompt=True
    )


def test_model_inputs_labels_and_video_tokens(processor):
    row = make_built_row(3, K, slow=True)
    ex = tp.model_inputs_from_row(row, processor, num_action_tokens=K)
    tok = processor.tokenizer
    n_vid = sum(processor.num_video_tokens(g) for g in ex["video_grid_thw"])
    assert n_vid == 4 * 2 * 4  # 4 cameras x 2 temporal patches x (2x2 merged) at 56x56
    assert int((ex["mm_token_type_ids"] == 2).sum()) == n_vid
    assert ex["pixel_values_videos"].shape == (n_vid * 4, 3 * 2 * 14 * 14)
    labels, ids, p = ex["labels"], ex["input_ids"], ex["prompt_length"]
    assert (labels[:p] == -100).all() and (labels[p:] == ids[p:]).all()
    assert tok.decode(ids[p:]) == tp.build_assistant_text(row, K) + tp.IM_END
    assert tok.decode(ids[:p]).endswith("<|im_start|>assistant\n")
    gen = tp.model_inputs_from_row(row, processor, num_action_tokens=K, with_target=False)
    assert "labels" not in gen and (gen["input_ids"] == ids[:p]).all()
    np.testing.assert_allclose(ex["second_per_grid_ts"], 1.0)  # 2 frames per grid at 2 Hz


def test_stored_messages_must_match(processor):
    row = make_built_row(4, K, slow=False)
    row["messages"][1]["content"] = row["messages"][1]["content"].replace("Ego state", "Ego")
    with pytest.raises(tp.PromptError, match="nuscenes/scene-0004/4.*stored messages differ"):
        tp.model_inputs_from_row(row, processor, num_action_tokens=K)
    tp.model_inputs_from_row(row, processor, num_action_tokens=K, check_stored_messages=False)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r["cameras"].pop(1), "camera 'front_left' is missing"),
        (lambda r: r["cameras"][0]["frames"][0]["image"].update(bytes=b""), "frame 0 has no image bytes"),
        (lambda r: r["cameras"][0]["frames"][1]["image"].update(bytes=b"\xff\xd8garbage"), "cannot decode clip"),
        (lambda r: r.update(action_tokens=[1, 2, 3]), "action_tokens has 3 entries"),
        (lambda r: r.update(action_tokens=[K] * 10), "outside"),
        (lambda r: r.update(reasoning_scene=None), "lacks \\['reasoning_scene'\\]"),
    ],
)
def test_malformed_rows_name_the_sample(processor, mutate, match):
    row = make_built_row(5, K, slow=True, render=False)
    mutate(row)
    with pytest.raises(tp.PromptError, match=rf"sample 'nuscenes/scene-0005/5'.*{match}"):
        tp.model_inputs_from_row(row, processor, num_action_tokens=K)


def test_parse_completion_roundtrip_and_errors():
    row = make_built_row(6, K, slow=True, render=False)
    mode, ids, errs = tp.parse_completion(tp.build_assistant_text(row, K) + tp.IM_END, K)
    assert (mode, ids, errs) == ("slow", row["action_tokens"], [])
    fast = tp.build_assistant_text(make_built_row(7, K, render=False), K)
    assert tp.parse_completion(fast, K)[0] == "fast" and not tp.parse_completion(fast, K)[2]
    nine = "<answer>" + "<action_1>" * 9 + "</answer>"
    mode, ids, errs = tp.parse_completion(nine, K)
    assert ids == [1] * 9 and any("found 9" in e for e in errs)  # never padded
    assert any("unknown" in e for e in tp.parse_completion("<answer>" + f"<action_{K}>" * 10 + "</answer>", K)[2])
    assert any("no <answer>" in e for e in tp.parse_completion("<action_1>" * 10, K)[2])
    assert any("other than" in e for e in tp.parse_completion("<answer>go<action_1>" + "<action_1>" * 9 + "</answer>", K)[2])
    assert any("not closed" in e for e in tp.parse_completion("<think>\nScene: x <answer></answer>", K)[2])
    ten = "<answer>" + "<action_1>" * 10 + "</answer>"
    for stray in ("Sure! " + ten, ten + " done", "<think>\nx\n</think>\nso " + ten):
        assert tp.parse_completion(stray, K)[2] == ["text outside the <think> and <answer> blocks"], stray
    assert tp.parse_meta_action("Meta-action: turn left, deceleration\n") == ("turn left", "deceleration")
    assert tp.parse_meta_action("Meta-action: fly, up\n") is None


def test_clip_patches_match_transformers_image_layout(processor):
    """Two identical frames patchify like Qwen's PIL image processor (which repeats a still image in time)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from training.tiny import _jpeg

    jpeg = _jpeg(np.random.default_rng(0), 100, 60)
    patches, grid, spg = processor.process_clip([jpeg, jpeg], fps=2.0)
    ref = Qwen2VLImageProcessorPil(min_pixels=processor.min_pixels, max_pixels=processor.max_pixels)
    out = ref(images=[tp.decode_jpeg(jpeg)], return_tensors="np")
    assert grid.tolist() == out["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(patches, out["pixel_values"], atol=0.05)
    assert spg == 1.0


def test_test_rows_follow_the_sample_schema():
    from schemas.sample import validate_row

    validate_row(make_built_row(8, K, slow=True))
    validate_row(make_built_row(9, K, slow=False))
