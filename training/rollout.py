"""Rollouts for GRPO: G sampled completions per scene, parsed and decoded for the rewards.

:class:`RolloutBackend` is what the trainer talks to. :class:`HFGenerateBackend`
runs ``model.generate`` in-process (batched, dropout off: ``model.eval()``).
A vLLM-server backend slots in behind the same protocol: ``generate`` sends
the rows' rendered messages (``annotators.training_prompt.render_messages``,
images as data URLs) through the OpenAI-compatible client
``annotators.client.VLMClient`` with ``n=G``, per-request ``seed`` and
token ids returned, and ``sync_weights`` pushes the LoRA adapter to the
server (vLLM's ``/v1/load_lora_adapter``) after each optimiser step. It is
not written yet.

Per-sample seeds: HF ``generate`` samples the whole batch from one global
RNG, so a completion would depend on its batch neighbours. We run
``generate`` greedily with :class:`SeededSampler` as the last logits
processor: it samples each row's next token with the row's own
``torch.Generator`` (temperature, top-p) and leaves only that token, so
completion ``(scene, g)`` is a function of ``(seed, step, scene, g)`` alone.
The model's own generation defaults (e.g. Qwen's repetition penalty) are
replaced for the call so the sampling distribution is the policy's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from annotators.training_prompt import (
    IM_END,
    THINK_CLOSE,
    THINK_OPEN,
    parse_completion,
)
from schemas.sample import FUTURE_STEPS
from training.data import video_tensors
from training.rewards.base import Completion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutConfig:
    """``rollout:`` section of the RFT config."""

    backend: str = "hf"  # hf (in-process generate); vllm is reserved for the server backend
    num_generations: int = 8  # G completions per scene, independent of the GPU count
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    generation_batch_size: int = 16  # sequences per generate call

    def __post_init__(self) -> None:
        if self.backend not in ("hf",):
            raise ValueError(f"rollout.backend {self.backend!r} is not available (implemented: hf)")
        if self.num_generations < 2:
            raise ValueError("rollout.num_generations must be >= 2 (GRPO compares completions in a group)")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("rollout.temperature must be > 0 and rollout.top_p in (0, 1]")


@dataclass(frozen=True)
class Generation:
    """One sampled completion: token ids up to and including the end token."""

    token_ids: np.ndarray  # (C,) int64
    text: str
    truncated: bool  # no end token within max_new_tokens


class RolloutBackend(Protocol):
    """Samples completions for prompts; returns ``[scene][g]`` generations."""

    def generate(
        self, rows: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]], seeds: Sequence[Sequence[int]]
    ) -> list[list[Generation]]:
        """``examples[i]`` are the model inputs of ``rows[i]`` (without target); ``seeds[i]`` has G seeds."""
        ...

    def sync_weights(self, model: Any) -> None:
        """Make the backend sample from ``model``'s current weights."""
        ...


def sample_seed(base: int, step: int, scene: int, g: int) -> int:
    """A 63-bit seed for completion ``g`` of global scene ``scene`` at ``step``."""
    ss = np.random.SeedSequence([base, step, scene, g])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1 << 31, 1], np.uint64))


class SeededSampler:
    """Logits processor: per-row seeded sampling with temperature and top-p (use with greedy search)."""

    def __init__(
        self, seeds: Sequence[int], temperature: float, top_p: float, banned_ids: Sequence[int] = ()
    ) -> None:
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.banned = list(banned_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        if self.banned:
            logits[:, self.banned] = float("-inf")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        if self.top_p < 1.0:  # nucleus: keep the smallest prefix with mass >= top_p
            keep = (probs.cumsum(-1) - probs) < self.top_p
            probs = probs * keep
        cdf = probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=g) for g in self.gens]).to(cdf.device, cdf.dtype)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
        pos = pos.clamp(max=cdf.shape[-1] - 1)
        token = order.gather(-1, pos)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)


# A completion holding one of these would be read as an image/video placeholder
# when the sequence is fed back for the update; they are never sampled (and
# masked the same way in completion_logprobs, so both see one distribution).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def banned_token_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    unk = getattr(tokenizer, "unk_token_id", None)
    return sorted({int(i) for i in ids if i is not None and i != unk})


class HFGenerateBackend:
    """In-process rollouts with ``model.generate`` (LoRA/peft, DDP or FSDP2-wrapped models)."""

    def __init__(
        self, model: Any, tokenizer: Any, cfg: RolloutConfig, device: Any = "cpu", synced_gpus: bool = False
    ) -> None:
        from transformers import GenerationConfig

        self.synced_gpus = synced_gpus  # FSDP2: every rank runs decode steps until all ranks finish
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_id = int(tokenizer.convert_tokens_to_ids(IM_END))
        self.banned_ids = banned_token_ids(tokenizer)
        # Every field that would add a logits processor is pinned: generate() fills
        # unset fields from the checkpoint's generation_config (Qwen ships a 1.05
        # repetition penalty), and that would sample from something else than the policy.
        self.gen_config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            bad_words_ids=None,
            use_cache=True,
        )

    def sync_weights(self, model: Any) -> None:
        self.model = model  # same process, same weights

    @torch.no_grad()
    def generate(
        self, rows: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]], seeds: Sequence[Sequence[int]]
    ) -> list[list[Generation]]:
        from transformers import LogitsProcessorList

        from training.data import collate, model_batch

        jobs = [(i, g) for i in range(len(examples)) for g in range(len(seeds[i]))]
        out: list[list[Generation | None]] = [[None] * len(s) for s in seeds]
        model = getattr(self.model, "module", self.model)  # DDP: generate on the wrapped module
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
        was_training = model.training
        model.eval()  # dropout off while sampling
        saved = base.generation_config
        base.generation_config = self.gen_config
        try:
            for start in range(0, len(jobs), self.cfg.generation_batch_size):
                chunk = jobs[start : start + self.cfg.generation_batch_size]
                batch = collate([examples[i] for i, _ in chunk], self.pad_id, padding_side="left")
                inputs = model_batch(batch, self.device)
                sampler = SeededSampler(
                    [seeds[i][g] for i, g in chunk], self.cfg.temperature, self.cfg.top_p, self.banned_ids
                )
                seqs = model.generate(
                    **inputs,
                    generation_config=self.gen_config,
                    logits_processor=LogitsProcessorList([sampler]),
                    synced_gpus=self.synced_gpus,
                )
                new = seqs[:, inputs["input_ids"].shape[1] :].cpu().numpy()
                for (i, g), ids in zip(chunk, new, strict=True):
                    out[i][g] = self._finish(ids)
        finally:
            base.generation_config = saved
            model.train(was_training)
        return [[g for g in row if g is not None] for row in out]

    def _finish(self, ids: np.ndarray) -> Generation:
        ends = np.flatnonzero(ids == self.eos_id)
        truncated = not len(ends)  # generate only stops a row early at its end token
        if not truncated:
            ids = ids[: ends[0] + 1]
        ids = ids.astype(np.int64)
        return Generation(ids, self.tokenizer.decode(ids.tolist(), skip_special_tokens=False), truncated)


# --------------------------------------------------------------------------- parsing + decoding


class ActionDecoder:
    """Codebook ids -> trajectory ``(10,3)``: the tokenizer package's decode (rolled out from the origin)."""

    def __init__(self, codebook: Any) -> None:
        from tokenizer.tokenizer import ActionTokenizer

        self.tokenizer = ActionTokenizer(codebook)

    @property
    def num_tokens(self) -> int:
        return int(self.tokenizer.k)

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int64)[None])[0]

    @classmethod
    def from_codebook(cls, codebook_dir: str | Path) -> ActionDecoder:
        """Load (and validate) ``codebook.safetensors`` + ``codebook.json``."""
        from tokenizer.codebook import load_codebook

        return cls(load_codebook(codebook_dir))

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, dt: float = 0.5) -> ActionDecoder:
        """A decoder over ``tokens (K,3)`` (dx, dy, dtheta) without a codebook file (tests, tools)."""
        from pipelines.geometry import VEHICLE_LENGTH, VEHICLE_WIDTH
        from tokenizer.codebook import Codebook, CodebookMeta

        meta = CodebookMeta(k=len(tokens), tol=0.0, vehicle_length=VEHICLE_LENGTH, vehicle_width=VEHICLE_WIDTH,
                            dt=dt, seed=0)
        return cls(Codebook.from_tokens(np.asarray(tokens), meta))


def to_completion(gen: Generation, decoder: ActionDecoder) -> Completion:
    """Parse a generation (answer tag, exactly 10 valid action tokens) and decode its trajectory."""
    mode, ids, errors = parse_completion(gen.text, decoder.num_tokens, FUTURE_STEPS)
    if gen.truncated:
        errors = [*errors, "truncated at max_new_tokens"]
    reasoning = ""
    if THINK_OPEN in gen.text:
        body = gen.text.split(THINK_OPEN, 1)[1]
        reasoning = body.split(THINK_CLOSE, 1)[0].strip()
    ok = not errors
    return Completion(
        text=gen.text,
        think_mode=mode,
        reasoning=reasoning,
        action_ids=tuple(ids) if ok else None,
        trajectory=decoder(ids) if ok else None,
        format_error=None if ok else "; ".join(errors),
        num_tokens=len(gen.token_ids),
        truncated=gen.truncated,
    )


# --------------------------------------------------------------------------- training batches


def collate_sequences(
    examples: Sequence[Mapping[str, Any]], completions: Sequence[np.ndarray], pad_id: int
) -> dict[str, torch.Tensor]:
    """Prompt + completion sequences laid out ``[pad | prompt | completion | pad]``.

    Prompts are left-padded to a common end column, so the completions start
    at the same column and ``logits_to_keep = C + 1`` returns exactly the
    logits that predict them. Returns the model inputs plus
    ``completion_ids (N,C)`` and ``completion_mask (N,C)``.
    """
    n = len(examples)
    p = max(len(e["input_ids"]) for e in examples)
    c = max(1, max(len(x) for x in completions))
    ids = torch.full((n, p + c), pad_id, dtype=torch.long)
    att = torch.zeros((n, p + c), dtype=torch.long)
    mm = torch.zeros((n, p + c), dtype=torch.long)
    comp_mask = torch.zeros((n, c), dtype=torch.float32)
    for i, (e, x) in enumerate(zip(examples, completions, strict=True)):
        lp, lc = len(e["input_ids"]), len(x)
        ids[i, p - lp : p] = torch.from_numpy(np.asarray(e["input_ids"]))
        mm[i, p - lp : p] = torch.from_numpy(np.asarray(e["mm_token_type_ids"]))
        ids[i, p : p + lc] = torch.from_numpy(np.asarray(x, dtype=np.int64))
        att[i, p - lp : p + lc] = 1
        comp_mask[i, :lc] = 1.0
    return {
        "input_ids": ids,
        "attention_mask": att,
        "mm_token_type_ids": mm,
        **video_tensors(examples),
        "completion_ids": ids[:, p:].clone(),
        "completion_mask": comp_mask,
    }


def completion_logprobs(
    model: Any, batch: Mapping[str, torch.Tensor], temperature: float = 1.0, banned_ids: Sequence[int] = ()
) -> torch.Tensor:
    """Per-token log-probs ``(N,C)`` of the completions in a :func:`collate_sequences` batch.

    Logits are divided by the sampling temperature and ``banned_ids`` masked,
    so the ratio and KL refer to the distribution the completions were drawn from.
    """
    from training.grpo_loss import token_logprobs

    c = batch["completion_ids"].shape[1]
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
            "second_per_grid_ts")
    out = model(**{k: batch[k] for k in keys}, use_cache=False, logits_to_keep=c + 1)
    logits = out.logits[:, :c]
    if temperature != 1.0:
        logits = logits / temperature
    if banned_ids:
        logits = logits.clone()
        logits[..., list(banned_ids)] = float("-inf")
    return token_logprobs(logits, batch["completion_ids"])
