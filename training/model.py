"""Model setup shared by SFT, RFT (GRPO) and eval: Qwen2.5-VL + K action tokens.

``load_model(cfg, num_action_tokens)`` returns ``(model, processor, action_ids)``:

* the checkpoint (``cfg.path``; a Hub id or a local dir such as an SFT
  checkpoint) loaded in fp32 master weights (bf16 compute comes from autocast
  or the FSDP2 mixed-precision policy, see ``training/sft.py``);
* the ``<action_0>`` .. ``<action_{K-1}>`` tokens added when missing
  (embeddings resized), with their ids checked contiguous. ``action_ids.first``
  is computed from the tokenizer after adding, never stored in config;
* the vision tower frozen (default), optional LoRA (peft) on the language
  model's projections with the embeddings and LM head trained in full (the new
  action rows must learn), gradient checkpointing on request;
* a :class:`training.vision.ClipProcessor` at the configured pixel budget;
* Qwen2.5-VL's multimodal RoPE positions as the model was built and as vLLM
  computes them (:func:`use_qwen25vl_rope_index`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotators.training_prompt import action_token
from tokenizer.tokenizer import action_token_strings, register_action_tokens

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelConfig:
    path: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    build_tiny_if_missing: bool = False  # build training.tiny's model at `path` when it does not exist
    tiny_hidden_size: int = 64  # size of that tiny model (only used when it is built)
    tiny_layers: int = 2
    num_action_tokens: int | None = None  # None: read K from <data>/codebook/codebook.json
    freeze_vision: bool = True
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    min_pixels: int | None = None  # per frame; None keeps the checkpoint's clip processor setting
    max_pixels: int | None = None  # the fixed per-frame pixel budget (same in SFT, RFT, eval)
    pad_vocab_multiple: int = 64  # embedding rows rounded up for efficient matmuls


@dataclass(frozen=True)
class ActionIds:
    """Token ids of the action tokens: ``first + i`` is ``<action_i>``."""

    first: int
    count: int

    def to_token_ids(self, codes: Any) -> Any:
        return codes + self.first

    def to_codes(self, token_ids: Any) -> Any:
        return token_ids - self.first


def action_ids_from_tokenizer(tokenizer: Any, num_action_tokens: int) -> ActionIds:
    """Look the ids up and check they are contiguous (so ``id - first`` is the codebook index)."""
    ids = tokenizer.convert_tokens_to_ids(action_token_strings(num_action_tokens))
    first = ids[0]
    unk = getattr(tokenizer, "unk_token_id", None)
    if first is None or first == unk or ids != list(range(first, first + num_action_tokens)):
        raise ValueError(
            f"action tokens <action_0>..<action_{num_action_tokens - 1}> are not contiguous in the tokenizer "
            f"(first ids {ids[:4]}...); the checkpoint was extended with a different K?"
        )
    return ActionIds(first=int(first), count=num_action_tokens)


def add_action_tokens(model: Any, tokenizer: Any, num_action_tokens: int, pad_multiple: int = 64) -> ActionIds:
    """Add the K action tokens (idempotent) and resize embeddings to cover the tokenizer."""
    vocab = tokenizer.get_vocab()
    if action_token(num_action_tokens) in vocab:
        raise ValueError(f"tokenizer already has more than {num_action_tokens} action tokens (codebook K mismatch)")
    new = action_token(0) not in vocab
    register_action_tokens(tokenizer, num_action_tokens)  # idempotent; checks contiguity
    ids = action_ids_from_tokenizer(tokenizer, num_action_tokens)
    emb = model.get_input_embeddings().weight.shape[0]
    if emb < len(tokenizer):
        # mean_resizing=False: transformers' default draws every new row from N(mean, 1e-9 * cov),
        # i.e. K near-identical rows the model cannot tell apart; init_action_rows replaces them.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_multiple, mean_resizing=False)
        log.info("resized embeddings %d -> %d for %d action tokens", emb,
                 model.get_input_embeddings().weight.shape[0], num_action_tokens)
    if new:
        init_action_rows(model, ids)
    return ids


def init_action_rows(model: Any, ids: ActionIds, seed: int = 0) -> None:
    """Initialise the K action-token rows distinctly, at the scale of the existing rows.

    Row ``i`` (input embedding and, when untied, LM head) = per-dimension mean
    of the rows before the action tokens + their per-dimension std times an
    independent N(0, 1) draw (seeded): each row is as far from the others as
    two ordinary tokens are, so from the first step the model can tell the K
    action tokens apart, and their logits start at the scale of the others.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    layers = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not layers[0]:
        layers.append(out.weight)
    with torch.no_grad():
        for w in layers:
            old = w[: ids.first].float()
            mean, std = old.mean(0), old.std(0)
            rows = mean + std * torch.randn(ids.count, w.shape[1], generator=g)
            w[ids.first : ids.first + ids.count] = rows.to(w.dtype)


def vision_tower(model: Any) -> Any:
    """The ``visual`` module, whatever wraps the HF model (peft, DDP)."""
    return _named(model, "visual")


def language_layers(model: Any) -> Any:
    """The decoder layers (``language_model.layers``), whatever wraps the HF model."""
    return _named(model, "language_model").layers


def _named(model: Any, last: str) -> Any:
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] == last:
            return mod
    raise ValueError(f"model {type(model).__name__} has no submodule named {last!r}")


def load_model(cfg: ModelConfig, num_action_tokens: int, device: Any = "cpu") -> tuple[Any, Any, ActionIds]:
    """Load checkpoint + processor, add action tokens, freeze/LoRA/checkpointing per ``cfg``."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from training.vision import ClipProcessor

    path = Path(cfg.path)
    if cfg.build_tiny_if_missing and not (path / "config.json").is_file():
        from training.tiny import build_tiny_qwen25vl

        log.info("no model at %s: building the tiny test model there", path)
        build_tiny_qwen25vl(path, hidden_size=cfg.tiny_hidden_size, num_layers=cfg.tiny_layers)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        cfg.path, dtype=torch.float32, attn_implementation=cfg.attn_implementation
    )
    use_qwen25vl_rope_index(model)
    # A checkpoint's clip_processor.json wins; a differing explicit setting is an error (training.vision).
    processor = ClipProcessor.from_pretrained(cfg.path, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    tok = processor.tokenizer
    ids = add_action_tokens(model, tok, num_action_tokens, cfg.pad_vocab_multiple)
    if tok.pad_token_id is None:
        tok.pad_token = "<|endoftext|>"
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    if cfg.freeze_vision:
        for p in vision_tower(model).parameters():
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        model = apply_lora(model, cfg)
    model.to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.1fM params, %.1fM trainable, action ids %d..%d", cfg.path, n_all / 1e6,
             n_train / 1e6, ids.first, ids.first + ids.count - 1)
    return model, processor, ids


def apply_lora(model: Any, cfg: ModelConfig) -> Any:
    """LoRA on the language model's linear layers; embeddings and LM head trained in full."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a declared dependency
        raise ImportError("model.lora=true needs peft: pip install peft") from exc
    lcfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        # Regex: only the language model's projections, never the vision tower's.
        target_modules=r".*language_model.*\.(" + "|".join(LORA_TARGETS) + ")",
        modules_to_save=["embed_tokens", "lm_head"],
        # Qwen2.5-VL-3B ties lm_head to embed_tokens: without this peft trains two separate
        # copies and the trained lm_head is lost when a merged model is saved with tied weights.
        ensure_weight_tying=model.get_output_embeddings().weight is model.get_input_embeddings().weight,
    )
    return get_peft_model(model, lcfg)


def unwrap(model: Any) -> Any:
    """The HF model under DDP / peft wrappers."""
    m = getattr(model, "module", model)
    return m


def read_num_action_tokens(codebook_dir: str | Path) -> int:
    """K from ``<codebook_dir>/codebook.json`` (the codebook's own metadata)."""
    import json

    meta = Path(codebook_dir) / "codebook.json"
    if not meta.is_file():
        raise FileNotFoundError(
            f"codebook metadata {meta} not found: run `make codebook` (or set model.num_action_tokens)"
        )
    data = json.loads(meta.read_text())
    for key in ("K", "k", "num_tokens", "size"):
        if key in data:
            return int(data[key])
    raise ValueError(f"{meta} has no 'K' entry (keys: {sorted(data)})")


def qwen25vl_rope_index(core: Any, input_ids: Any, mm_token_type_ids: Any, image_grid_thw: Any = None,
                        video_grid_thw: Any = None, second_per_grid_ts: Any = None, attention_mask: Any = None,
                        **_: Any) -> tuple[Any, Any]:
    """Qwen2.5-VL's 3-D RoPE positions ``(3, B, L)`` and per-row deltas, text resuming after the largest
    vision position.

    Same signature and result as transformers' ``Qwen2_5_VLModel.get_rope_index`` except one rule: after an
    image or video, text continues at the largest position of that block + 1, as Qwen2.5-VL was introduced
    in transformers (PR #35569: "the text start position_ids as the max vision position_ids plus 1") and as
    vLLM computes it (``Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions``). transformers 5.x
    advances by ``max(h, w) // merge`` instead, which ignores the temporal extent of a video: for a clip of
    more than one temporal patch (more than 2 frames) every later position was lower than vLLM's, so a
    model trained here and served by vLLM (or rolled out by it) saw different positions (found by the
    vLLM rollout parity test with 4-frame clips). Vision blocks keep transformers' own positions
    (``get_vision_position_ids``: temporal index x ``tokens_per_second`` x seconds per grid).
    """
    import itertools

    import torch

    merge = core.config.vision_config.spatial_merge_size
    tokens_per_second = core.config.vision_config.tokens_per_second
    dev = input_ids.device
    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=dev)
    grids = {1: iter(image_grid_thw) if image_grid_thw is not None else None,
             2: iter(video_grid_thw) if video_grid_thw is not None else None}
    seconds = iter(second_per_grid_ts) if second_per_grid_ts is not None else itertools.repeat(1)
    deltas = []
    for b in range(input_ids.shape[0]):
        types = mm_token_type_ids[b]
        keep = attention_mask[b].bool() if attention_mask is not None else None
        if keep is not None:
            types = types[keep]
        pieces, pos = [], 0
        for kind, group in itertools.groupby(types.tolist()):
            n = sum(1 for _ in group)
            if kind == 0:  # text
                pieces.append(torch.arange(n, device=dev).view(1, -1).expand(3, -1) + pos)
                pos += n
                continue
            grid = next(grids[kind])  # type: ignore[arg-type]
            interval = tokens_per_second * next(seconds) if kind == 2 else 1
            vision = core.get_vision_position_ids(pos, grid, 1, merge, interval, device=dev)
            if vision.shape[1] != n:
                raise ValueError(f"row {b}: {n} vision tokens but grid {grid.tolist()} gives {vision.shape[1]}")
            pieces.append(vision)
            pos = int(vision.max()) + 1
        positions = torch.cat(pieces, dim=1)
        if keep is not None:
            position_ids[:, b, keep] = positions.to(position_ids.dtype)
        else:
            position_ids[:, b] = positions.to(position_ids.dtype)
        deltas.append(int(positions.max()) + 1 - positions.shape[1])
    return position_ids, torch.tensor(deltas, device=dev).unsqueeze(1)


def use_qwen25vl_rope_index(model: Any) -> None:
    """Install :func:`qwen25vl_rope_index` on a Qwen2.5-VL model's backbone (every caller of
    ``get_rope_index``: forward, generation, the HF rollout backend). Transformers without
    ``get_vision_position_ids`` (4.x) already follow the original rule and are left alone."""
    import types

    core = getattr(model, "model", None)
    if core is None or not hasattr(core, "get_rope_index") or not hasattr(core, "get_vision_position_ids"):
        return
    core.get_rope_index = types.MethodType(qwen25vl_rope_index, core)
