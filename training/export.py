"""Export a checkpoint as a plain Hugging Face model that ``from_pretrained`` and ``vllm serve`` load.

    python -m training.export --checkpoint out/sft_tiny --out out/export     # = make export

What the export directory holds:

* ``model.safetensors`` + ``config.json``: LoRA adapters merged, including
  ``modules_to_save`` (embeddings/LM head of SFT LoRA) and the action-token
  rows trained in RFT (peft trainable tokens); loads with
  ``Qwen2_5_VLForConditionalGeneration.from_pretrained``;
* ``generation_config.json``: end token ``<|im_end|>``, greedy, no
  repetition penalty (a repeated action token is a valid plan);
* the tokenizer with the K ``<action_i>`` tokens and Qwen's chat template;
* the processor settings: ``clip_processor.json`` (this project),
  ``preprocessor_config.json`` / ``video_preprocessor_config.json`` (Qwen
  keys ``min_pixels``/``max_pixels``: the same pixel budget as training);
* ``export_info.json``: source checkpoint, K, and the serve/eval commands.

Serving (on a GPU not verified here; a tiny export served by vLLM's CPU build answered
``make eval ENDPOINT=...`` with the same text as the local checkpoint)::

    vllm serve out/export --served-model-name drivevla --max-model-len 8192 \\
        --limit-mm-per-prompt '{"video": 4}' --trust-request-mm-kwargs
    make eval ENDPOINT=http://127.0.0.1:8000/v1 SERVED_MODEL=drivevla

``--trust-request-mm-kwargs``: the eval client states each request's clip frame rate
(``media_io_kwargs``); vLLM reads a ``video/jpeg`` frame list at 1 fps otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from training.cli import emit

log = logging.getLogger(__name__)

SERVE_CMD = ("vllm serve {out} --served-model-name drivevla --max-model-len 8192 "
             "--limit-mm-per-prompt '{{\"video\": 4}}' --trust-request-mm-kwargs")
EVAL_CMD = "make eval ENDPOINT=http://127.0.0.1:8000/v1 SERVED_MODEL=drivevla"


def export(checkpoint: str | Path, out: str | Path, num_action_tokens: int) -> Path:
    """Merge ``checkpoint`` into a plain model at ``out`` (which must not exist or be empty)."""
    from training.loading import load_merged, resolve_checkpoint

    ck = resolve_checkpoint(checkpoint)
    dst = Path(out)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"export directory {dst} is not empty: choose a new one or remove it")
    model, proc, ids = load_merged(ck, num_action_tokens)
    gc = model.generation_config
    gc.eos_token_id = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    gc.pad_token_id = proc.tokenizer.pad_token_id
    gc.do_sample, gc.repetition_penalty = False, 1.0
    for key in ("temperature", "top_p", "top_k"):
        setattr(gc, key, None)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    proc.save_pretrained(dst)
    info: dict[str, Any] = {
        "source_checkpoint": str(ck.resolve()),
        "num_action_tokens": ids.count,
        "first_action_token_id": ids.first,
        "pixels_per_frame": {"min": proc.min_pixels, "max": proc.max_pixels},
        "serve": SERVE_CMD.format(out=dst),
        "eval": EVAL_CMD,
    }
    (dst / "export_info.json").write_text(json.dumps(info, indent=2))
    log.info("exported %s -> %s; serve with: %s", ck, dst, info["serve"])
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (latest step)")
    ap.add_argument("--out", required=True, help="new directory for the plain Hugging Face model")
    ap.add_argument("--codebook", default="data/codebook", help="codebook directory giving K (default: %(default)s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from training.model import read_num_action_tokens

    try:
        dst = export(args.checkpoint, args.out, read_num_action_tokens(args.codebook))
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    emit(json.loads((dst / "export_info.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
