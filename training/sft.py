"""Supervised fine-tuning of Qwen2.5-VL with action tokens (DESIGN.md section 9).

Launch (the config's paths are relative to the working directory):

    # CPU, tiny random model, demo dataset (what `make train` runs)
    python -m training.sft --config configs/train/sft_tiny.yaml
    python -m training.sft --config configs/train/sft_tiny.yaml --set max_steps=50 --set optim.lr=1e-3

    # one node, 8 GPUs, FSDP2 full fine-tuning
    torchrun --standalone --nproc_per_node=8 -m training.sft --config configs/train/sft_8xgpu.yaml

    # several nodes (run on every node; same rendezvous endpoint)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        --rdzv_id=sft1 -m training.sft --config configs/train/sft_multinode.yaml

What one optimizer step does: every rank takes ``optim.grad_accum``
micro-batches from its length-grouped sampler, the loss denominators of the
whole global batch are all-reduced first (exact normalisation, see
``training/loss.py``), then forward/backward per micro-batch (gradient sync
only on the last), clip by global norm, AdamW, cosine LR with warmup.

Parallelism (``parallel``): ``fsdp`` shards every decoder layer and vision
block with FSDP2 ``fully_shard`` (bf16 params/compute, fp32 reductions and
fp32 master weights); ``ddp`` (LoRA: the trainable part is small) replicates;
``auto`` picks fsdp for full fine-tuning and ddp for LoRA when more than one
process runs. Single process runs bf16 autocast on GPU, fp32 on CPU when
``precision=fp32``.

Shortcuts taken: no sequence packing (length-grouped batches instead); the
MFU estimate counts 6 * (language-model params) per token plus 2 * (vision
params) per vision patch; in-training eval runs on rank 0 only and is not
available with FSDP (use ``python -m training.eval --checkpoint ...``).
Checkpoints (``training/checkpoint.py``) resume exactly: same data order,
optimizer, scheduler and RNG.

Reused by ``training/grpo.py``: ``init_distributed``, ``parallel_mode``,
``wrap_model`` and ``autocast_ctx`` (they read ``cfg.parallel``,
``cfg.precision`` and ``cfg.model.lora`` only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipelines.config import dump_config, load_config, to_dict
from training import checkpoint as ckpt
from training.cli import emit
from training.config import CONFIG_DIR, TrainConfig
from training.data import BuiltRows, LengthGroupedBatchSampler, ShardIndex, collate, model_batch
from training.loss import Denominators, keep_positions, local_denominators, sft_loss
from training.model import (
    ActionIds,
    language_layers,
    load_model,
    read_num_action_tokens,
    vision_tower,
)

log = logging.getLogger("training.sft")


# --------------------------------------------------------------------------- distributed setup


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():  # idempotent: GRPO and tests may call it again
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def set_cpu_threads(n: int, device: torch.device) -> None:
    """Intra-op threads on CPU: on a tiny model extra threads only add synchronisation (measured on
    2 shared cores: forward+backward of 8 demo rows 5.6 s with 2 threads, 0.15 s with 1)."""
    if n > 0 and device.type == "cpu":
        torch.set_num_threads(n)


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if dist.is_initialized():
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()


def parallel_mode(cfg: TrainConfig, world: int) -> str:
    if cfg.parallel != "auto":
        return cfg.parallel if world > 1 or cfg.parallel == "none" else "none"
    if world == 1:
        return "none"
    return "ddp" if cfg.model.lora else "fsdp"


def wrap_model(model: Any, mode: str, cfg: TrainConfig, device: torch.device) -> Any:
    """FSDP2 per decoder layer / vision block, or DDP, or nothing."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = cfg.precision == "bf16"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for block in vision_tower(model).blocks:
            fully_shard(block, mp_policy=mp)
        for layer in language_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def autocast_ctx(cfg: TrainConfig, mode: str, device: torch.device) -> Any:
    if cfg.precision == "bf16" and mode != "fsdp":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine_lr(step: int, cfg: TrainConfig) -> float:
    """LR multiplier: linear warmup to 1, cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    frac = min(1.0, (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


# --------------------------------------------------------------------------- one step


def train_step(
    model: Any,
    micro: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    ids: ActionIds,
    mode: str,
    world: int,
    device: torch.device,
) -> dict[str, float]:
    """Accumulate over ``micro`` (this rank's share of the global batch), clip, step."""
    lc = cfg.loss
    den = all_reduce_sum(local_denominators(micro, lc.slow_weight, ids.first, ids.count, lc.weighting), device)
    denom = Denominators(lm=float(den[0]), action=float(den[1]))
    sums = torch.zeros(6, dtype=torch.float64)
    for k, mb in enumerate(micro):
        last = k == len(micro) - 1
        sync = contextlib.nullcontext()
        if mode == "ddp" and not last:
            sync = model.no_sync()
        elif mode == "fsdp":
            model.set_requires_gradient_sync(last)
        with sync:
            with autocast_ctx(cfg, mode, device):
                out = model(**model_batch(mb, device), logits_to_keep=keep_positions(mb["labels"]).to(device),
                            use_cache=False)
            loss, parts = sft_loss(out.logits, mb["labels"].to(device), mb["is_slow"], denom,
                                   slow_weight=lc.slow_weight, action_weight=lc.action_weight,
                                   first_action_id=ids.first, num_action_tokens=ids.count,
                                   weighting=lc.weighting)
            # DDP/FSDP average gradients over ranks; the loss is a global sum, so scale back.
            (loss * world).backward()
        sums += torch.tensor([loss.item(), parts["lm_sum"].item(), parts["act_sum"].item(),
                              parts["action_tokens"].item(), parts["action_correct"].item(),
                              float(mb["attention_mask"].sum())], dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    if hasattr(gnorm, "full_tensor"):
        gnorm = gnorm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums = all_reduce_sum(sums, device)
    return {
        "loss": float(sums[0]),
        "lm_loss": float(sums[1]) / max(denom.lm, 1e-12),
        "action_loss": float(sums[2]) / max(denom.action, 1e-12),
        "action_acc": float(sums[4]) / max(float(sums[3]), 1.0),
        "tokens": float(sums[5]),
        "grad_norm": float(gnorm),
        "lr": scheduler.get_last_lr()[0],
    }


# --------------------------------------------------------------------------- the run


def _flops_per_token(model: Any) -> tuple[float, float]:
    """(LM params, vision params) for the MFU estimate."""
    vis = sum(p.numel() for p in vision_tower(model).parameters())
    return float(sum(p.numel() for p in model.parameters()) - vis), float(vis)


def _loggers(cfg: TrainConfig, rank: int) -> list[Any]:
    out: list[Any] = []
    if rank != 0:
        return out
    if cfg.wandb_project:
        try:
            import wandb
        except ImportError:
            raise ImportError("wandb_project is set but wandb is not installed: pip install wandb") from None
        out.append(wandb.init(project=cfg.wandb_project, config=to_dict(cfg)))
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        out.append(SummaryWriter(str(Path(cfg.out_dir) / "tb")))
    return out


def _emit(loggers: list[Any], metrics: dict[str, float], step: int) -> None:
    for lg in loggers:
        if hasattr(lg, "add_scalar"):
            for k, v in metrics.items():
                lg.add_scalar(k, v, step)
        else:
            lg.log(metrics, step=step)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run SFT per ``cfg``; returns the last step's metrics (and ``history`` of logged losses)."""
    rank, world, device = init_distributed()
    set_cpu_threads(cfg.cpu_threads, device)
    torch.manual_seed(cfg.seed)
    mode = parallel_mode(cfg, world)
    if mode == "fsdp" and cfg.eval_every:
        raise ValueError("eval_every needs parallel=ddp|none; evaluate FSDP runs with training.eval")
    out_dir = Path(cfg.out_dir)
    k = cfg.model.num_action_tokens or read_num_action_tokens(Path(cfg.data.data_dir) / "codebook")

    resume = None
    if cfg.resume == "auto":
        resume = ckpt.latest_checkpoint(out_dir)
    elif cfg.resume != "none":
        resume = Path(cfg.resume)
    model_cfg = cfg.model
    if resume is not None and not cfg.model.lora:
        model_cfg = replace(cfg.model, path=str(resume), build_tiny_if_missing=False)
    model, processor, ids = load_model(model_cfg, k, device)
    if resume is not None and cfg.model.lora:
        ckpt.load_adapter(model, resume)
    lm_params, vis_params = _flops_per_token(model)
    model = wrap_model(model, mode, cfg, device)

    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(cosine_lr, cfg=cfg))
    step, epoch, batch_pos = 0, 0, 0
    if resume is not None:
        state = ckpt.load_train_state(resume)
        ckpt.restore_optimizer(model, optimizer, scheduler, state)
        step, epoch, batch_pos = int(state["step"]), int(state["epoch"]), int(state["batch"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume, step, epoch, batch_pos)

    d = cfg.data
    index = ShardIndex.from_glob(d.train_files)
    rows = BuiltRows(index, processor, num_action_tokens=k, cameras=d.cameras,
                     check_stored_messages=d.check_stored_messages, max_length=d.max_length)
    sampler = LengthGroupedBatchSampler(index, d.batch_size, rank=rank, world_size=world,
                                        group_size=d.length_group_size, shuffle=d.shuffle, seed=cfg.seed)
    if len(sampler.global_batches(0)) < world * o.grad_accum:
        raise ValueError(f"{len(index)} training rows are too few for batch_size={d.batch_size} x "
                         f"grad_accum={o.grad_accum} x {world} ranks")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "train_config.yaml")
    loggers = _loggers(cfg, rank)
    pad_id = processor.tokenizer.pad_token_id
    history: list[dict[str, float]] = []
    metrics: dict[str, Any] = {}
    model.train()
    t_log, tok_log, patches_log = time.perf_counter(), 0.0, 0.0
    interval: list[dict[str, float]] = []  # the steps since the last log line (logged as their mean)
    while step < cfg.max_steps and epoch < cfg.epochs:
        sampler.set_epoch(epoch, start_batch=batch_pos)
        loader = torch.utils.data.DataLoader(
            rows, batch_sampler=sampler, collate_fn=partial(collate, pad_id=pad_id),
            num_workers=d.num_workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if d.num_workers else None,
            # Own generator: worker seeding must not draw from the global RNG (dropout), or a resumed
            # run's RNG stream would shift by the loader creation.
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
        )
        it = iter(loader)
        while step < cfg.max_steps:
            micro = [b for _, b in zip(range(o.grad_accum), it, strict=False)]
            if len(micro) < o.grad_accum:  # epoch end: every step has exactly grad_accum micro-batches
                break
            batch_pos += len(micro)
            metrics = train_step(model, micro, optimizer, scheduler, cfg, ids, mode, world, device)
            step += 1
            interval.append(dict(metrics))
            tok_log += metrics["tokens"]
            patches_log += world * sum(float(b["pixel_values_videos"].shape[0]) for b in micro)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                dt = time.perf_counter() - t_log
                flops = 6 * lm_params * tok_log + 2 * vis_params * patches_log
                # loss figures: mean over the interval's steps (one step's loss is noise); lr, grad_norm: last
                for key in ("loss", "lm_loss", "action_loss", "action_acc", "grad_norm"):
                    metrics[key] = sum(m[key] for m in interval) / len(interval)
                metrics["loss_last"] = interval[-1]["loss"]
                metrics.update(step=step, epoch=epoch, tokens_per_s=tok_log / dt, step_time_s=dt / len(interval),
                               mfu=flops / dt / (cfg.peak_tflops * 1e12 * world))
                interval = []
                history.append(dict(metrics))
                if rank == 0:
                    log.info("step %d loss %.4f (lm %.4f action %.4f, acc %.3f) gnorm %.2f lr %.2e %.0f tok/s "
                             "mfu %.3f", step, metrics["loss"], metrics["lm_loss"], metrics["action_loss"],
                             metrics["action_acc"], metrics["grad_norm"], metrics["lr"],
                             metrics["tokens_per_s"], metrics["mfu"])
                    with open(out_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    _emit(loggers, metrics, step)
                t_log, tok_log, patches_log = time.perf_counter(), 0.0, 0.0
            if cfg.eval_every and step % cfg.eval_every == 0 and rank == 0:
                _in_training_eval(model, processor, ids, cfg, step, loggers)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                _save(cfg, step, epoch, batch_pos, model, optimizer, scheduler, processor, rank)
        del it, loader
        epoch, batch_pos = epoch + 1, 0
    if dist.is_initialized():
        dist.barrier()
    metrics["history"] = history
    return metrics


def _save(cfg, step, epoch, batch_pos, model, optimizer, scheduler, processor, rank) -> None:  # noqa: ANN001
    state = {"step": step, "epoch": epoch, "batch": batch_pos}
    ckpt.save_checkpoint(cfg.out_dir, step, model, optimizer, scheduler, processor, state, cfg, rank=rank,
                         keep_last=cfg.keep_last, base_model_path=cfg.model.path)
    if dist.is_initialized():
        dist.barrier()


def _in_training_eval(model, processor, ids, cfg, step, loggers) -> None:  # noqa: ANN001
    from training.eval import evaluate

    inner = getattr(model, "module", model)
    inner.eval()
    res = evaluate(inner, processor, ids, cfg.data.val_files, data_dir=cfg.data.data_dir,
                   cameras=cfg.data.cameras, max_samples=cfg.eval_samples, batch_size=cfg.data.batch_size,
                   max_new_tokens=cfg.max_new_tokens)
    inner.train()
    log.info("eval at step %d: %s", step, json.dumps(res))
    _emit(loggers, {f"eval/{k}": v for k, v in res.items() if isinstance(v, (int, float))}, step)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.sft",
        description="SFT of Qwen2.5-VL with discrete action tokens (see the module docstring for launch "
        "commands). Config: configs/train/*.yaml; every key can be overridden with --set key.sub=value.",
    )
    ap.add_argument("--config", default=str(CONFIG_DIR / "sft_tiny.yaml"), help="YAML config (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set optim.lr=1e-4 --set model.lora=true (repeatable)")
    ap.add_argument("overrides_tail", nargs="*", metavar="KEY=VALUE", help="more overrides (key.sub=value)")
    args = ap.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, [*args.overrides, *args.overrides_tail])
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    metrics = train(cfg)
    if rank == 0:
        emit({k: v for k, v in metrics.items() if k != "history"})
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
