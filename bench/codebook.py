"""Codebook fit and tokenize throughput, against the reference procedure in the same run.

Targets (DESIGN.md section 11, on 2 CPU cores): fit K=2048 on 2,048,000
segments read from shards in < 60 s; >= 50x faster end to end than the
reference; the clustering core alone >= 10x faster than the straightforward
K-disk loop on torch over the same segments; >= 50,000 futures/s encoded.

What is timed:

* ``fit_seconds``: read the ``future`` column of Parquet shards (simulated
  futures with varied speeds, curvatures, accelerations, lane changes, stops,
  written first), make the segments, sample, K-disk fit
  (:func:`tokenizer.fit.load_fit_data` + :func:`tokenizer.kdisk.kdisk_fit`).
* ``command_seconds``: the whole ``drivevla codebook`` command on the same
  shards (read, sample, fit, coverage, held-out round trip, report and PNGs,
  writing the files), as a user runs it.
* ``reference_seconds`` = reference load + reference core. The reference load
  reads the same shards, then builds the segment tensor one segment at a time
  with ``torch.cat`` in a loop (quadratic); it is timed on at least 4 sizes up
  to 320k segments (``--reference-load-sizes``), each ``--repeats`` times (the
  minimum counts: other load only ever adds time), fitted as ``a n^2 + b n``
  and extrapolated to N (running it at 2M would take about an hour). The fit's
  relative residual, and the error of predicting the largest size from the
  others (an honest measure of the extrapolation), are printed with it.
* Fit and command are repeated ``--repeats`` times too; the minimum counts
  and the spread (max / min) is printed. The reference core is the straightforward K-disk loop on
  torch (full-array distance to the centre every iteration, then compaction),
  run on the same N segments (or on ``--reference-core-segments`` and scaled
  linearly, its cost being proportional to N per iteration).
* ``encode_per_s``: batch encode of held-out simulated futures.

    .venv/bin/python bench/codebook.py [--segments 2048000] [--k 2048]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from scipy.optimize import nnls

from tokenizer.fit import CodebookConfig, load_fit_data
from tokenizer.kdisk import kdisk_fit
from tokenizer.nearest import TokenIndex
from tokenizer.report import coverage
from tokenizer.segments import end_contours, read_futures
from tokenizer.synthetic import simulate_futures
from tokenizer.tokenizer import ActionTokenizer

DATASETS = {"waymo_e2e": 0.6, "nuscenes": 0.4}  # share of the simulated futures per dataset
ROWS_PER_SHARD = 8192


def write_shards(root: Path, n_futures: int, seed: int) -> None:
    """Simulated futures as ``<root>/extract/<dataset>/shards/*.parquet`` (sample_id + future)."""
    fut = simulate_futures(n_futures, seed=seed)
    start = 0
    for d, share in DATASETS.items():
        n = round(n_futures * share) if d != list(DATASETS)[-1] else n_futures - start
        out = root / "extract" / d / "shards"
        out.mkdir(parents=True)
        for a in range(0, n, ROWS_PER_SHARD):
            chunk = fut[start + a : start + min(a + ROWS_PER_SHARD, n)]
            poses = pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), 3)
            futures = pa.ListArray.from_arrays(
                pa.array(np.arange(len(chunk) + 1, dtype=np.int32) * 10), poses
            )
            ids = pa.array([f"{d}/bench/{start + a + i}" for i in range(len(chunk))])
            pq.write_table(
                pa.table({"sample_id": ids, "future": futures}),
                out / f"{a // ROWS_PER_SHARD:05d}-00000.parquet",
            )
        start += n


def unicycle(n: int, v: float, yaw_rate: float, seed: int) -> np.ndarray:
    """Futures at constant speed ``v`` (negative: reversing) and yaw rate, +-20% per future."""
    rng = np.random.default_rng(seed)
    v_ = v * rng.uniform(0.8, 1.2, n)[:, None]
    w = yaw_rate * rng.uniform(0.8, 1.2, n)[:, None]
    h = np.cumsum(np.broadcast_to(w, (n, 50)) * 0.1, axis=1)
    x = np.cumsum(v_ * np.cos(h) * 0.1, axis=1)
    y = np.cumsum(v_ * np.sin(h) * 0.1, axis=1)
    p = np.arange(4, 50, 5)
    return np.stack([x[:, p], y[:, p], (h[:, p] + np.pi) % (2 * np.pi) - np.pi], -1)


# --------------------------------------------------------------------------- reference procedure


def reference_load(futures: np.ndarray) -> torch.Tensor:
    """The reference's segment loading: one tensor per segment appended with torch.cat (quadratic)."""
    segs = torch.zeros((0, 3))
    for fut in futures:
        prev = torch.zeros(3)
        for pose in fut:
            p = torch.as_tensor(pose, dtype=torch.float32)
            c, s = torch.cos(prev[2]), torch.sin(prev[2])
            d = p[:2] - prev[:2]
            dth = torch.remainder(p[2] - prev[2] + math.pi, 2 * math.pi) - math.pi
            seg = torch.stack([c * d[0] + s * d[1], -s * d[0] + c * d[1], dth])
            segs = torch.cat([segs, seg[None]], dim=0)
            prev = p
    return segs


def reference_kdisk(segments: np.ndarray, k: int, tol: float, seed: int) -> int:
    """The straightforward K-disk loop on torch: full-array distances per iteration, then compaction."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(end_contours(segments)).float()  # (N,4,2)
    s = torch.from_numpy(segments).float()
    zero = torch.from_numpy(end_contours(np.zeros(3))).float()
    keep = torch.norm(x - zero, dim=-1).mean(-1) > tol
    x, s = x[keep], s[keep]
    tokens = [torch.zeros(3)]
    while len(tokens) < k and len(x):
        i = int(torch.randint(len(x), (1,), generator=gen))
        near = torch.norm(x - x[i], dim=-1).mean(-1) <= tol
        m = s[near]
        tokens.append(
            torch.stack(
                [
                    m[:, 0].mean(),
                    m[:, 1].mean(),
                    torch.atan2(m[:, 2].sin().mean(), m[:, 2].cos().mean()),
                ]
            )
        )
        x, s = x[~near], s[~near]
    return len(tokens)


def pick_reference_threads(
    segments: np.ndarray, tol: float, candidates: list[int]
) -> tuple[int, dict]:
    """The torch thread count under which the reference loop runs fastest here (it gets the best case)."""
    x = torch.from_numpy(end_contours(segments)).float()
    times = {}
    for th in candidates:
        torch.set_num_threads(th)
        t = time.perf_counter()
        for i in range(5):
            near = torch.norm(x - x[i], dim=-1).mean(-1) <= tol
            x[~near]
        times[th] = time.perf_counter() - t
    best = min(times, key=times.__getitem__)
    torch.set_num_threads(best)
    return best, {str(k): round(v, 3) for k, v in times.items()}


def _quadratic_fit(n: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    (a, b), _ = nnls(np.stack([n**2, n], 1), y)  # both terms are costs: a, b >= 0
    return float(a), float(b)


def time_reference_load(stage_dir: Path, sizes: list[int], repeats: int) -> dict:
    """Time the quadratic load on >= 4 sizes (segments), ``repeats`` times each, and fit ``a n^2 + b n``."""
    t0 = time.perf_counter()
    fut = read_futures("bench", stage_dir).futures  # the read itself, as in our fit
    read_s_per_future = (time.perf_counter() - t0) / len(fut)
    sizes = [n for n in sizes if n // 10 <= len(fut)]
    if len(sizes) < 4:
        raise SystemExit(f"reference load: need >= 4 sizes within the data, got {sizes}")
    runs: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):  # interleaved, so a burst of load does not hit one size only
        for n in sizes:
            t = time.perf_counter()
            reference_load(fut[: n // 10])
            runs[n].append(time.perf_counter() - t + read_s_per_future * n / 10)
    n_arr = np.array(sizes, float)
    y = np.array([min(runs[n]) for n in sizes])
    a, b = _quadratic_fit(n_arr, y)
    pred = a * n_arr**2 + b * n_arr
    # extrapolation check: fit without the largest size, predict it
    a_loo, b_loo = _quadratic_fit(n_arr[:-1], y[:-1])
    pred_last = a_loo * n_arr[-1] ** 2 + b_loo * n_arr[-1]
    return {
        "a": a,
        "b": b,
        "measured": [[int(n), round(min(runs[n]), 3)] for n in sizes],
        "spread_max_over_min": {str(n): round(max(r) / min(r), 3) for n, r in runs.items()},
        "fit_rel_rms_residual": round(float(np.sqrt(np.mean(((pred - y) / y) ** 2))), 4),
        "largest_predicted_from_others_rel_error": round(float(pred_last / y[-1] - 1.0), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--segments", type=int, default=2_048_000)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encode-futures", type=int, default=200_000)
    ap.add_argument(
        "--reference-load-sizes", type=int, nargs="+", default=[40_000, 80_000, 160_000, 320_000],
        help="segment counts the quadratic reference load is timed at (>= 4)",
    )  # fmt: skip
    ap.add_argument(
        "--repeats", type=int, default=3, help="repetitions of fit, command and reference load"
    )
    ap.add_argument(
        "--reference-core-segments", type=int, default=None, help="default: all segments"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n_futures = args.segments // 10
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews every figure

    with tempfile.TemporaryDirectory(prefix="bench_codebook_") as tmp:
        root = Path(tmp)
        write_shards(root, n_futures, args.seed)
        cfg = CodebookConfig(
            k=args.k, tol=args.tol, max_segments=args.segments, seed=args.seed, heldout_fraction=0.0
        )

        fit_runs, kdisk_runs = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fd = load_fit_data(root, cfg)
            t1 = time.perf_counter()
            fit = kdisk_fit(fd.sample.segments, cfg.k, cfg.tol, cfg.seed)
            t2 = time.perf_counter()
            fit_runs.append(t2 - t0)
            kdisk_runs.append(t2 - t1)
        segments = fd.sample.segments
        read_s = min(fit_runs) - min(kdisk_runs)
        fit_s, kdisk_s = min(fit_runs), min(kdisk_runs)

        from pipelines.cli import main as cli

        command_runs = []
        for rep in range(args.repeats):  # the user's command, default held-out share and report
            t = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # stdout is for the one JSON line
                rc = cli(["codebook", "--data", str(root), "--k", str(cfg.k), "--tol", str(cfg.tol),
                          "--seed", str(cfg.seed), "--out", str(root / f"codebook-{rep}")])  # fmt: skip
            command_runs.append(time.perf_counter() - t)
            if rc != 0:
                raise SystemExit(f"drivevla codebook exited {rc}")
        report = json.loads((root / "codebook-0" / "report.json").read_text())
        command_s = min(command_runs)

        index = TokenIndex(fit.tokens)
        t = time.perf_counter()
        cov = coverage(index, segments, cfg.tol)
        coverage_s = time.perf_counter() - t

        from tokenizer.codebook import Codebook, CodebookMeta

        meta = CodebookMeta(
            k=len(fit.tokens),
            tol=cfg.tol,
            vehicle_length=4.8,
            vehicle_width=2.0,
            dt=0.5,
            seed=cfg.seed,
        )
        tok = ActionTokenizer(Codebook.from_tokens(fit.tokens, meta))
        held = simulate_futures(args.encode_futures, seed=args.seed + 1000)
        t = time.perf_counter()
        ids = tok.encode(held)
        encode_s = time.perf_counter() - t
        err = np.linalg.norm(tok.decode(ids)[..., :2] - held[..., :2], axis=-1)
        far_rates = {}  # futures far from every token: exact bounded query (was a full scan)
        for name, far in (
            ("reversing", unicycle(5000, -2.0, 0.0, 1)),
            ("sharp_turn", unicycle(5000, 4.0, 1.0, 2)),
        ):
            t = time.perf_counter()
            tok.encode(far)
            far_rates[name] = round(len(far) / (time.perf_counter() - t))

        ref_threads, thread_probe = pick_reference_threads(
            segments, cfg.tol, sorted({1, os.cpu_count() or 1})
        )
        load_fit = time_reference_load(
            root / "extract" / "waymo_e2e", args.reference_load_sizes, args.repeats
        )
        n = len(segments)
        ref_load_s = load_fit["a"] * n * n + load_fit["b"] * n

    n_core = min(args.reference_core_segments or n, n)
    core_segments = (
        segments
        if n_core == n
        else segments[np.sort(np.random.default_rng(0).choice(n, n_core, replace=False))]
    )
    t = time.perf_counter()
    ref_tokens = reference_kdisk(core_segments, cfg.k, cfg.tol, cfg.seed)
    ref_core_s = (time.perf_counter() - t) * (n / n_core)
    ref_s = ref_load_s + ref_core_s

    print(
        json.dumps(
            {
                "bench": "codebook",
                "segments": n,
                "futures": n_futures,
                "k": cfg.k,
                "tol": cfg.tol,
                "tokens_made": len(fit.tokens),
                "cpus": os.cpu_count(),
                "loadavg_1min_at_start": load_at_start,
                "reference_torch_threads": ref_threads,
                "reference_thread_probe_s": thread_probe,
                "repeats": args.repeats,
                "fit_seconds": round(fit_s, 2),
                "fit_seconds_runs": [round(v, 2) for v in fit_runs],
                "fit_spread_max_over_min": round(max(fit_runs) / fit_s, 3),
                "fit_breakdown": {
                    "read_segments_sample_s": round(read_s, 2),
                    "kdisk_s": round(kdisk_s, 2),
                },
                "command_seconds": round(command_s, 2),
                "command_seconds_runs": [round(v, 2) for v in command_runs],
                "command_spread_max_over_min": round(max(command_runs) / command_s, 3),
                "command_timings": report["fit"]["timings"],
                "command_how": "drivevla codebook (in-process cli.main): read + sample + K-disk + coverage + "
                "held-out round trip + report.json/PNGs, default held-out share",
                "reference_seconds": round(ref_s, 1),
                "reference_load_seconds": round(ref_load_s, 1),
                "reference_core_seconds": round(ref_core_s, 2),
                "reference_core_tokens": ref_tokens,
                "speedup": round(ref_s / fit_s, 1),
                "speedup_command": round(ref_s / command_s, 1),
                "core_speedup": round(ref_core_s / kdisk_s, 1),
                "encode_per_s": round(args.encode_futures / encode_s),
                "encode_futures": args.encode_futures,
                "encode_far_per_s": far_rates,
                "heldout_ade_m": round(float(err.mean()), 4),
                "heldout_fde_m": round(float(err[:, -1].mean()), 4),
                "coverage": round(cov, 4),
                "coverage_seconds": round(coverage_s, 2),
                "reference_load_model": {
                    **load_fit,
                    "how": "torch.cat-per-segment load timed at the 'measured' sizes (segments, seconds; "
                    "incl. the Parquet read), non-negative least-squares fit of a*n^2 + b*n, evaluated at n=segments",
                },
                "reference_core_how": "straightforward K-disk loop on torch (full-array mean corner distance per "
                f"iteration, boolean compaction) run on {n_core} segments"
                + (
                    ""
                    if n_core == n
                    else f", scaled by {n}/{n_core} (cost per iteration is linear in N)"
                ),
                "targets": {
                    "fit_seconds_lt": 60,
                    "speedup_ge": 50,
                    "core_speedup_ge": 10,
                    "encode_per_s_ge": 50_000,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
