"""Rollouts for GRPO: G sampled completions per scene, parsed and decoded for the rewards.

:class:`RolloutBackend` is what the trainer talks to; :func:`make_backend`
builds the one ``rollout.backend`` names:

- ``hf``: :class:`HFGenerateBackend`, in-process decoding on the learner's
  model with one shared prefill per prompt (the CPU/test backend, and
  single-GPU LoRA runs);
- ``vllm``: ``training.rollout_vllm.VLLMBackend``, a colocated vLLM engine
  or an external vLLM server (experimental: not yet run on a GPU).

Per-sample seeds: completion ``(scene, g)`` is a function of
``(seed, step, scene, g)`` alone (:func:`sample_seed`), never of its batch
neighbours; HF draws its uniforms with ``training.sampling`` on the device,
vLLM takes the seed per request. The model's own generation defaults (e.g.
Qwen's repetition penalty) are never applied, so the sampling distribution
is the policy's (temperature, top-p, vision tokens banned).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from training.sampling import (
    SeededSampler,  # noqa: F401  (re-exported: the reference sampler, see training.sampling)
    device_uniforms,
    processed_logprobs,
    sample_from_logprobs,
    seed_tensor,
)

log = logging.getLogger(__name__)


VLLM_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class VLLMConfig:
    """``rollout.vllm:`` settings, read only with ``rollout.backend: vllm`` (see training/rollout_vllm.py)."""

    mode: str = "colocate"  # colocate (one engine per rank, in-process) | server (external `vllm serve`)
    gpu_memory_utilization: float = 0.3  # colocate: the engine's share of each GPU (weights + KV cache)
    sleep: bool = True  # colocate: free the engine's KV cache (and weights) during the update, wake for rollouts
    tensor_parallel_size: int = 1  # colocate
    max_model_len: int = 0  # 0: the checkpoint's
    server_url: str = "http://127.0.0.1:8000"  # server: base URL of the OpenAI-compatible API
    adapter_dir: str = ""  # where per-step LoRA adapters are written for the engine ("" = <out_dir>/vllm_adapters)
    request_timeout_s: float = 600.0  # server
    check_prompts: bool = True  # the engine's prompt token ids must equal the learner's (same prompt builder)
    # colocate: the engine's weight/compute dtype. "auto": the learner's precision (bf16 -> bfloat16,
    # fp32 -> float32), so sampled log-probs match the learner's; vLLM's own default follows the
    # checkpoint and on CPU is bfloat16 even for a float32 checkpoint. server: set `vllm serve --dtype`.
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("colocate", "server"):
            raise ValueError(f"rollout.vllm.mode must be colocate or server, got {self.mode!r}")
        if not 0 < self.gpu_memory_utilization < 1 or self.tensor_parallel_size < 1:
            raise ValueError("rollout.vllm.gpu_memory_utilization must be in (0, 1), tensor_parallel_size >= 1")
        if self.dtype not in VLLM_DTYPES:
            raise ValueError(f"rollout.vllm.dtype must be one of {list(VLLM_DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class RolloutConfig:
    """``rollout:`` section of the RFT config."""

    backend: str = "hf"  # hf (in-process, shared prefill) | vllm (colocated engine or server; experimental)
    num_generations: int = 8  # G completions per scene, independent of the GPU count
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    generation_batch_size: int = 16  # hf: sequences decoded together (prompts per prefill = this // G)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # used when backend == "vllm"

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"rollout.backend must be hf or vllm, got {self.backend!r}")
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
    logprobs: np.ndarray | None = None  # (C,) float32: the sampler's log-prob of each token (temperature applied)


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


# A completion holding one of these would be read as an image/video placeholder
# when the sequence is fed back for the update; they are never sampled (and
# masked the same way in completion_logprobs, so both see one distribution).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def banned_token_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    unk = getattr(tokenizer, "unk_token_id", None)
    return sorted({int(i) for i in ids if i is not None and i != unk})


class HFGenerateBackend:
    """In-process rollouts on the learner's own model (LoRA/peft, DDP-wrapped or plain).

    One prefill per prompt (vision tower included) serves its G completions:
    the prompt's KV cache is repeated G times (``Cache.batch_repeat_interleave``)
    before the decode loop, instead of ``generate`` re-encoding every copy.
    Decoding is a plain loop over the model's forward with explicit multimodal
    RoPE positions (the prefill's ``get_rope_index`` positions, +1 per step,
    the rule HF's Qwen2.5-VL generation uses), sampling by
    :func:`training.sampling.sample_from_logprobs` with uniforms made on the
    device. The log-probs of the sampled tokens under the sampling
    distribution (temperature, banned ids; before the nucleus cut, as the
    learner computes them) come back with each generation.

    Full-parameter FSDP is refused: decoding a sharded model all-gathers every
    layer at every token (``generate(synced_gpus=True)``); use ``rollout.backend=vllm``.
    """

    def __init__(self, model: Any, tokenizer: Any, cfg: RolloutConfig, device: Any = "cpu") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = torch.device(device)
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_id = int(tokenizer.convert_tokens_to_ids(IM_END))
        self.banned_ids = banned_token_ids(tokenizer)

    def sync_weights(self, model: Any) -> None:
        self.model = model  # same process, same weights

    def uniforms(self, seeds: torch.Tensor, t: int) -> torch.Tensor:
        """Per-row uniforms of decode step ``t`` (a method so tests can feed the reference sampler's).

        The whole ``(N, max_new_tokens)`` table is made at ``t == 0`` in one go, on the device.
        """
        if t == 0:
            self._table = device_uniforms(seeds, torch.arange(self.cfg.max_new_tokens, device=seeds.device))
        return self._table[:, t]

    @torch.no_grad()
    def generate(
        self, rows: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]], seeds: Sequence[Sequence[int]]
    ) -> list[list[Generation]]:
        from training.data import collate, model_batch

        model = getattr(self.model, "module", self.model)  # DDP: run the wrapped module
        was_training = model.training
        model.eval()  # dropout off while sampling
        out: list[list[Generation]] = []
        per_call = max(1, self.cfg.generation_batch_size // max(1, max(len(s) for s in seeds)))
        try:
            for start in range(0, len(examples), per_call):
                idx = list(range(start, min(start + per_call, len(examples))))
                batch = collate([examples[i] for i in idx], self.pad_id, padding_side="left")
                out += self._sample(model, model_batch(batch, self.device), [seeds[i] for i in idx])
        finally:
            model.train(was_training)
        return out

    def _sample(self, model: Any, inputs: dict[str, torch.Tensor], seeds: Sequence[Sequence[int]]) -> list[list[Generation]]:
        cfg = self.cfg
        att = inputs["attention_mask"]
        reps = torch.tensor([len(s) for s in seeds], device=self.device)
        text = (att.cumsum(-1) - 1).masked_fill(att == 0, 0)
        core = _qwen_core(model)
        vision, _ = core.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            video_grid_thw=inputs["video_grid_thw"], second_per_grid_ts=inputs["second_per_grid_ts"],
            attention_mask=att,
        )
        pos = torch.cat([text[None], vision.to(text.dtype)], 0)  # (4, B, P): text positions + 3D RoPE
        res = model(**inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = res.cache if getattr(res, "cache", None) is not None else res.past_key_values
        if bool((reps == reps[0]).all()):
            cache.batch_repeat_interleave(int(reps[0]))  # the shared prefill, G views of it
        else:
            cache.batch_select_indices(torch.arange(len(seeds), device=self.device).repeat_interleave(reps))
        logits = res.logits[:, -1].repeat_interleave(reps, 0)
        att = att.repeat_interleave(reps, 0)
        pos = pos[..., -1:].repeat_interleave(reps, 1)
        sd = seed_tensor([s for row in seeds for s in row], self.device)
        n = sd.shape[0]
        tokens = torch.full((n, cfg.max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        logps = torch.zeros((n, cfg.max_new_tokens), dtype=torch.float32, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        for t in range(cfg.max_new_tokens):
            lp = processed_logprobs(logits, cfg.temperature, self.banned_ids)
            tok = sample_from_logprobs(lp, self.uniforms(sd, t), cfg.top_p)
            tok = tok.masked_fill(done, self.pad_id)
            tokens[:, t] = tok
            logps[:, t] = lp.gather(-1, tok[:, None]).squeeze(-1).masked_fill(done, 0.0)
            done |= tok == self.eos_id
            if t + 1 == cfg.max_new_tokens or bool(done.all()):
                break
            att = torch.cat([att, att.new_ones((n, 1))], 1)
            pos = pos + 1
            res = model(input_ids=tok[:, None], attention_mask=att, position_ids=pos, cache=cache, use_cache=True)
            logits = res.logits[:, -1]
        ids, lps = tokens.cpu().numpy(), logps.cpu().numpy()
        gens, j = [], 0
        for row in seeds:
            gens.append([self._finish(ids[j + g], lps[j + g]) for g in range(len(row))])
            j += len(row)
        return gens

    def _finish(self, ids: np.ndarray, logps: np.ndarray | None = None) -> Generation:
        ends = np.flatnonzero(ids == self.eos_id)
        truncated = not len(ends)  # decoding only stops a row early at its end token
        n = len(ids) if truncated else int(ends[0]) + 1
        ids = ids[:n].astype(np.int64)
        lp = None if logps is None else logps[:n].astype(np.float32)
        return Generation(ids, self.tokenizer.decode(ids.tolist(), skip_special_tokens=False), truncated, lp)


def _qwen_core(model: Any) -> Any:
    """The Qwen2.5-VL backbone (``get_rope_index``) inside a peft/DDP wrapper."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    core = getattr(m, "model", None)
    if core is None or not hasattr(core, "get_rope_index"):
        raise TypeError(f"HF rollouts need a Qwen2.5-VL model (get_rope_index), got {type(m).__name__}")
    return core


def make_backend(cfg: RolloutConfig, model: Any, tokenizer: Any, device: Any, parallel: str = "none",
                 world: int = 1, **vllm_kwargs: Any) -> RolloutBackend:
    """The backend ``rollout.backend`` names; ``parallel``/``world`` from the trainer's setup."""
    if cfg.backend == "vllm":
        from training.rollout_vllm import VLLMBackend

        return VLLMBackend(cfg, model, tokenizer, device, **vllm_kwargs)
    if parallel == "fsdp" and world > 1:
        raise ValueError(
            "rollout.backend=hf cannot sample from a full-parameter FSDP model: every decode step would "
            "all-gather every layer on every rank (generate with synced_gpus). Set rollout.backend=vllm "
            "(weights are gathered once per step and synced to the engine), or use model.lora=true with parallel=ddp"
        )
    return HFGenerateBackend(model, tokenizer, cfg, device)


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
