"""Resumable checkpoints: safetensors weights + config + tokenizer/processor + optimizer/data state.

Layout of ``<out_dir>/checkpoints/step_0000123/``:

* ``model.safetensors`` + ``config.json`` + ``generation_config.json`` (full
  model; loads with ``Qwen2_5_VLForConditionalGeneration.from_pretrained``),
  or with LoRA ``adapter_model.safetensors`` + ``adapter_config.json`` on top
  of ``base_model.txt`` (the base model: absolute path when local, else the
  Hub id; the same in the adapter's ``base_model_name_or_path``);
* tokenizer files with the added ``<action_i>`` tokens and
  ``clip_processor.json`` (the pixel budget), so RFT/eval read identical inputs;
* ``train_state.pt``: optimizer (full, FQN-keyed, via
  ``torch.distributed.checkpoint.state_dict`` so it works for plain, DDP and
  FSDP2 models), scheduler, step, data position (epoch, batch) and every
  rank's RNG states (a resume needs the same world size).
  It is our own data: loaded with ``torch.load(weights_only=True)``. Before
  the first optimizer step the optimizer state is saved as ``None`` (saving
  must not change training: no zero-gradient initialisation step);
* ``train_config.yaml``: the resolved config.

Directories are written under ``.tmp`` and renamed when complete, so a crash
never leaves a half checkpoint that ``latest_checkpoint`` would pick.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAIN_STATE = "train_state.pt"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def full_state_dicts(model: Any, optimizer: Any | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Full (unsharded, CPU) model and optimizer state dicts; collective under FSDP2 (call on all ranks)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    # Before the first optimizer step the state is empty, and get_optimizer_state_dict would
    # initialise it by running step() on zero gradients (torch's _init_optim_state): Adam's step
    # count becomes 1 and the first real update comes out ~26% smaller. Save "no state" instead.
    osd = None
    if optimizer is not None and optimizer.state:
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
    return msd, osd


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    processor: Any,
    train_state: dict[str, Any],
    config: Any,
    *,
    rank: int = 0,
    keep_last: int = 3,
    base_model_path: str | None = None,
) -> Path | None:
    """Write ``step_<n>`` (rank 0 writes; every rank must call it under FSDP2)."""
    from pipelines.config import dump_config

    inner = getattr(model, "module", model)  # DDP
    msd, osd = full_state_dicts(inner, optimizer)
    rng = _gather_rng_states()
    final = checkpoint_root(out_dir) / f"step_{step:07d}"
    if rank != 0:
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if _is_peft(inner):
        base = resolve_base_model(base_model_path)
        for pc in inner.peft_config.values():  # adapter_config.json names the base (absolute when local)
            pc.base_model_name_or_path = base
        inner.save_pretrained(tmp, state_dict=msd)  # peft extracts the adapter + modules_to_save
        (tmp / "base_model.txt").write_text(base)
    else:
        inner.save_pretrained(tmp, state_dict=msd, safe_serialization=True)
    processor.save_pretrained(tmp)
    state = dict(train_state)
    state.update(optimizer=osd, scheduler=scheduler.state_dict(), **rng)
    torch.save(state, tmp / TRAIN_STATE)
    dump_config(config, tmp / "train_config.yaml")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    log.info("saved checkpoint %s", final)
    _prune(out_dir, keep_last)
    return final


def resolve_base_model(path: str | Path | None) -> str:
    """A local base model as an absolute path (the checkpoint loads from any directory); a Hub id as is."""
    if not path:
        return ""
    p = Path(path)
    return str(p.resolve()) if p.exists() else str(path)


def _gather_rng_states() -> dict[str, list[torch.Tensor]]:
    """Every rank's CPU (and CUDA) RNG state, indexed by rank; collective when distributed.

    Ranks consume their RNG differently (dropout over different batch shapes), so
    one rank's state restored on all would not resume the others exactly.
    """
    import torch.distributed as dist

    mine = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["rng_cuda"] = torch.cuda.get_rng_state()
    if not dist.is_initialized():
        return {k: [v] for k, v in mine.items()}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {k: [r[k] for r in every] for k in mine}


def _prune(out_dir: str | Path, keep_last: int) -> None:
    root = checkpoint_root(out_dir)
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, p in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def load_train_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {TRAIN_STATE} (not a training checkpoint?)")
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_optimizer(model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """Load the full optimizer state (sharded again under FSDP2), scheduler and RNG states."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(model, "module", model)
    if state["optimizer"] is not None:  # None: saved before the first optimizer step (nothing to restore)
        set_optimizer_state_dict(
            inner, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
    scheduler.load_state_dict(state["scheduler"])
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(state["rng_cpu"]) != world:
        raise ValueError(f"checkpoint holds RNG states of {len(state['rng_cpu'])} ranks, this run has {world}: "
                         "an exact resume needs the same world size")
    torch.set_rng_state(state["rng_cpu"][rank])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng_cuda"][rank])


def load_adapter(model: Any, ckpt: str | Path) -> None:
    """Load a LoRA checkpoint's adapter (and modules_to_save) into an already wrapped peft model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(ckpt) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"LoRA checkpoint {ckpt} has no adapter_model.safetensors")
    res = set_peft_model_state_dict(model, load_file(str(path)))
    if getattr(res, "unexpected_keys", None):
        raise ValueError(f"{path}: unexpected keys {res.unexpected_keys[:5]}")
