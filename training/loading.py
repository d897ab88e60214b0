"""Load any checkpoint this project writes as one plain model: eval, predict and export share it.

A checkpoint directory is one of

* a full model (``config.json`` + ``model.safetensors``: SFT, full-parameter
  RFT, or an exported model);
* a LoRA adapter (``adapter_config.json``) over the base named in
  ``base_model.txt`` (SFT LoRA over the base model, RFT LoRA over an SFT
  checkpoint; the base may itself be a LoRA checkpoint, loaded recursively).
  Adapters, ``modules_to_save`` and trainable action-token rows are merged.

The processor (pixel budget, tokenizer with the action tokens) is always the
checkpoint's own: an explicit ``min_pixels``/``max_pixels`` that differs
from it is an error (``training.vision.ProcessorSettingsError``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.model import ActionIds, ModelConfig, load_model

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (``<out_dir>``): its latest ``checkpoints/step_*``."""
    from training.checkpoint import latest_checkpoint

    p = Path(path)
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return p
    last = latest_checkpoint(p)
    if last is None:
        raise FileNotFoundError(f"{p} is neither a checkpoint (config.json / adapter_config.json) nor a run "
                                "directory with checkpoints/step_*: train first (make train)")
    return last


def is_lora_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def base_of(path: str | Path) -> str:
    """The base model of a LoRA checkpoint (``base_model.txt``); an error naming the file when missing."""
    p = Path(path) / "base_model.txt"
    base = p.read_text().strip() if p.is_file() else ""
    if not base:
        raise FileNotFoundError(f"LoRA checkpoint {path} has no base_model.txt naming its base model")
    return base


def load_merged(
    checkpoint: str | Path,
    num_action_tokens: int,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    device: Any = "cpu",
) -> tuple[Any, Any, ActionIds]:
    """``(model, processor, action_ids)`` of ``checkpoint`` with every adapter merged, in eval mode."""
    from training.vision import ClipProcessor

    ck = resolve_checkpoint(checkpoint)
    if is_lora_checkpoint(ck):
        from peft import PeftModel

        base = base_of(ck)
        if is_lora_checkpoint(base):
            model, _, ids = load_merged(base, num_action_tokens)
        else:
            model, _, ids = load_model(ModelConfig(path=base), num_action_tokens)
        model = PeftModel.from_pretrained(model, str(ck)).merge_and_unload()
        processor = ClipProcessor.from_pretrained(ck, min_pixels=min_pixels, max_pixels=max_pixels)
    else:
        model, processor, ids = load_model(
            ModelConfig(path=str(ck), min_pixels=min_pixels, max_pixels=max_pixels), num_action_tokens
        )
    model.to(device).eval()
    log.info("loaded %s (%s)", ck, "LoRA merged" if is_lora_checkpoint(ck) else "full model")
    return model, processor, ids
