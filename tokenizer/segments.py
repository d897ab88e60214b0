"""Segments: the 0.5 s motions between consecutive future poses (DESIGN.md section 4).

A future is 10 poses ``(x, y, heading)`` at 2 Hz in the ego frame at t0.
Segment ``i`` is pose ``i`` expressed in the frame of pose ``i-1`` (the first
from the origin pose ``(0, 0, 0)``), so a straight 10 m/s future has every
segment equal to ``(5, 0, 0)``. Everything here is batched numpy: no loop per
segment and no array grown in a loop.

Reading goes through :mod:`pipelines.core.shards` and touches only the
``future`` (and ``sample_id``) columns of the extracted shards.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.shards import list_shards, read_parquet
from pipelines.geometry import VEHICLE_LENGTH, VEHICLE_WIDTH, box_corners, wrap_angle
from pipelines.io.fs import as_path
from schemas.sample import FUTURE_STEPS

log = logging.getLogger(__name__)

EXTRACT_DIR = "extract"  # <data>/extract/<dataset>/shards/*.parquet


# --------------------------------------------------------------------------- SE(2) batches


def relative_poses(base: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """``poses (...,3)`` expressed in the frames of ``base (...,3)`` (broadcasting)."""
    base = np.asarray(base, dtype=np.float64)
    poses = np.asarray(poses, dtype=np.float64)
    c, s = np.cos(base[..., 2]), np.sin(base[..., 2])
    dx = poses[..., 0] - base[..., 0]
    dy = poses[..., 1] - base[..., 1]
    return np.stack(
        [c * dx + s * dy, -s * dx + c * dy, wrap_angle(poses[..., 2] - base[..., 2])], axis=-1
    )


def compose_poses(base: np.ndarray, local: np.ndarray) -> np.ndarray:
    """The pose reached by applying ``local (...,3)`` in the frames of ``base (...,3)``."""
    base = np.asarray(base, dtype=np.float64)
    local = np.asarray(local, dtype=np.float64)
    c, s = np.cos(base[..., 2]), np.sin(base[..., 2])
    x = base[..., 0] + c * local[..., 0] - s * local[..., 1]
    y = base[..., 1] + s * local[..., 0] + c * local[..., 1]
    return np.stack([x, y, wrap_angle(base[..., 2] + local[..., 2])], axis=-1)


def end_contours(
    poses: np.ndarray, length: float = VEHICLE_LENGTH, width: float = VEHICLE_WIDTH
) -> np.ndarray:
    """Vehicle contours ``(...,4,2)`` (FL, FR, BR, BL) at ``poses (...,3)``, float64."""
    return box_corners(np.asarray(poses, dtype=np.float64), length, width)


def check_futures(futures: np.ndarray, what: str = "futures") -> np.ndarray:
    """Validate a ``(B,10,3)`` batch of futures; return it as float64 or raise ValueError."""
    try:
        arr = np.asarray(futures, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not a numeric array ({exc})") from None
    if arr.ndim != 3 or arr.shape[1:] != (FUTURE_STEPS, 3):
        raise ValueError(
            f"{what}: shape {arr.shape}, expected (B, {FUTURE_STEPS}, 3) of x, y, heading"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{what}: empty batch (B=0)")
    bad = ~np.isfinite(arr).all(axis=(1, 2))
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{what}: {rows.size} future(s) hold NaN/inf values, first at batch index {int(rows[0])}"
        )
    return arr


def future_segments(futures: np.ndarray) -> np.ndarray:
    """Segments ``(B,10,3)`` (dx, dy, dtheta) of futures ``(B,10,3)``; each in its start pose's frame."""
    fut = check_futures(futures)
    prev = np.concatenate([np.zeros((fut.shape[0], 1, 3)), fut[:, :-1]], axis=1)
    return relative_poses(prev, fut)


# --------------------------------------------------------------------------- reading shards


@dataclass(frozen=True)
class FutureSet:
    """The futures of one extracted dataset (rows with a null future left out and counted)."""

    dataset: str
    futures: np.ndarray  # (M,10,3) float32: x m, y m, heading rad; ego frame at t0
    sample_ids: np.ndarray  # (M,) object: sample ids of the rows in ``futures``
    null_futures: int  # rows skipped because their future is null (test split)
    files: tuple[str, ...]


def dataset_dirs(data: str | Path, datasets: Sequence[str] | None = None) -> dict[str, Path]:
    """``{dataset: <data>/extract/<dataset>}`` for the requested (default: every extracted) dataset."""
    root = as_path(data) / EXTRACT_DIR  # local path or s3:// / gs:// URL
    if datasets:
        # sorted: the order they are named in must not change a fit (codebook bytes = inputs + seed)
        out = {d: root / d for d in sorted(set(datasets))}
        missing = [d for d, p in out.items() if not list_shards(p)]
        if missing:
            have = sorted(p.name for p in root.glob("*") if list_shards(p)) if root.is_dir() else []
            raise FileNotFoundError(
                f"no extracted shards for {missing} under {root} (datasets with shards: {have}); "
                "run `drivevla extract` first"
            )
        return out
    out = {p.name: p for p in sorted(root.glob("*")) if list_shards(p)} if root.is_dir() else {}
    if not out:
        raise FileNotFoundError(
            f"no extracted shards under {root}/<dataset>/shards; run `drivevla extract` first"
        )
    empty = sorted(p.name for p in root.glob("*") if p.is_dir() and p.name not in out)
    if empty:
        log.warning(
            "no shards (nothing extracted) for %s under %s; reading %s", empty, root, sorted(out)
        )
    return out


def _futures_from_column(
    col: pa.ChunkedArray | pa.Array, where: str, sids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Non-null futures of a ``list<fixed_size_list<float32,3>>`` column as ``(M,10,3)``; mask of them."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    arr = arr.filter(pa.array(valid))
    if len(arr) == 0:
        return np.zeros((0, FUTURE_STEPS, 3), np.float32), valid
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if (lengths != FUTURE_STEPS).any():
        i = int(np.flatnonzero(lengths != FUTURE_STEPS)[0])
        raise ValueError(
            f"{where}: sample {sids[valid][i]!r} has a future of {lengths[i]} poses, expected {FUTURE_STEPS}"
        )
    inner = arr.flatten()
    if inner.null_count:
        null_pose = inner.is_null().to_numpy(zero_copy_only=False).reshape(-1, FUTURE_STEPS)
        i = int(np.flatnonzero(null_pose.any(axis=1))[0])
        raise ValueError(f"{where}: sample {sids[valid][i]!r} has a null pose in its future")
    values = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    fut = values.reshape(-1, FUTURE_STEPS, 3)
    finite = np.isfinite(fut).all(axis=(1, 2))
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{where}: sample {sids[valid][i]!r} has a non-finite future value")
    return fut, valid


def read_futures(dataset: str, stage_dir: str | Path) -> FutureSet:
    """Read the ``future`` column (and ``sample_id``) of one extracted dataset's shards."""
    futs, ids, nulls, files = [], [], 0, []
    for path in list_shards(stage_dir):
        table = read_parquet(path, columns=["sample_id", "future"])
        sids = table.column("sample_id").to_numpy(zero_copy_only=False)
        fut, valid = _futures_from_column(table.column("future"), str(path), sids)
        futs.append(fut)
        ids.append(sids[valid])
        nulls += int((~valid).sum())
        files.append(str(path))
    if not files:
        raise FileNotFoundError(f"no shards under {as_path(stage_dir) / 'shards'}")
    futures = np.concatenate(futs) if futs else np.zeros((0, FUTURE_STEPS, 3), np.float32)
    if nulls:
        log.info("%s: skipped %d rows with a null future (test split)", dataset, nulls)
    return FutureSet(dataset, futures, np.concatenate(ids), nulls, tuple(files))


def heldout_mask(sample_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows held out from the fit: a seeded hash of each sample id below ``fraction``.

    Stable per sample (not per position), so the split survives re-extraction
    and re-sharding.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or len(sample_ids) == 0:
        return np.zeros(len(sample_ids), bool)
    salt = str(seed).encode()
    h = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8, key=salt).digest(), "little")
            for s in sample_ids
        ),
        dtype=np.uint64,
        count=len(sample_ids),
    )
    return h < np.uint64(fraction * 2.0**64)


# --------------------------------------------------------------------------- sampling with a mix


def allocate(
    available: Mapping[str, int], weights: Mapping[str, float], total: int
) -> dict[str, int]:
    """How many segments to draw per dataset: proportional to ``weights``, capped by what exists.

    Water-filling: a dataset with fewer segments than its share gives all it has
    and the rest is shared among the others by weight. A weight of 0 excludes a
    dataset; if everything available fits under ``total`` all of it is taken.
    """
    for d, w in weights.items():
        if w < 0 or not np.isfinite(w):
            raise ValueError(f"mix weight of {d!r} must be a finite number >= 0, got {w}")
    active = {d: int(n) for d, n in available.items() if weights.get(d, 0.0) > 0 and n > 0}
    if sum(active.values()) <= total:
        return {d: active.get(d, 0) for d in available}
    alloc: dict[str, int] = {d: 0 for d in available}
    left = total
    while active:
        wsum = sum(weights[d] for d in active)
        share = {d: left * weights[d] / wsum for d in active}
        short = [d for d in active if active[d] <= share[d]]
        if not short:
            floors = {d: int(np.floor(share[d])) for d in active}
            spare = left - sum(floors.values())
            # largest remainders get the leftover units (deterministic tie-break by name)
            for d in sorted(active, key=lambda d: (floors[d] - share[d], d))[:spare]:
                floors[d] += 1
            alloc.update(floors)
            break
        for d in short:
            alloc[d] = active.pop(d)
            left -= alloc[d]
    return alloc


@dataclass(frozen=True)
class SegmentSample:
    """Segments drawn for a fit, in a defined order (dataset name, then row, then step)."""

    segments: np.ndarray  # (N,3) float64 dx m, dy m, dtheta rad; local frame of the segment start
    source: np.ndarray  # (N,) int16 index into ``datasets``
    datasets: tuple[str, ...]
    available: dict[str, int]  # segments per dataset before sampling
    drawn: dict[str, int]


def sample_segments(
    per_dataset: Mapping[str, np.ndarray],
    max_segments: int,
    seed: int,
    mix: Mapping[str, float] | None = None,
) -> SegmentSample:
    """Draw at most ``max_segments`` segments across datasets with mix weights, reproducibly.

    ``per_dataset`` maps a dataset to its segments ``(n,3)``. Draws are without
    replacement from ``np.random.default_rng([seed, 1])`` (a stream separate
    from the fit's), and kept in their original order.
    """
    if max_segments <= 0:
        raise ValueError(f"max_segments must be positive, got {max_segments}")
    names = tuple(sorted(per_dataset))
    weights = {d: 1.0 for d in names} if mix is None else {d: float(mix.get(d, 0.0)) for d in names}
    unknown = sorted(set(mix or {}) - set(names))
    if unknown:
        raise ValueError(f"mix names datasets that were not read: {unknown} (read: {list(names)})")
    available = {d: len(per_dataset[d]) for d in names}
    drawn = allocate(available, weights, max_segments)
    rng = np.random.default_rng([seed, 1])
    segs, src = [], []
    for i, d in enumerate(names):
        n, a = available[d], drawn[d]
        if a == 0:
            continue
        idx = np.arange(n) if a == n else np.sort(rng.choice(n, size=a, replace=False))
        segs.append(np.asarray(per_dataset[d], np.float64).reshape(-1, 3)[idx])
        src.append(np.full(a, i, np.int16))
    if not segs:
        raise ValueError(f"no segments to sample (available {available}, weights {weights})")
    return SegmentSample(np.concatenate(segs), np.concatenate(src), names, available, drawn)
