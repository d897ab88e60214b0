"""Open-loop evaluation on the validation split: greedy decode -> parse -> trajectories -> metrics.

    python -m training.eval --checkpoint out/sft/checkpoints/step_0000200 \\
        --config configs/train/sft_tiny.yaml [--set data.val_files=...] [--max-samples 256]

Metrics (``evaluate`` returns them; the CLI also writes ``<checkpoint>/eval.json``):

* ``malformed_rate``: outputs whose parse reported any error (no answer block,
  not exactly 10 tokens, unknown ids, stray text). Malformed outputs are
  counted, never padded: they are excluded from the trajectory metrics and
  count as wrong in ``action_token_acc``;
* ``ade_{1,2,3,5}s`` / ``fde_{1,2,3,5}s``: L2 position error (m) averaged over
  the steps up to / at the horizon, well-formed outputs only, trajectories
  decoded with the codebook (``tokenizer.ActionTokenizer.decode``);
* ``action_token_acc``: share of the 10 positions equal to the target ids;
* ``meta_action_acc``: (lateral, longitudinal) of the decoded trajectory equal
  to the ground truth's (DESIGN.md section 5 rules); ``think_meta_action_acc``
  the same for the ``Meta-action:`` line of slow outputs;
* ``slow_share``: share of outputs that opened with ``<think>``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from annotators.training_prompt import CAMERAS_FOR_MODEL, parse_completion, parse_meta_action
from pipelines.meta_actions import future_meta_action
from schemas.sample import MODEL_DT
from training.config import CONFIG_DIR
from training.data import BuiltRows, LengthGroupedBatchSampler, ShardIndex, collate, model_batch

log = logging.getLogger(__name__)

HORIZONS_S = (1, 2, 3, 5)
DecodeFn = Callable[[np.ndarray], np.ndarray]  # ids (B,10) -> poses (B,10,3)


def codebook_decoder(data_dir: str | Path) -> DecodeFn:
    """``ActionTokenizer(load_codebook(<data_dir>/codebook)).decode``."""
    from tokenizer.codebook import load_codebook
    from tokenizer.tokenizer import ActionTokenizer

    return ActionTokenizer(load_codebook(Path(data_dir) / "codebook")).decode


@torch.no_grad()
def generate(model: Any, batch: dict[str, Any], tokenizer: Any, max_new_tokens: int, **gen: Any) -> list[str]:
    """Completions (text with special tokens, padding removed) for a left-padded batch.

    Plain greedy decoding: the checkpoint's generation defaults (Qwen ships a 1.05
    repetition penalty) are overridden, since a repeated action token is a valid plan.
    """
    device = next(model.parameters()).device
    inputs = model_batch(batch, device)
    gen = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, **gen}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **gen)
    new = out[:, inputs["input_ids"].shape[1] :]
    pad = tokenizer.pad_token_id
    return [tokenizer.decode([t for t in row.tolist() if t != pad], skip_special_tokens=False) for row in new]


def evaluate(
    model: Any,
    processor: Any,
    ids: Any,
    val_files: str,
    *,
    data_dir: str = "data",
    cameras: tuple[str, ...] = CAMERAS_FOR_MODEL,
    max_samples: int | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 256,
    decode_fn: DecodeFn | None = None,
    check_stored_messages: bool = True,
) -> dict[str, Any]:
    """Greedy-decode the validation rows and return the metrics of the module docstring."""
    decode_fn = decode_fn or codebook_decoder(data_dir)
    index = ShardIndex.from_glob(val_files)
    rows = BuiltRows(index, processor, num_action_tokens=ids.count, cameras=cameras, with_target=False,
                     check_stored_messages=check_stored_messages)
    sampler = LengthGroupedBatchSampler(index, batch_size, shuffle=False, drop_last=False)
    loader = torch.utils.data.DataLoader(
        rows, batch_sampler=sampler,
        collate_fn=partial(collate, pad_id=processor.tokenizer.pad_token_id, padding_side="left"),
    )
    model.eval()
    acc = _Accumulator(ids.count)
    for batch in loader:
        texts = generate(model, batch, processor.tokenizer, max_new_tokens)
        for text, meta in zip(texts, batch["meta"], strict=True):
            acc.add(text, meta, decode_fn)
        if max_samples and acc.n >= max_samples:
            break
    return acc.result()


class _Accumulator:
    def __init__(self, k: int) -> None:
        self.k = k
        self.n = self.malformed = self.slow = 0
        self.tok_correct = self.tok_total = 0
        self.meta_ok = self.meta_n = self.think_ok = self.think_n = 0
        self.err: list[np.ndarray] = []  # (10,) L2 errors of well-formed outputs
        self.examples: list[dict[str, Any]] = []

    def add(self, text: str, meta: dict[str, Any], decode_fn: DecodeFn) -> None:
        self.n += 1
        mode, pred, errors = parse_completion(text, self.k)
        self.slow += mode == "slow"
        target = meta.get("action_tokens")
        if target is not None:
            self.tok_total += len(target)
            if not errors:
                self.tok_correct += int(np.sum(np.asarray(pred) == np.asarray(target)))
        if errors:
            self.malformed += 1
            if len(self.examples) < 5:
                self.examples.append({"sample_id": meta.get("sample_id"), "errors": errors, "text": text[:300]})
            return
        fut = meta.get("future")
        if fut is None:
            return
        gt = np.asarray(fut, np.float64).reshape(-1, 3)
        traj = np.asarray(decode_fn(np.asarray([pred], np.int64)))[0]
        self.err.append(np.linalg.norm(traj[:, :2] - gt[:, :2], axis=1))
        if meta.get("meta_longitudinal") is not None:
            lat, lon = future_meta_action(traj)
            self.meta_n += 1
            self.meta_ok += (lat.value, lon.value) == (meta.get("meta_lateral"), meta.get("meta_longitudinal"))
            if mode == "slow":
                self.think_n += 1
                self.think_ok += parse_meta_action(text) == (meta.get("meta_lateral"), meta.get("meta_longitudinal"))

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "samples": self.n,
            "malformed": self.malformed,
            "malformed_rate": self.malformed / max(self.n, 1),
            "slow_share": self.slow / max(self.n, 1),
            "action_token_acc": self.tok_correct / max(self.tok_total, 1),
            "meta_action_acc": self.meta_ok / self.meta_n if self.meta_n else None,
            "think_meta_action_acc": self.think_ok / self.think_n if self.think_n else None,
        }
        err = np.stack(self.err) if self.err else None
        for h in HORIZONS_S:
            t = int(round(h / MODEL_DT))
            out[f"ade_{h}s"] = float(err[:, :t].mean()) if err is not None else None
            out[f"fde_{h}s"] = float(err[:, t - 1].mean()) if err is not None else None
        out["malformed_examples"] = self.examples
        return out


def load_for_eval(checkpoint: str | Path, cfg: Any, device: Any = "cpu") -> tuple[Any, Any, Any]:
    """Model, processor and action ids from an SFT checkpoint (LoRA adapters merged)."""
    from dataclasses import replace

    from training.model import load_model

    ck = Path(checkpoint)
    k = cfg.model.num_action_tokens
    if not k:
        from training.model import read_num_action_tokens

        k = read_num_action_tokens(Path(cfg.data.data_dir) / "codebook")
    if (ck / "adapter_config.json").is_file():
        from peft import PeftModel

        base = (ck / "base_model.txt").read_text().strip()
        model, proc, ids = load_model(replace(cfg.model, path=base, lora=False, build_tiny_if_missing=False), k)
        model = PeftModel.from_pretrained(model, str(ck)).merge_and_unload()
        from training.vision import ClipProcessor

        proc = ClipProcessor.from_pretrained(ck)
    else:
        model, proc, ids = load_model(replace(cfg.model, path=str(ck), lora=False, build_tiny_if_missing=False), k)
    return model.to(device), proc, ids


def main(argv: list[str] | None = None) -> int:
    from pipelines.config import load_config
    from training.config import TrainConfig

    ap = argparse.ArgumentParser(prog="python -m training.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="an SFT/RFT checkpoint directory")
    ap.add_argument("--config", default=str(CONFIG_DIR / "sft_tiny.yaml"), help="training config (data paths)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, repeatable")
    ap.add_argument("--max-samples", type=int, default=None, help="stop after this many samples")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's max_new_tokens")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, proc, ids = load_for_eval(args.checkpoint, cfg, device)
    res = evaluate(model, proc, ids, cfg.data.val_files, data_dir=cfg.data.data_dir, cameras=cfg.data.cameras,
                   max_samples=args.max_samples, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens or cfg.max_new_tokens,
                   check_stored_messages=cfg.data.check_stored_messages)
    (Path(args.checkpoint) / "eval.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
