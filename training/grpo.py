"""GRPO reinforcement fine-tuning of the driving VLA (AutoVLA's RFT stage).

Launch::

    python -m training.grpo --config configs/train/rft_tiny.yaml [--set key.sub=value ...]   # = make rft
    torchrun --nproc-per-node 8 -m training.grpo --config configs/train/rft_3b.yaml

Per step, for the scenes of this rank (``data.scenes_per_step`` over all ranks):

1. rollouts: G completions per scene (``rollout.num_generations``, independent
   of the GPU count), dropout off, per-sample seeds (training/rollout.py);
2. rewards: parsed, decoded with the codebook and scored on CPU workers
   (training/rewards/); failed rewards are excluded and counted, never 0;
3. advantages per scene group; groups without reward spread get advantage 0
   and stay in the loss normaliser and the KL term (TRL's policy; see
   training/grpo_loss.py); ``sequences_with_signal`` logs the effective batch;
4. ``loss.num_iterations`` clipped policy updates over micro-batches with the
   token-level normalised loss (training/grpo_loss.py); KL to the reference
   = the same model with the LoRA adapter disabled (no second copy).

Shortcuts taken, on purpose: the vision tower runs once per sequence (not
once per scene) in the update passes; groups stay on one rank, so advantages
need no communication; a rank with fewer micro-batches than another runs
zero-weight passes so DDP/FSDP2 collectives line up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from annotators.training_prompt import CAMERAS_FOR_MODEL
from pipelines.config import dump_config, load_config
from training.cli import emit
from training.config import CONFIG_DIR
from training.grpo_loss import LossConfig, group_advantages, grpo_loss
from training.model import LORA_TARGETS, ModelConfig, load_model, read_num_action_tokens
from training.rewards import RewardRunner, RewardsConfig
from training.rewards.base import Completion
from training.rollout import (
    ActionDecoder,
    Generation,
    RolloutConfig,
    collate_sequences,
    completion_logprobs,
    make_backend,
    sample_seed,
    to_completion,
)
from training.sft import autocast_ctx, init_distributed, parallel_mode, set_cpu_threads, wrap_model

log = logging.getLogger("training.grpo")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RFTDataConfig:
    train_files: str = "data/build/shards/train-*.parquet"  # glob(s), comma separated
    codebook_dir: str = "data/codebook"  # codebook.safetensors + codebook.json (K)
    cameras: tuple[str, ...] = CAMERAS_FOR_MODEL
    scenes_per_step: int = 8  # over all ranks; each scene yields rollout.num_generations completions
    check_stored_messages: bool = True
    shuffle: bool = True


@dataclass(frozen=True)
class RFTOptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.99)
    warmup_steps: int = 0  # linear warmup, then constant
    grad_clip: float = 1.0


@dataclass(frozen=True)
class RFTConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora=True))
    data: RFTDataConfig = field(default_factory=RFTDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    optim: RFTOptimConfig = field(default_factory=RFTOptimConfig)
    out_dir: str = "out/rft"
    max_steps: int = 200
    micro_batch_size: int = 4  # sequences per forward/backward
    seed: int = 0
    precision: str = "bf16"  # bf16 (autocast, or FSDP2 mixed precision) | fp32 (use on CPU)
    parallel: str = "auto"  # auto (torchrun: ddp with LoRA, else fsdp) | ddp | fsdp | none
    disable_dropout: bool = True  # also in the update passes, so ratios compare like with like
    save_every: int = 50
    keep_last: int = 3
    log_every: int = 1
    resume: str = "auto"  # auto (latest in out_dir) | none | <checkpoint dir>
    train_action_tokens: bool = True  # LoRA RFT also trains the K action rows of embed_tokens/lm_head
    eval_files: str = ""  # held-out shards: greedy-decoded and scored before training and every eval_every steps
    eval_every: int = 0  # steps; 0 = only before the first and after the last step (when eval_files is set)
    eval_samples: int = 16  # held-out rows scored per evaluation
    cpu_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default (tiny models: 1 is fastest)

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32") or self.parallel not in ("auto", "ddp", "fsdp", "none"):
            raise ValueError("precision must be bf16|fp32 and parallel auto|ddp|fsdp|none")
        if self.micro_batch_size < 1 or self.data.scenes_per_step < 1:
            raise ValueError("micro_batch_size and data.scenes_per_step must be >= 1")
        if self.model.lora and not self.model.freeze_vision:
            raise ValueError("model.lora=true trains the language model's adapter only; set model.freeze_vision=true")
        if self.loss.kl_beta > 0 and not self.model.lora:
            raise ValueError(
                "loss.kl_beta > 0 needs model.lora=true: the reference policy is the model with its "
                "adapter disabled (no second copy is loaded); set loss.kl_beta=0 for full-parameter RFT"
            )


# --------------------------------------------------------------------------- setup


@dataclass
class Dist:
    """Rank, world size and parallel mode (from training.sft's torchrun setup)."""

    rank: int = 0
    world: int = 1
    mode: str = "none"  # none | ddp | fsdp

    def all_sum(self, values: Sequence[float], device: Any) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()


def apply_rft_lora(model: Any, cfg: ModelConfig, action_ids: Any = None) -> Any:
    """LoRA on the language model's projections, plus the action tokens' rows when ``action_ids`` is given.

    The rest of the embeddings and LM head stay frozen. The K action rows of
    ``embed_tokens`` and ``lm_head`` are trained as peft *trainable tokens*
    (``trainable_token_indices``: a delta on those rows only, part of the
    adapter): without them the policy's only handle on which action token it
    emits is the low-rank update of the last hidden state, and the reference
    policy (adapter disabled, which disables the token deltas too) stays
    exactly the SFT model.
    """
    from peft import LoraConfig, get_peft_model

    extra: dict[str, Any] = {}
    if action_ids is not None:
        rows = list(range(action_ids.first, action_ids.first + action_ids.count))
        extra["trainable_token_indices"] = {"embed_tokens": rows}
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is not emb.weight:  # tied: peft follows embed_tokens itself
            extra["trainable_token_indices"]["lm_head"] = rows
    lcfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=r".*language_model.*\.(" + "|".join(LORA_TARGETS) + ")",
        **extra,
    )
    return get_peft_model(model, lcfg)


def resolve_policy_path(mcfg: ModelConfig) -> Path:
    """``model.path`` as a checkpoint: a run directory (e.g. ``out/sft_tiny``) means its latest step."""
    p = Path(mcfg.path)
    if (p / "checkpoints").is_dir():
        from training.loading import resolve_checkpoint

        return resolve_checkpoint(p)
    if mcfg.build_tiny_if_missing or (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return p
    if p.exists() or p.is_absolute() or p.parts[0] in (".", "..", "out", "data") or Path(p.parts[0]).exists():
        raise FileNotFoundError(f"model.path {p} holds no checkpoint: run `make train` first (or point "
                                "model.path at a checkpoint / run directory)")
    return p  # a Hub id


def load_policy(cfg: RFTConfig, num_action_tokens: int, device: torch.device) -> tuple[Any, Any]:
    """The SFT model (merging an SFT LoRA checkpoint first) plus a fresh RFT LoRA when ``model.lora``.

    The processor (pixel budget) is the checkpoint's: with an SFT LoRA
    checkpoint it is read from the checkpoint directory, not the base model.
    """
    from training.vision import ClipProcessor

    path = resolve_policy_path(cfg.model)
    base_cfg = replace(cfg.model, path=str(path), lora=False)
    if (path / "adapter_config.json").is_file():  # an SFT LoRA checkpoint: base + adapter, merged
        from peft import PeftModel

        base = (path / "base_model.txt").read_text().strip() if (path / "base_model.txt").is_file() else ""
        if not base:
            raise FileNotFoundError(f"LoRA checkpoint {path} has no base_model.txt naming its base model")
        model, _, ids = load_model(replace(base_cfg, path=base, min_pixels=None, max_pixels=None),
                                   num_action_tokens)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        processor = ClipProcessor.from_pretrained(path, min_pixels=cfg.model.min_pixels,
                                                  max_pixels=cfg.model.max_pixels)
    else:
        model, processor, ids = load_model(base_cfg, num_action_tokens)
    if cfg.disable_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if cfg.model.lora:
        mcfg = replace(cfg.model, lora_dropout=0.0) if cfg.disable_dropout else cfg.model
        model = apply_rft_lora(model, mcfg, ids if cfg.train_action_tokens else None)
    return model.to(device), processor


def _inner(model: Any) -> Any:
    return getattr(model, "module", model)


def reference_context(model: Any) -> contextlib.AbstractContextManager:
    """The reference policy: the same weights with the LoRA adapter disabled."""
    inner = _inner(model)
    if not hasattr(inner, "disable_adapter"):
        raise ValueError("loss.kl_beta > 0 needs model.lora=true (the reference is the model without the adapter)")
    return inner.disable_adapter()


# --------------------------------------------------------------------------- one step


ScoreFn = Callable[[Sequence[Mapping[str, Any]], Sequence[Completion]], Any]


@dataclass
class Trainer:
    """Everything one GRPO step needs; ``step()`` is the algorithm."""

    cfg: RFTConfig
    model: Any
    tokenizer: Any
    decoder: ActionDecoder
    score: ScoreFn  # (rows, completions) -> RewardResult-like (total, components, failed, failures)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dist: Dist = field(default_factory=Dist)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self.backend = make_backend(self.cfg.rollout, self.model, self.tokenizer, self.device, self.dist.mode,
                                    self.dist.world, out_dir=self.cfg.out_dir, model_cfg=self.cfg.model,
                                    cameras=self.cfg.data.cameras, precision=self.cfg.precision)
        self.pad_id = int(self.tokenizer.pad_token_id)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_ctx(self.cfg, self.dist.mode, self.device)  # type: ignore[arg-type]

    def step(self, step: int, rows: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]],
             scene_ids: Sequence[int]) -> dict[str, float]:
        cfg, G = self.cfg, self.cfg.rollout.num_generations
        t0 = time.perf_counter()
        seeds = [[sample_seed(cfg.seed, step, int(s), g) for g in range(G)] for s in scene_ids]
        with self.autocast():
            gens = self.backend.generate(rows, examples, seeds)
        t_gen = time.perf_counter() - t0
        flat = [(i, g) for i in range(len(rows)) for g in gens[i]]
        comps = [to_completion(g, self.decoder) for _, g in flat]
        res = self.score([rows[i] for i, _ in flat], comps)
        t_rew = time.perf_counter() - t0 - t_gen
        adv = group_advantages(res.total, G, scale_by_std=cfg.loss.scale_by_std, eps=cfg.loss.eps)
        truncated = np.array([g.truncated for _, g in flat])
        train = adv.valid & ~(truncated & cfg.loss.mask_truncated)
        # Zero-advantage sequences only matter through the KL term: without it they are left out of
        # the forward passes but still counted in the token normaliser (same loss, less compute).
        forward = train if cfg.loss.kl_beta > 0 else train & adv.signal
        upd = self.update([examples[i] for i, _ in flat], [g.token_ids for _, g in flat], adv.advantages, forward,
                          normaliser=train)
        m = self.metrics(res, comps, adv, train, truncated)
        m.update(upd, time_generate=t_gen, time_reward=t_rew, time_step=time.perf_counter() - t0)
        return m

    # ------------------------------------------------------------------ update
    def _micro_batches(self, keep: np.ndarray) -> list[tuple[list[int], float]]:
        """Micro-batches of the sequences to train on, padded with zero-weight ones to the global count."""
        idx = np.flatnonzero(keep).tolist()
        mbs = [(idx[s : s + self.cfg.micro_batch_size], 1.0) for s in range(0, len(idx), self.cfg.micro_batch_size)]
        most = len(mbs)
        if self.dist.world > 1:
            t = torch.tensor([most], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            most = int(t.item())
        filler = idx[:1] or [0]  # any sequence, weighted 0, keeps the collectives in step
        return mbs + [(filler, 0.0)] * (most - len(mbs))

    def _logprobs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            return completion_logprobs(self.model, batch, self.cfg.rollout.temperature, self.backend.banned_ids)

    def update(self, examples: Sequence[Mapping[str, Any]], completions: Sequence[np.ndarray],
               advantages: np.ndarray, keep: np.ndarray, normaliser: np.ndarray | None = None) -> dict[str, float]:
        """Policy updates on the ``keep`` sequences; the loss is divided by the completion tokens of
        ``normaliser`` (default ``keep``) over all ranks."""
        cfg = self.cfg
        mbs = self._micro_batches(keep)
        norm = keep if normaliser is None else normaliser
        local_tokens = float(sum(len(completions[i]) for i in np.flatnonzero(norm)))
        batches = []
        for ids, w in mbs:
            b = collate_sequences([examples[i] for i in ids], [completions[i] for i in ids], self.pad_id)
            b = {k: v.to(self.device) for k, v in b.items()}
            b["completion_mask"] = b["completion_mask"] * w
            b["advantages"] = torch.tensor(advantages[ids], dtype=torch.float32, device=self.device)
            batches.append(b)
        tokens = self.dist.all_sum([local_tokens], self.device)[0]
        fwd_tokens = self.dist.all_sum([float(sum(b["completion_mask"].sum().item() for b in batches))],
                                       self.device)[0]
        out = {"loss": 0.0, "grad_norm": 0.0, "tokens_trained": tokens}
        if fwd_tokens == 0:  # no sequence with a gradient on any rank: nothing to learn from this batch
            return out
        self.model.train()
        if cfg.loss.kl_beta > 0:
            with torch.no_grad(), reference_context(self.model):
                for b in batches:
                    b["ref_logp"] = self._logprobs(b).float()
        sums = {"kl_sum": 0.0, "clip_low_sum": 0.0, "clip_high_sum": 0.0, "ratio_sum": 0.0, "tokens": 0.0}
        for it in range(cfg.loss.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for j, b in enumerate(batches):
                sync = j == len(batches) - 1 or self.dist.mode != "ddp"
                ctx = contextlib.nullcontext() if sync else self.model.no_sync()
                with ctx:
                    logp = self._logprobs(b).float()
                    if it == 0:  # the policy that sampled (no update yet): stored for later iterations,
                        b["old_logp"] = logp.detach()  # so the first ratio is exactly 1
                    loss, st = grpo_loss(logp, b["old_logp"], b["advantages"], b["completion_mask"], cfg.loss,
                                         ref_logp=b.get("ref_logp"), num_tokens=tokens)
                    # DDP/FSDP average gradients over ranks; the loss is normalised by the global count
                    (loss * self.dist.world).backward()
                out["loss"] += float(loss.item())
                for k, v in st.items():
                    sums[k] += float(v.item())
            params = [p for p in self.model.parameters() if p.requires_grad]
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            out["grad_norm"] = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)  # FSDP2
            self.optimizer.step()
        self.scheduler.step()  # once per GRPO step: optim.warmup_steps counts steps, not iterations
        tot = self.dist.all_sum([sums[k] for k in sums], self.device)
        sums = dict(zip(sums, tot, strict=True))
        n = max(sums["tokens"], 1.0)
        out["loss"] = self.dist.all_sum([out["loss"]], self.device)[0] / cfg.loss.num_iterations
        out.update(clip_low_frac=sums["clip_low_sum"] / n, clip_high_frac=sums["clip_high_sum"] / n,
                   ratio_mean=sums["ratio_sum"] / n, lr=self.scheduler.get_last_lr()[0])
        if cfg.loss.kl_beta > 0:
            out["kl"] = sums["kl_sum"] / n
        return out

    # ------------------------------------------------------------------ metrics
    def metrics(self, res: Any, comps: Sequence[Completion], adv: Any, train: np.ndarray,
                truncated: np.ndarray) -> dict[str, float]:
        """Per-step figures summed over ranks: reward components, format, slow share, lengths, drops.

        Reward components are NaN where they do not apply (e.g. driving rewards of a
        malformed completion): each ``reward/<name>`` is the mean over the completions
        it applied to, ``reward/<name>_count`` how many those were.
        """
        names = sorted(res.components)
        n = len(comps)
        vals = [float(n)]
        for k in names:  # components are NaN where not applicable: mean over applicable items
            v = np.asarray(res.components[k], dtype=np.float64)
            vals += [float(np.nansum(v)), float((~np.isnan(v)).sum())]
        total = np.asarray(res.total, dtype=np.float64)
        vals += [float(np.nansum(total)), float((~np.isnan(total)).sum()), float(res.failed.sum()),
                 float(sum(c.is_slow for c in comps)), float(sum(c.format_error is None for c in comps)),
                 float(sum(c.num_tokens for c in comps)), float(truncated.sum()), float(adv.zero_spread_groups),
                 float(adv.num_groups), float(train.sum()), float((train & adv.signal).sum())]
        tot = self.dist.all_sum(vals, self.device)
        n = tot[0]
        out = {}
        for j, k in enumerate(names):  # NaN (not 0) when no completion of the step had the reward
            count = tot[2 + 2 * j]
            out[f"reward/{k}"] = tot[1 + 2 * j] / count if count else math.nan
            out[f"reward/{k}_count"] = count
        rest = tot[1 + 2 * len(names) :]
        out.update({
            "reward/total": rest[0] / rest[1] if rest[1] else math.nan,
            "reward/total_count": rest[1],
            "reward_failed": rest[2],
            "slow_share": rest[3] / n,
            "format_ok_share": rest[4] / n,
            "completion_tokens_mean": rest[5] / n,
            "truncated_share": rest[6] / n,
            "zero_spread_groups": rest[7],
            "groups": rest[8],
            "sequences_trained": rest[9],  # in the loss (normaliser, KL)
            "sequences_with_signal": rest[10],  # the effective batch: non-zero advantage
        })
        return out


# --------------------------------------------------------------------------- held-out reward


@torch.no_grad()
def heldout_reward(trainer: Trainer, rows: Any, n: int) -> dict[str, float]:
    """Greedy-decode the first ``n`` held-out rows and score them with the training rewards.

    Returns ``eval/reward_total`` (mean total reward), ``eval/reward_driving``
    (mean driving reward; malformed outputs get ``rewards.invalid_driving``)
    and ``eval/format_ok_share``: the learning signal RFT is meant to raise,
    measured on scenes it never trains on.
    """
    from training.data import collate
    from training.eval import generate

    model = _inner(trainer.model)
    was = model.training
    model.eval()
    comps, metas = [], []
    bs = trainer.cfg.rollout.generation_batch_size
    for s in range(0, min(n, len(rows)), bs):
        exs = [rows[i] for i in range(s, min(s + bs, n, len(rows)))]
        batch = collate(exs, trainer.pad_id, padding_side="left")
        with trainer.autocast():
            texts = generate(model, batch, trainer.tokenizer, trainer.cfg.rollout.max_new_tokens)
        for text, ex in zip(texts, exs, strict=True):
            ids = trainer.tokenizer(text, add_special_tokens=False)["input_ids"]
            gen = Generation(np.asarray(ids, np.int64), text, "<|im_end|>" not in text)
            comps.append(to_completion(gen, trainer.decoder))
            metas.append(ex["meta"])
    model.train(was)
    res = trainer.score(metas, comps)
    driving = np.asarray(res.components.get("driving", np.full(len(comps), np.nan)), np.float64)
    total = np.asarray(res.total, np.float64)
    return {"eval/reward_total": float(np.nanmean(total)), "eval/reward_driving": float(np.nanmean(driving)),
            "eval/format_ok_share": float(np.mean([c.format_error is None for c in comps])),
            "eval/samples": float(len(comps))}


# --------------------------------------------------------------------------- the run


def json_line(metrics: Mapping[str, Any]) -> str:
    """Strict JSON: a NaN/inf figure (e.g. a reward no completion had) is written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    return json.dumps(clean, allow_nan=False)


def build_optimizer(model: Any, cfg: RFTOptimConfig) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    warm = max(cfg.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def train(cfg: RFTConfig) -> dict[str, float]:
    """Run GRPO per ``cfg``; returns the last step's metrics."""
    from training.checkpoint import (
        latest_checkpoint,
        load_adapter,
        load_train_state,
        restore_optimizer,
        save_checkpoint,
    )
    from training.data import BuiltRows, LengthGroupedBatchSampler, ShardIndex

    rank, world, device = init_distributed()
    set_cpu_threads(cfg.cpu_threads, device)
    dist = Dist(rank, world, parallel_mode(cfg, world))  # type: ignore[arg-type]
    torch.manual_seed(cfg.seed)
    k = cfg.model.num_action_tokens or read_num_action_tokens(cfg.data.codebook_dir)
    decoder = ActionDecoder.from_codebook(cfg.data.codebook_dir)
    if decoder.num_tokens != k:
        raise ValueError(f"codebook {cfg.data.codebook_dir} has {decoder.num_tokens} tokens, the model {k}")
    if cfg.data.scenes_per_step % dist.world:
        raise ValueError(f"data.scenes_per_step={cfg.data.scenes_per_step} does not split over {dist.world} ranks")
    ckpt = None if cfg.resume == "none" else (latest_checkpoint(cfg.out_dir) if cfg.resume == "auto" else Path(cfg.resume))
    policy_cfg = cfg
    if ckpt is not None and not cfg.model.lora:  # full-parameter RFT: the checkpoint is the whole policy
        policy_cfg = replace(cfg, model=replace(cfg.model, path=str(ckpt), build_tiny_if_missing=False))
    model, processor = load_policy(policy_cfg, k, device)
    policy_path = resolve_policy_path(cfg.model) if cfg.model.lora else Path(cfg.model.path)
    if ckpt is not None and cfg.model.lora:
        load_adapter(model, ckpt)
    model = wrap_model(model, dist.mode, cfg, device)  # type: ignore[arg-type]
    optimizer, scheduler = build_optimizer(model, cfg.optim)

    index = ShardIndex.from_glob(cfg.data.train_files)
    rows = BuiltRows(index, processor, num_action_tokens=k, cameras=cfg.data.cameras, with_target=False,
                     check_stored_messages=cfg.data.check_stored_messages)
    per_rank = cfg.data.scenes_per_step // dist.world
    sampler = LengthGroupedBatchSampler(index, per_rank, rank=dist.rank, world_size=dist.world, group_size=1,
                                        shuffle=cfg.data.shuffle, seed=cfg.seed)
    if len(sampler) == 0:
        raise ValueError(f"{len(index)} rows in {cfg.data.train_files} do not fill one step of {per_rank} scenes/rank")

    start, epoch, batch_pos, failures = 0, 0, 0, {}
    if ckpt is not None:
        state = load_train_state(ckpt)
        restore_optimizer(model, optimizer, scheduler, state)
        start, epoch, batch_pos = int(state["step"]), int(state["epoch"]), int(state["batch"])
        failures = dict(json.loads(state.get("reward_failures", "{}")))
        log.info("resumed from %s at step %d", ckpt, start)

    runner = RewardRunner(cfg.rewards)
    runner.failures_total.update(failures)
    trainer = Trainer(cfg, model, processor.tokenizer, decoder, runner.score, optimizer, scheduler, dist, device)
    out = Path(cfg.out_dir)
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "rft_config.yaml")
    eval_rows = None
    if cfg.eval_files and dist.rank == 0:
        eval_rows = BuiltRows(ShardIndex.from_glob(cfg.eval_files), processor, num_action_tokens=k,
                              cameras=cfg.data.cameras, with_target=False,
                              check_stored_messages=cfg.data.check_stored_messages)

    def run_eval(at_step: int) -> None:
        if eval_rows is None:
            return
        ev = heldout_reward(trainer, eval_rows, cfg.eval_samples)
        ev["eval_step"] = at_step
        log.info("held-out at step %d: %s", at_step, " ".join(f"{k2}={v:.4g}" for k2, v in sorted(ev.items())))
        with open(out / "eval.jsonl", "a") as f:
            f.write(json_line(ev) + "\n")

    if start == 0:
        run_eval(0)
    metrics: dict[str, float] = {}
    sampler.set_epoch(epoch, batch_pos)
    it = iter(sampler)
    try:
        for step in range(start, cfg.max_steps):
            idx = next(it, None)
            if idx is None:
                epoch, batch_pos = epoch + 1, 0
                sampler.set_epoch(epoch)
                it = iter(sampler)
                idx = next(it)
            batch_pos += 1
            examples = [rows[i] for i in idx]
            metas = [e["meta"] for e in examples]
            if cfg.rollout.backend == "vllm":  # the engine takes the camera frames, not the learner's patches
                metas = [dict(m, cameras=rows.raw_row(i)["cameras"]) for m, i in zip(metas, idx, strict=True)]
            metrics = trainer.step(step, metas, examples, idx)
            metrics["step"] = step + 1
            if dist.rank == 0 and (step + 1) % cfg.log_every == 0:
                log.info("step %d %s", step + 1, " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json_line(metrics) + "\n")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
                state = {"step": step + 1, "epoch": epoch, "batch": batch_pos,
                         "reward_failures": json.dumps(dict(runner.failures_total))}
                save_checkpoint(cfg.out_dir, step + 1, model, optimizer, scheduler, processor, state, cfg,
                                rank=dist.rank, keep_last=cfg.keep_last, base_model_path=str(policy_path))
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.max_steps:
                run_eval(step + 1)
    finally:
        runner.close()
        if dist.world > 1:
            torch.distributed.destroy_process_group()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.grpo",
        description="GRPO reinforcement fine-tuning with driving rewards (RFS, ADE, collision, PDM).",
    )
    ap.add_argument("--config", default=str(CONFIG_DIR / "rft_tiny.yaml"), help="RFT YAML config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set rollout.num_generations=16 (repeatable)")
    args, extra = ap.parse_known_args(argv)
    overrides = list(args.overrides) + [a for a in extra if a.startswith("--") and "=" in a]
    unknown = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if unknown:
        ap.error(f"unrecognised arguments {unknown}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(RFTConfig, args.config, overrides)
    m = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        emit(json_line({k: round(v, 5) if isinstance(v, float) else v for k, v in m.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
