"""Open-loop evaluation: decode validation rows with a checkpoint or an endpoint, score them per benchmark.

    python -m training.eval --checkpoint out/sft_tiny/checkpoints/step_0000200     # = make eval
    python -m training.eval --endpoint http://127.0.0.1:8000/v1 --served-model drivevla \\
        --data 'data/build/shards/validation-*.parquet'                             # a `vllm serve` model

Writes to ``--out`` (default ``out/eval/<checkpoint name>``; never inside the
checkpoint directory): ``predictions.parquet`` (sample id, dataset, generated
text, action tokens, trajectory, reasoning, think mode, format error,
latency), ``metrics.json`` and ``report.md`` with the tables and plots
(best and worst predictions drawn on the front camera).

Decoding is greedy (the checkpoint's repetition penalty is overridden: a
repeated action token is a valid plan). Metrics (``training.benchmarks``):

* all rows: ``format_rate`` (exactly 10 valid action tokens in the answer
  block; malformed outputs are never padded, they are left out of the
  trajectory metrics), ``slow_share``, ``reasoning_chars_mean`` (slow
  outputs), ``latency_s_mean``, ``action_token_acc``, ``meta_action_acc``,
  ``ade_{1,2,3,5}s`` / ``fde_{1,2,3,5}s``;
* nuScenes rows: L2 and collision rate at 1/2/3 s, UniAD and ST-P3 conventions;
* WOD-E2E rows: RFS (0-10) and ADE at 3 s / 5 s;
* NAVSIM (nuPlan) rows: PDMS with ``--navsim-metric-cache`` (needs ``navsim``;
  a clear error otherwise; without the flag the report says it was not computed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from annotators.training_prompt import (
    CAMERAS_FOR_MODEL,
    THINK_CLOSE,
    THINK_OPEN,
    parse_completion,
    parse_meta_action,
)
from pipelines.meta_actions import future_meta_action
from schemas.sample import MODEL_DT
from training.cli import emit
from training.data import BuiltRows, LengthGroupedBatchSampler, ShardIndex, collate, model_batch

log = logging.getLogger(__name__)

HORIZONS_S = (1, 2, 3, 5)
DecodeFn = Callable[[np.ndarray], np.ndarray]  # ids (B,10) -> poses (B,10,3)


def codebook_decoder(codebook_dir: str | Path) -> DecodeFn:
    """``ActionTokenizer(load_codebook(codebook_dir)).decode``; ``codebook_dir`` may be the data root."""
    from tokenizer.codebook import load_codebook
    from tokenizer.tokenizer import ActionTokenizer

    p = Path(codebook_dir)
    if not (p / "codebook.json").is_file() and (p / "codebook" / "codebook.json").is_file():
        p = p / "codebook"
    return ActionTokenizer(load_codebook(p)).decode


@torch.no_grad()
def generate(model: Any, batch: dict[str, Any], tokenizer: Any, max_new_tokens: int, **gen: Any) -> list[str]:
    """Greedy completions (text with special tokens, padding removed) for a left-padded batch."""
    device = next(model.parameters()).device
    inputs = model_batch(batch, device)
    gen = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, **gen}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **gen)
    new = out[:, inputs["input_ids"].shape[1] :]
    pad = tokenizer.pad_token_id
    return [tokenizer.decode([t for t in row.tolist() if t != pad], skip_special_tokens=False) for row in new]


def reasoning_of(text: str) -> str:
    if THINK_OPEN not in text:
        return ""
    return text.split(THINK_OPEN, 1)[1].split(THINK_CLOSE, 1)[0].strip()


def make_record(text: str, meta: dict[str, Any], k: int, decode_fn: DecodeFn, latency: float) -> dict[str, Any]:
    """One prediction row (the predictions Parquet schema)."""
    mode, pred, errors = parse_completion(text, k)
    traj = None if errors else np.asarray(decode_fn(np.asarray([pred], np.int64)))[0]
    return {
        "sample_id": meta.get("sample_id"),
        "dataset": meta.get("dataset"),
        "text": text,
        "action_tokens": None if errors else [int(i) for i in pred],
        "trajectory": None if traj is None else traj.astype(float).tolist(),
        "reasoning": reasoning_of(text),
        "think_mode": mode,
        "format_error": "; ".join(errors) if errors else None,
        "latency_s": float(latency),
    }


def predict_local(model: Any, processor: Any, ids: Any, rows: BuiltRows, *, batch_size: int, max_new_tokens: int,
                  decode_fn: DecodeFn, max_samples: int | None = None) -> Iterator[tuple[dict, dict]]:
    """(record, meta) per validation row, decoded in-process (latency = batch time / batch size)."""
    sampler = LengthGroupedBatchSampler(rows.index, batch_size, shuffle=False, drop_last=False)
    loader = torch.utils.data.DataLoader(
        rows, batch_sampler=sampler,
        collate_fn=partial(collate, pad_id=processor.tokenizer.pad_token_id, padding_side="left"),
    )
    model.eval()
    n = 0
    for batch in loader:
        t0 = time.perf_counter()
        texts = generate(model, batch, processor.tokenizer, max_new_tokens)
        dt = (time.perf_counter() - t0) / len(texts)
        for text, meta in zip(texts, batch["meta"], strict=True):
            yield make_record(text, meta, ids.count, decode_fn, dt), meta
            n += 1
            if max_samples and n >= max_samples:
                return


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
    """Greedy-decode the validation rows and return the overall metrics (in-training eval, tests)."""
    decode_fn = decode_fn or codebook_decoder(data_dir)
    rows = BuiltRows(ShardIndex.from_glob(val_files), processor, num_action_tokens=ids.count, cameras=cameras,
                     with_target=False, check_stored_messages=check_stored_messages)
    pairs = list(predict_local(model, processor, ids, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               decode_fn=decode_fn, max_samples=max_samples))
    return summarise([r for r, _ in pairs], [m for _, m in pairs])


def summarise(records: list[dict[str, Any]], metas: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall metrics of the module docstring over ``records`` (with the rows' ``metas``)."""
    n = len(records)
    ok = [r["format_error"] is None for r in records]
    slow = [r["think_mode"] == "slow" for r in records]
    tok_ok = tok_n = meta_ok = meta_n = think_ok = think_n = 0
    err: list[np.ndarray] = []
    for r, m in zip(records, metas, strict=True):
        target = m.get("action_tokens")
        if target is not None:
            tok_n += len(target)
            if r["action_tokens"] is not None:
                tok_ok += int(np.sum(np.asarray(r["action_tokens"]) == np.asarray(target)))
        if r["trajectory"] is None or m.get("future") is None:
            continue
        traj = np.asarray(r["trajectory"])
        err.append(np.linalg.norm(traj[:, :2] - np.asarray(m["future"], np.float64).reshape(-1, 3)[:, :2], axis=1))
        if m.get("meta_longitudinal") is not None:
            lat, lon = future_meta_action(traj)
            meta_n += 1
            meta_ok += (lat.value, lon.value) == (m.get("meta_lateral"), m.get("meta_longitudinal"))
            if r["think_mode"] == "slow":
                think_n += 1
                think_ok += parse_meta_action(r["text"]) == (m.get("meta_lateral"), m.get("meta_longitudinal"))
    reasoning = [len(r["reasoning"]) for r in records if r["think_mode"] == "slow"]
    out: dict[str, Any] = {
        "samples": n,
        "well_formed": int(sum(ok)),
        "format_rate": sum(ok) / n if n else None,
        "malformed": n - int(sum(ok)),
        "malformed_rate": (n - sum(ok)) / n if n else None,
        "slow_share": sum(slow) / n if n else None,
        "reasoning_chars_mean": float(np.mean(reasoning)) if reasoning else None,
        "latency_s_mean": float(np.mean([r["latency_s"] for r in records])) if n else None,
        "action_token_acc": tok_ok / tok_n if tok_n else None,
        "meta_action_acc": meta_ok / meta_n if meta_n else None,
        "think_meta_action_acc": think_ok / think_n if think_n else None,
    }
    e = np.stack(err) if err else None
    for h in HORIZONS_S:
        t = int(round(h / MODEL_DT))
        out[f"ade_{h}s"] = float(e[:, :t].mean()) if e is not None else None
        out[f"fde_{h}s"] = float(e[:, t - 1].mean()) if e is not None else None
    out["malformed_examples"] = [{"sample_id": r["sample_id"], "errors": r["format_error"], "text": r["text"][:300]}
                                 for r in records if r["format_error"]][:5]
    return out


def main(argv: list[str] | None = None) -> int:
    from training.eval_cli import run

    ap = argparse.ArgumentParser(prog="python -m training.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint directory (SFT/RFT, full or LoRA, or an exported model)")
    src.add_argument("--endpoint", help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                     "(API key from DRIVEVLA_API_KEY or OPENAI_API_KEY when set)")
    ap.add_argument("--served-model", default=None, help="model name at the endpoint (default: the first listed)")
    ap.add_argument("--data", default="data/build/shards/validation-*.parquet",
                    help="validation shards, comma-separated globs (default: %(default)s)")
    ap.add_argument("--codebook", default="data/codebook", help="codebook directory (default: %(default)s)")
    ap.add_argument("--cameras", default=",".join(CAMERAS_FOR_MODEL), help="cameras fed to the model")
    ap.add_argument("--out", default=None, help="output directory (default: out/eval/<checkpoint or endpoint name>)")
    ap.add_argument("--max-samples", type=int, default=None, help="stop after this many samples")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--min-pixels", type=int, default=None, help="must equal the checkpoint's (else an error)")
    ap.add_argument("--max-pixels", type=int, default=None, help="must equal the checkpoint's (else an error)")
    ap.add_argument("--navsim-metric-cache", default=None,
                    help="NAVSIM metric cache: compute PDMS on nuPlan rows (needs the navsim package)")
    ap.add_argument("--cpu-threads", type=int, default=0,
                    help="torch intra-op threads on CPU (0: torch's default; 1 is fastest for the tiny model)")
    ap.add_argument("--plots", type=int, default=2, help="best and worst cases drawn on the front camera (each)")
    ap.add_argument("--no-check-stored-messages", action="store_true",
                    help="do not require the stored `messages` column to equal the prompt builder's output")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        log.error("%s", exc)
        return 2
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
