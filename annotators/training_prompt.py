"""The one training prompt: built dataset row <-> chat messages <-> model inputs.

Imported by the build stage (to render the stored ``messages`` column), SFT,
RFT (GRPO) and evaluation, so every stage sees the same text for the same
sample. Changing any wording here changes :data:`PROMPT_VERSION`.

Conversation layout (Qwen2.5-VL chat format; :func:`render_chat_text` writes
exactly what Qwen's chat template writes for string contents)::

    <|im_start|>system\\n{SYSTEM_PROMPT}<|im_end|>\\n
    <|im_start|>user\\n
    Front camera: <|vision_start|><|video_pad|><|vision_end|>\\n   (one line per camera,
    ...                                                            order = CAMERAS_FOR_MODEL)
    Ego state: {describe_ego_state(row)}\\n
    {QUESTION}<|im_end|>\\n
    <|im_start|>assistant\\n{assistant text}<|im_end|>

Assistant text (the training target):

* slow thinking: ``<think>\\nScene: ...\\nCritical objects: ...\\nIntent: ...\\n
  Meta-action: <lateral>, <longitudinal>\\n</think>\\n<answer><action_i>x10</answer>``
* fast thinking: ``<answer><action_i>x10</answer>`` only. There is no empty
  ``<think></think>``: the first generated token (``<think>`` or ``<answer>``)
  *is* the model's choice of mode, which keeps fast outputs short and makes
  the mode trivially parseable.

The stored ``messages`` column keeps one ``<|video_pad|>`` per camera clip;
:func:`model_inputs_from_row` expands each to the number of vision tokens of
that clip at the processor's pixel budget (as Qwen's processor does), so the
stored text is self-contained and independent of the pixel budget.

No torch import here: the build stage uses this module on CPU workers.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from annotators.ego_text import describe_ego_state
from schemas.enums import Camera, Lateral, Longitudinal, ThinkMode
from schemas.sample import FUTURE_STEPS
from tokenizer.tokenizer import ACTION_TOKEN_FORMAT, format_action_tokens
from tokenizer.tokenizer import parse_action_tokens as _parse_action_ids

PROMPT_VERSION = "1.0.0"

SYSTEM_PROMPT = (
    "You are an autonomous driving agent. You see short video clips from the vehicle's cameras "
    "and know its current state. You plan the ego vehicle's trajectory for the next 5 seconds."
)

QUESTION = (
    f"Plan the ego vehicle's trajectory for the next 5 seconds as {FUTURE_STEPS} action tokens, "
    "one per 0.5 s. For a simple scene answer directly inside <answer></answer>. For a complex "
    "scene first reason inside <think></think>: describe the scene, the critical objects, the "
    "ego intent and the meta-action; then give the action tokens inside <answer></answer>."
)

# DESIGN.md section 6: front, front-left, front-right and back clips.
CAMERAS_FOR_MODEL: tuple[str, ...] = (
    Camera.FRONT.value,
    Camera.FRONT_LEFT.value,
    Camera.FRONT_RIGHT.value,
    Camera.BACK.value,
)

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
VIDEO_PAD, IMAGE_PAD = "<|video_pad|>", "<|image_pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_ACTION_RE = re.compile(r"<action_[^<>\s]*>")
_META_RE = re.compile(r"Meta-action:\s*(.+?)\s*,\s*(.+?)\s*$", re.MULTILINE)

ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT = "system", "user", "assistant"


class PromptError(ValueError):
    """A row cannot be turned into a prompt or target; names the sample and the cause."""

    def __init__(self, sample_id: str | None, reason: str) -> None:
        self.sample_id = sample_id
        super().__init__(f"sample {sample_id!r}: {reason}")


def action_token(i: int) -> str:
    """The token string of codebook entry ``i`` (format owned by ``tokenizer.tokenizer``)."""
    return ACTION_TOKEN_FORMAT.format(int(i))


def camera_label(name: str) -> str:
    return name.replace("_", " ").capitalize() + " camera"


# --------------------------------------------------------------------------- rendering


def _sid(row: Mapping[str, Any]) -> str | None:
    return row.get("sample_id")


def select_cameras(row: Mapping[str, Any], cameras: Sequence[str] = CAMERAS_FOR_MODEL) -> list[Mapping[str, Any]]:
    """The row's camera entries in ``cameras`` order; a missing camera or frame is an error."""
    by_name = {c.get("name"): c for c in row.get("cameras") or ()}
    out = []
    for name in cameras:
        cam = by_name.get(name)
        if cam is None:
            raise PromptError(_sid(row), f"camera {name!r} is missing (row has {sorted(map(str, by_name))})")
        frames = cam.get("frames") or ()
        if not frames:
            raise PromptError(_sid(row), f"camera {name!r} has no frames")
        for j, fr in enumerate(frames):
            img = fr.get("image") if isinstance(fr, Mapping) else None
            data = img.get("bytes") if isinstance(img, Mapping) else None
            if not data:
                raise PromptError(_sid(row), f"camera {name!r} frame {j} has no image bytes")
        out.append(cam)
    return out


def build_user_content(
    row: Mapping[str, Any], cameras: Sequence[str] = CAMERAS_FOR_MODEL
) -> list[dict[str, str]]:
    """User turn as content parts: per camera a label and a ``video`` part, then ego state and question.

    Parts are ``{"type": "text", "text": ...}`` or ``{"type": "video", "camera": name}``
    (the frames come from the row's camera clip; see :func:`clip_frames`).
    """
    select_cameras(row, cameras)  # fail early, naming the sample
    parts: list[dict[str, str]] = []
    for name in cameras:
        parts.append({"type": "text", "text": f"{camera_label(name)}: "})
        parts.append({"type": "video", "camera": name})
        parts.append({"type": "text", "text": "\n"})
    parts.append({"type": "text", "text": f"Ego state: {describe_ego_state(row)}\n{QUESTION}"})
    return parts


def content_to_text(parts: Sequence[Mapping[str, str]]) -> str:
    """Content parts as one string, each video as Qwen's ``<|vision_start|><|video_pad|><|vision_end|>``."""
    return "".join(VIDEO_PLACEHOLDER if p["type"] == "video" else p["text"] for p in parts)


def build_assistant_text(row: Mapping[str, Any], num_action_tokens: int | None = None) -> str:
    """The target: ``<think>`` block for slow samples, then ``<answer>`` with the 10 action tokens."""
    sid = _sid(row)
    toks = row.get("action_tokens")
    if toks is None:
        raise PromptError(sid, "action_tokens is missing")
    ids = np.asarray(toks).reshape(-1)
    if ids.shape[0] != FUTURE_STEPS:
        raise PromptError(sid, f"action_tokens has {ids.shape[0]} entries, expected {FUTURE_STEPS}")
    if (ids < 0).any() or (num_action_tokens is not None and (ids >= num_action_tokens).any()):
        raise PromptError(sid, f"action_tokens {ids.tolist()} outside [0, {num_action_tokens})")
    answer = ANSWER_OPEN + format_action_tokens(ids.tolist()) + ANSWER_CLOSE
    mode = row.get("think_mode") or ThinkMode.FAST.value
    if mode == ThinkMode.FAST.value:
        return answer
    if mode != ThinkMode.SLOW.value:
        raise PromptError(sid, f"think_mode {mode!r} is not one of {list(ThinkMode.values())}")
    keys = ("reasoning_scene", "reasoning_objects", "reasoning_intent")
    missing = [k for k in (*keys, "reasoning_action_lateral", "reasoning_action_longitudinal") if not row.get(k)]
    if missing:
        raise PromptError(sid, f"slow-thinking row lacks {missing}")
    lat, lon = row["reasoning_action_lateral"], row["reasoning_action_longitudinal"]
    think = (
        f"{THINK_OPEN}\nScene: {row['reasoning_scene'].strip()}\n"
        f"Critical objects: {row['reasoning_objects'].strip()}\n"
        f"Intent: {row['reasoning_intent'].strip()}\n"
        f"Meta-action: {lat}, {lon}\n{THINK_CLOSE}\n"
    )
    return think + answer


def render_messages(
    row: Mapping[str, Any],
    num_action_tokens: int | None = None,
    cameras: Sequence[str] = CAMERAS_FOR_MODEL,
    with_target: bool = True,
) -> list[dict[str, str]]:
    """System, user (and assistant) messages with string contents; the stored ``messages`` column."""
    msgs = [
        {"role": ROLE_SYSTEM, "content": SYSTEM_PROMPT},
        {"role": ROLE_USER, "content": content_to_text(build_user_content(row, cameras))},
    ]
    if with_target:
        msgs.append({"role": ROLE_ASSISTANT, "content": build_assistant_text(row, num_action_tokens)})
    return msgs


def render_chat_text(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """What Qwen2.5-VL's chat template renders for string contents (no default system prompt needed)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        text += f"{IM_START}{ROLE_ASSISTANT}\n"
    return text


# --------------------------------------------------------------------------- model inputs


class ClipProcessorLike(Protocol):
    """What :func:`model_inputs_from_row` needs (``training.vision.ClipProcessor`` implements it)."""

    tokenizer: Any

    def process_clip(self, jpegs: Sequence[bytes], fps: float) -> tuple[np.ndarray, np.ndarray, float]:
        """JPEG frames -> (patches [N, D] float32, grid_thw [3] int64, seconds per temporal grid)."""
        ...

    def num_video_tokens(self, grid_thw: np.ndarray) -> int: ...


def clip_fps(cam: Mapping[str, Any], default: float = 2.0) -> float:
    """Frame rate of a clip from its timestamps (single-frame clips use ``default``)."""
    ts = [int(f["timestamp_us"]) for f in cam["frames"]]
    if len(ts) < 2:
        return default
    dt = (ts[-1] - ts[0]) / (len(ts) - 1) / 1e6
    return 1.0 / dt if dt > 0 else default


def request_video_fps(rates: Iterable[float], sample_id: str) -> float | None:
    """The one frame rate of a request's camera clips (``rates``: :func:`clip_fps` of each), for vLLM's
    per-request ``media_io_kwargs``.

    vLLM reads a ``video/jpeg`` frame list at 1 fps unless the request (or the server's
    ``--media-io-kwargs``) says otherwise (vllm/multimodal/media/video.py), and Qwen2.5-VL's temporal
    positions follow the rate; ``media_io_kwargs`` holds one rate per modality, so cameras at different
    rates are refused. ``None`` without cameras.
    """
    distinct = sorted({round(float(r), 6) for r in rates})
    if len(distinct) > 1:
        raise ValueError(f"sample {sample_id!r}: cameras at different frame rates {distinct}; vLLM's "
                         "media_io_kwargs holds one video fps per request")
    return distinct[0] if distinct else None


def clip_frames(cam: Mapping[str, Any]) -> list[bytes]:
    return [bytes(f["image"]["bytes"]) for f in cam["frames"]]


def model_inputs_from_row(
    row: Mapping[str, Any],
    processor: ClipProcessorLike,
    *,
    with_target: bool = True,
    num_action_tokens: int | None = None,
    cameras: Sequence[str] = CAMERAS_FOR_MODEL,
    check_stored_messages: bool = True,
) -> dict[str, Any]:
    """Token ids, labels and video patches for one row (numpy; batching is the caller's job).

    Returns ``input_ids`` [L] int64, ``labels`` [L] int64 (-100 outside the
    assistant span; the span is the assistant text plus ``<|im_end|>``;
    absent without target), ``mm_token_type_ids`` [L] (2 on video tokens),
    ``pixel_values_videos`` [sum N, D] float32, ``video_grid_thw`` [C, 3],
    ``second_per_grid_ts`` [C], ``prompt_length`` and ``sample_id``. With
    ``with_target=False`` the sequence ends with the generation prompt
    ``<|im_start|>assistant\\n`` (RFT rollouts, eval).

    The prompt and target are tokenized separately and concatenated, so the
    prompt ids are identical in training and generation.
    """
    sid = _sid(row)
    msgs = render_messages(row, num_action_tokens, cameras, with_target=with_target)
    stored = row.get("messages")
    if check_stored_messages and stored:
        want = [{"role": m["role"], "content": m["content"]} for m in stored][: len(msgs)]
        if want != msgs:
            raise PromptError(
                sid,
                f"stored messages differ from the prompt builder (PROMPT_VERSION {PROMPT_VERSION}); "
                "rebuild the dataset or disable the check (data.check_stored_messages=false)",
            )
    patches, grids, spgt = [], [], []
    for cam in select_cameras(row, cameras):
        try:
            p, g, s = processor.process_clip(clip_frames(cam), clip_fps(cam))
        except (OSError, ValueError) as exc:
            raise PromptError(sid, f"camera {cam['name']!r}: cannot decode clip: {exc}") from exc
        patches.append(p)
        grids.append(g)
        spgt.append(s)

    prompt_text = render_chat_text(msgs[:2], add_generation_prompt=True)
    pieces = prompt_text.split(VIDEO_PAD)
    if len(pieces) != len(grids) + 1:
        raise PromptError(sid, f"prompt has {len(pieces) - 1} video placeholders for {len(grids)} clips")
    expanded = pieces[0]
    for g, rest in zip(grids, pieces[1:], strict=True):
        expanded += VIDEO_PAD * processor.num_video_tokens(g) + rest
    tok = processor.tokenizer
    prompt_ids = np.asarray(tok(expanded, add_special_tokens=False)["input_ids"], dtype=np.int64)
    ids, labels = prompt_ids, None
    if with_target:
        target_ids = np.asarray(
            tok(msgs[2]["content"] + IM_END, add_special_tokens=False)["input_ids"], dtype=np.int64
        )
        ids = np.concatenate([prompt_ids, target_ids])
        labels = np.full_like(ids, -100)
        labels[len(prompt_ids) :] = target_ids
    video_id = tok.convert_tokens_to_ids(VIDEO_PAD)
    mm = (ids == video_id).astype(np.int64) * 2
    expected = sum(processor.num_video_tokens(g) for g in grids)
    if int((mm > 0).sum()) != expected:
        raise PromptError(sid, f"tokenized prompt has {int((mm > 0).sum())} video tokens, expected {expected}")
    out = {
        "sample_id": sid,
        "input_ids": ids,
        "mm_token_type_ids": mm,
        "pixel_values_videos": np.concatenate(patches, axis=0),
        "video_grid_thw": np.stack(grids).astype(np.int64),
        "second_per_grid_ts": np.asarray(spgt, dtype=np.float32),
        "prompt_length": len(prompt_ids),
    }
    if labels is not None:
        out["labels"] = labels
    return out


# --------------------------------------------------------------------------- parsing


def parse_completion(
    text: str, num_action_tokens: int, num_steps: int = FUTURE_STEPS
) -> tuple[str, list[int], list[str]]:
    """Parse a generated completion into ``(think_mode, action ids, errors)``.

    ``think_mode`` is ``slow`` when the completion opens with ``<think>``.
    Action ids come from the ``<answer>`` block (the whole text if there is
    none) via ``tokenizer.tokenizer.parse_action_tokens``; they are never
    padded or truncated: a wrong count, an unknown or malformed token, a
    missing block, stray text inside the block or text outside the
    ``[<think>...</think>]<answer>...</answer>`` layout each add an error, and
    callers treat any error as a malformed output.
    """
    errors: list[str] = []
    body = text.replace(IM_END, "").strip()
    mode = ThinkMode.SLOW.value if body.startswith(THINK_OPEN) else ThinkMode.FAST.value
    if mode == ThinkMode.SLOW.value and THINK_CLOSE not in body:
        errors.append("<think> is not closed")
    start, end = body.find(ANSWER_OPEN), body.rfind(ANSWER_CLOSE)
    inner = body
    if start < 0 or end < start:
        errors.append("no <answer>...</answer> block")
    else:
        inner = body[start + len(ANSWER_OPEN) : end]
        if _ACTION_RE.sub("", inner).strip():
            errors.append("text other than action tokens inside <answer>")
        # The layout is exactly [<think>...</think>] <answer>...</answer>: anything else is malformed.
        lead = body[:start]
        if mode == ThinkMode.SLOW.value:  # an unclosed <think> is reported above
            lead = lead.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in lead else ""
        if lead.strip() or body[end + len(ANSWER_CLOSE) :].strip():
            errors.append("text outside the <think> and <answer> blocks")
    res = _parse_action_ids(inner, num_action_tokens, num_steps)
    return mode, list(res.ids), errors + list(res.errors)


def parse_meta_action(text: str) -> tuple[str, str] | None:
    """The ``Meta-action: <lateral>, <longitudinal>`` line of a slow completion, if valid."""
    m = _META_RE.search(text)
    if not m:
        return None
    lat, lon = m.group(1).strip().lower(), m.group(2).strip().lower()
    if lat not in Lateral.values() or lon not in Longitudinal.values():
        return None
    return lat, lon


def decode_jpeg(data: bytes) -> Any:
    """JPEG bytes -> RGB PIL image (PIL imported lazily; build workers may not need it)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")
