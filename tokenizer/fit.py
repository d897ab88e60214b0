"""Fit a codebook from extracted shards: read futures, hold some out, sample segments, K-disk, report.

The one function the CLI (``drivevla codebook``) and the benchmark call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import dump_config
from pipelines.geometry import VEHICLE_LENGTH, VEHICLE_WIDTH
from pipelines.io.fs import as_path
from schemas.sample import MODEL_DT
from tokenizer.codebook import Codebook, CodebookMeta, load_codebook, save_codebook
from tokenizer.kdisk import kdisk_fit
from tokenizer.report import coverage, write_report
from tokenizer.segments import (
    SegmentSample,
    dataset_dirs,
    future_segments,
    heldout_mask,
    read_futures,
    sample_segments,
)
from tokenizer.tokenizer import ActionTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodebookConfig:
    """Settings of a codebook fit (``configs/codebook.yaml``)."""

    k: int = 2048  # tokens
    tol: float = 0.05  # m, K-disk radius as a mean corner distance
    vehicle_length: float = VEHICLE_LENGTH  # m, contour box
    vehicle_width: float = VEHICLE_WIDTH
    max_segments: int = 2_048_000  # segments sampled for the fit
    seed: int = 0  # sampling and K-disk centres
    datasets: list[str] | None = None  # default: every dataset under <data>/extract
    mix: dict[str, float] = field(default_factory=dict)  # sampling weights; empty = equal
    heldout_fraction: float = 0.05  # futures kept out of the fit for the round-trip report
    max_heldout: int = 50_000  # per dataset, for the report
    report_examples: int = 6  # round-trip futures drawn in roundtrip.png

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_segments < 1:
            raise ValueError(f"k and max_segments must be >= 1, got {self.k}, {self.max_segments}")
        if not self.tol > 0 or not self.vehicle_length > 0 or not self.vehicle_width > 0:
            raise ValueError("tol, vehicle_length and vehicle_width must be > 0")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass(frozen=True)
class FitData:
    """What a fit reads: sampled segments, held-out and in-sample futures per dataset."""

    sample: SegmentSample
    heldout: dict[str, np.ndarray]  # (M,10,3) per dataset, never seen by the fit
    in_sample: dict[str, np.ndarray]  # (M,10,3) per dataset, a capped subset of the fit's futures
    null_futures: dict[str, int]
    timings: dict[str, float]


def load_fit_data(data: str | Path, cfg: CodebookConfig) -> FitData:
    """Read the futures of ``<data>/extract/<dataset>``, split off held-out ones, sample segments."""
    t0 = time.perf_counter()
    per_dataset: dict[str, np.ndarray] = {}
    heldout: dict[str, np.ndarray] = {}
    in_sample: dict[str, np.ndarray] = {}
    nulls: dict[str, int] = {}
    for name, d in dataset_dirs(data, cfg.datasets).items():
        fs = read_futures(name, d)
        nulls[name] = fs.null_futures
        held = heldout_mask(fs.sample_ids, cfg.heldout_fraction, cfg.seed)
        train = fs.futures[~held]
        per_dataset[name] = (
            future_segments(train).reshape(-1, 3) if len(train) else np.zeros((0, 3))
        )
        heldout[name] = fs.futures[held][: cfg.max_heldout]
        in_sample[name] = train[: cfg.max_heldout]
        log.info(
            "%s: %d futures (%d held out), %d null futures skipped, %d segments",
            name, len(fs.futures), int(held.sum()), fs.null_futures, len(per_dataset[name]),
        )  # fmt: skip
    t1 = time.perf_counter()
    sample = sample_segments(per_dataset, cfg.max_segments, cfg.seed, cfg.mix or None)
    log.info("sampled %d segments: %s", len(sample.segments), sample.drawn)
    timings = {"read_s": t1 - t0, "sample_s": time.perf_counter() - t1}
    return FitData(sample, heldout, in_sample, nulls, timings)


def fit_codebook(
    data: str | Path, cfg: CodebookConfig, out_dir: str | Path
) -> tuple[Codebook, dict[str, Any]]:
    """Fit on ``<data>/extract/<dataset>`` shards, write codebook + report into ``out_dir``."""
    out = as_path(out_dir)  # local path or s3:// / gs:// URL
    fd = load_fit_data(data, cfg)
    sample, timings = fd.sample, dict(fd.timings)
    t1 = time.perf_counter()
    result = kdisk_fit(
        sample.segments, cfg.k, cfg.tol, cfg.seed, cfg.vehicle_length, cfg.vehicle_width
    )
    timings["kdisk_s"] = time.perf_counter() - t1
    meta = CodebookMeta(
        k=len(result.tokens),
        k_requested=cfg.k,
        tol=cfg.tol,
        vehicle_length=cfg.vehicle_length,
        vehicle_width=cfg.vehicle_width,
        dt=MODEL_DT,
        seed=cfg.seed,
        datasets=list(sample.datasets),
        mix={d: float(cfg.mix.get(d, 0.0)) if cfg.mix else 1.0 for d in sample.datasets},
        segment_count=len(sample.segments),
        segments_available=sample.available,
    )
    codebook = Codebook.from_tokens(result.tokens, meta)
    tokenizer = ActionTokenizer(codebook)
    t2 = time.perf_counter()
    cov = coverage(tokenizer.index, sample.segments, cfg.tol)
    timings["coverage_s"] = time.perf_counter() - t2
    codebook = Codebook(codebook.tokens, codebook.contours, replace(meta, coverage=cov))
    save_codebook(codebook, out)
    codebook = load_codebook(out)  # what consumers will read (validated, with its tensor hash)
    dump_config(cfg, out / "config.yaml")
    fit_info = {
        **codebook.meta.to_json(),
        "segments_drawn": sample.drawn,
        "null_futures": fd.null_futures,
        "exhausted": result.exhausted,
        "segments_dropped": result.dropped,
        "disk_sizes": {
            "stand_still": int(result.members[0]),
            "median": float(np.median(result.members[1:])) if len(result.members) > 1 else None,
            "max": int(result.members[1:].max()) if len(result.members) > 1 else None,
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
        # wall-clock time lives here, not in codebook.json (whose bytes depend on inputs + seed only)
        "fitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    report = write_report(out, tokenizer, fd.heldout, fit_info, cfg.report_examples, fd.in_sample)
    return codebook, report
