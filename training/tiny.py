"""A tiny randomly initialised Qwen2.5-VL, built locally (no downloads) for tests and CPU demos.

:func:`build_tiny_qwen25vl` writes a model directory that loads exactly like a
real checkpoint (``Qwen2_5_VLForConditionalGeneration.from_pretrained`` +
:meth:`training.vision.ClipProcessor.from_pretrained`):

* a byte-level BPE tokenizer trained in-process on the prompt texts (any text
  encodes; no unknown tokens), with Qwen's special tokens and Qwen's chat
  template for system/user/assistant turns and image/video placeholders;
* a 2-layer text model (hidden 64) and a 1-block vision tower (hidden 32,
  patch 14, spatial merge 2, temporal patch 2);
* a clip processor with a small pixel budget (56x56 per frame: 4 merged tokens
  per temporal patch).

Used by ``tests/`` and by the default ``configs/train/sft_tiny.yaml`` (built
on the fly into ``data/tiny_model`` when missing). The GRPO trainer and its
tests import it too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from annotators import training_prompt as tp
from schemas.enums import Camera, Command, Lateral, Longitudinal

log = logging.getLogger(__name__)

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's chat template (as shipped with the Instruct checkpoints).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
TINY_VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=56,
    fullatt_block_indexes=[0],
    tokens_per_second=2,
)
TINY_PIXELS = 56 * 56


def _corpus() -> list[str]:
    words = [tp.SYSTEM_PROMPT, tp.QUESTION, "Ego state: Speed 5.0 m/s (forward 5.0, lateral 0.0 m/s).",
             "Acceleration forward +0.1 m/s^2, lateral -0.1 m/s^2. Navigation command: go straight.",
             "Scene: a road with lanes, vehicles, pedestrians and cyclists at an intersection.",
             "Critical objects: the vehicle ahead in the front camera, slowing down; keep distance.",
             "Intent: follow the lane and keep a safe gap. Meta-action:",
             "<think> </think> <answer> </answer> 0123456789 .,:;!?()[]{}+-*/=%'\"_"]
    words += [tp.camera_label(c) for c in Camera.values()]
    words += list(Command.values()) + list(Lateral.values()) + list(Longitudinal.values())
    return words * 4


def build_tiny_tokenizer(vocab_size: int = 600):
    """A byte-level BPE with Qwen's special tokens and chat template (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_tiny_qwen25vl(out_dir: str | Path, num_action_tokens: int = 0, seed: int = 0, hidden_size: int = 64,
                        num_layers: int = 2) -> Path:
    """Write a tiny random Qwen2.5-VL (+ tokenizer, clip processor) to ``out_dir`` and return it.

    With ``num_action_tokens`` > 0 the ``<action_i>`` tokens are added already
    (as :func:`training.model.add_action_tokens` would do on a base model).
    ``hidden_size`` (a multiple of 64) and ``num_layers`` size the text model
    (4 heads; the M-RoPE sections scale with the head size).
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from training.model import add_action_tokens
    from training.vision import ClipProcessor

    out = Path(out_dir)
    tok = build_tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    if hidden_size % 64:
        raise ValueError(f"tiny model hidden_size must be a multiple of 64, got {hidden_size}")
    scale = hidden_size // 64
    rope = dict(TINY_TEXT["rope_parameters"], mrope_section=[2 * scale, 3 * scale, 3 * scale])
    text = dict(TINY_TEXT, vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], hidden_size=hidden_size,
                intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, rope_parameters=rope)
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(TINY_VISION, out_hidden_size=hidden_size),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    proc = ClipProcessor(tokenizer=tok, min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS)
    if num_action_tokens:
        add_action_tokens(model, tok, num_action_tokens)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    log.info("built tiny Qwen2.5-VL (%d params, vocab %d) in %s", n, len(tok), out)
    return out


# --------------------------------------------------------------------------- test rows

REASONING_FIELDS = ("reasoning_scene", "reasoning_objects", "reasoning_intent",
                    "reasoning_action_lateral", "reasoning_action_longitudinal")


def built_schema():
    """Arrow schema of a built row (unified sample + build-stage columns), as the tests write it."""
    import pyarrow as pa

    from schemas.sample import ACTION_TOKENS_FIELD, MESSAGES_TYPE, THINK_MODE_FIELD, schema_with

    extra = [ACTION_TOKENS_FIELD, THINK_MODE_FIELD, *(pa.field(f, pa.string()) for f in REASONING_FIELDS),
             pa.field("messages", MESSAGES_TYPE)]
    return schema_with(*extra)


def _jpeg(rng, width: int, height: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    arr = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_built_row(i: int, num_action_tokens: int, *, slow: bool = False, frames: int = 4,
                   size: tuple[int, int] = (64, 48), seed: int = 0, render: bool = True) -> dict:
    """A valid built-dataset row with random JPEG clips and action tokens (tests, GRPO tests)."""
    import numpy as np

    rng = np.random.default_rng([seed, i])
    w, h = size
    t0 = 1_000_000 * (i + 10)
    cams = [
        {"name": c, "width": w, "height": h, "intrinsics": [100.0, 0, w / 2, 0, 100.0, h / 2, 0, 0, 1],
         "extrinsics": np.eye(4).reshape(-1).tolist(),
         "frames": [{"image": {"bytes": _jpeg(rng, w, h), "path": None},
                     "timestamp_us": t0 - (frames - 1 - k) * 500_000} for k in range(frames)]}
        for c in tp.CAMERAS_FOR_MODEL
    ]
    speed = float(rng.uniform(0, 10))
    row = {
        "sample_id": f"nuscenes/scene-{i:04d}/{i}", "dataset": "nuscenes", "split": "train",
        "scene_id": f"scene-{i:04d}", "timestamp_us": t0, "cameras": cams,
        "history": [[-speed * 0.5 * k, 0.0, 0.0] for k in range(4, 0, -1)],
        "future": [[speed * 0.5 * k, 0.0, 0.0] for k in range(1, 11)],
        "velocity": [speed, 0.0], "acceleration": [0.0, 0.0], "command": "straight",
        "meta_lateral": "move forward", "meta_longitudinal": "constant speed",
        "history_meta_lateral": "move forward", "history_meta_longitudinal": "constant speed",
        "preference_trajectories": None, "preference_scores": None, "objects": [], "drivelm_qa": None,
        "source_files": ["synthetic"], "extractor_version": "test",
        "action_tokens": rng.integers(0, num_action_tokens, 10).astype(int).tolist(),
        "think_mode": "slow" if slow else "fast",
    }
    for f in REASONING_FIELDS:
        row[f] = None
    if slow:
        row.update(reasoning_scene=f"A straight road, scene {i}.", reasoning_objects="A car ahead, keep distance.",
                   reasoning_intent="Keep the lane.", reasoning_action_lateral="move forward",
                   reasoning_action_longitudinal="constant speed")
    row["messages"] = tp.render_messages(row, num_action_tokens) if render else None
    return row


def write_built_parquet(rows: list[dict], path: str | Path, row_group_size: int = 4) -> Path:
    """Write rows as one Parquet shard of :func:`built_schema`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=built_schema()), p, row_group_size=row_group_size)
    return p
