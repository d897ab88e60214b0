"""K-disk clustering of segments into action tokens (DESIGN.md section 4).

The method, defined precisely so the fast fit and the plain reference make
the same choices:

0. Segments whose end position is more than ``MAX_SEGMENT_M`` from the
   origin (200 m/s over a 0.5 s segment: a corrupt pose, not a motion) are
   dropped and counted under ``far_segment``; the rest keep their order.
1. Token 0 is "stand still" ``(0, 0, 0)``; every segment within ``tol`` of its
   end contour is removed with it (the token stays exactly zero).
2. ``rng = np.random.default_rng(seed)``. While fewer than ``k`` tokens exist:
   ``r = rng.integers(n_remaining)`` and the centre is the ``r``-th remaining
   segment in ascending input order. Every remaining segment whose end
   contour is within ``tol`` (mean corner distance, ``<=``) of the centre's
   forms the disk; the token is their mean ``(dx, dy)`` and circular mean
   ``dtheta``; they are removed.
3. If no segment remains before ``k`` tokens, stop with a warning.

:func:`kdisk_fit_plain` is that definition written directly (full scans).
:func:`kdisk_fit` gives the identical result fast: a grid of cell ``tol`` on
the segment end positions (a disk member is within ``tol`` of the centre's
position, because the mean corner distance bounds the distance of the contour
centres), per-block counts of remaining segments to find the ``r``-th one
without scanning, and periodic compaction of the grid order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pipelines.geometry import VEHICLE_LENGTH, VEHICLE_WIDTH
from tokenizer.segments import end_contours

log = logging.getLogger(__name__)

_BLOCK = 4096  # rows per block of the remaining-count index
_COMPACT = 0.5  # rebuild the grid order once this share of its entries is removed
MAX_SEGMENT_M = 100.0  # m: no road vehicle moves this far in 0.5 s
FAR_SEGMENT = "far_segment"  # reason a segment is dropped from a fit


@dataclass(frozen=True)
class KDiskResult:
    """Tokens of a fit and how they were made."""

    tokens: np.ndarray  # (k,3) float64 dx m, dy m, dtheta rad
    members: np.ndarray  # (k,) int64 segments absorbed by each token's disk
    centres: np.ndarray  # (k,) int64 index (into the input) of each disk's centre (-1: stand still)
    n_segments: int  # segments clustered (input minus dropped)
    k_requested: int
    dropped: dict[str, int] = field(default_factory=dict)  # segments left out, by reason

    @property
    def exhausted(self) -> bool:
        """True if segments ran out before ``k_requested`` tokens."""
        return len(self.tokens) < self.k_requested


def mean_corner_distance(contours: np.ndarray, contour: np.ndarray) -> np.ndarray:
    """Mean over the 4 corners of the distance between ``contours (N,4,2)`` and one ``contour (4,2)``.

    Written out term by term so a subset gives bit-identical values to the
    full array (the fast and plain fits must agree exactly).
    """
    d = contours - contour
    n = np.sqrt(d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1])
    return (n[..., 0] + n[..., 1] + n[..., 2] + n[..., 3]) * 0.25


def disk_token(members: np.ndarray) -> np.ndarray:
    """Mean ``(dx, dy)`` and circular mean ``dtheta`` of segments ``(m,3)`` (rows in input order)."""
    th = members[:, 2]
    return np.array(
        [
            members[:, 0].mean(),
            members[:, 1].mean(),
            np.arctan2(np.sin(th).mean(), np.cos(th).mean()),
        ]
    )


def _check(
    segments: np.ndarray, k: int, tol: float
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Validated segments with far ones dropped, the input index of each kept one, and the drop counts."""
    seg = np.asarray(segments, dtype=np.float64)
    if seg.ndim != 2 or seg.shape[1] != 3:
        raise ValueError(f"segments: shape {seg.shape}, expected (N, 3) of dx, dy, dtheta")
    if seg.shape[0] == 0:
        raise ValueError("segments: empty (no segment to cluster)")
    if not np.isfinite(seg).all():
        raise ValueError(f"segments: {int((~np.isfinite(seg)).any(1).sum())} rows hold NaN/inf")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    far = np.hypot(seg[:, 0], seg[:, 1]) > MAX_SEGMENT_M
    if not far.any():
        return seg, np.arange(len(seg)), {}
    first = int(np.flatnonzero(far)[0])
    log.warning(
        "K-disk: dropped %d segments (%s) ending more than %g m from their start, first #%d at %s; "
        "check the futures for corrupt poses",
        int(far.sum()), FAR_SEGMENT, MAX_SEGMENT_M, first, seg[first].tolist(),
    )  # fmt: skip
    keep = np.flatnonzero(~far)
    if keep.size == 0:
        raise ValueError(
            f"segments: all {len(seg)} end more than {MAX_SEGMENT_M} m from their start"
        )
    return seg[keep], keep, {FAR_SEGMENT: int(far.sum())}


def _warn_exhausted(n_tokens: int, k: int, n: int) -> None:
    log.warning(
        "K-disk: segments ran out after %d of %d tokens (%d segments); the codebook has K=%d. "
        "Use more data, a smaller tol or a smaller k.",
        n_tokens,
        k,
        n,
        n_tokens,
    )


def kdisk_fit_plain(
    segments: np.ndarray,
    k: int,
    tol: float,
    seed: int,
    length: float = VEHICLE_LENGTH,
    width: float = VEHICLE_WIDTH,
) -> KDiskResult:
    """The reference definition (full scan per token); slow, used to check :func:`kdisk_fit`."""
    seg, kept, dropped = _check(segments, k, tol)
    contours = end_contours(seg, length, width)
    zero = end_contours(np.zeros(3), length, width)
    remaining = np.ones(len(seg), bool)
    near = mean_corner_distance(contours, zero) <= tol
    remaining[near] = False
    tokens, members, centres = [np.zeros(3)], [int(near.sum())], [-1]
    rng = np.random.default_rng(seed)
    while len(tokens) < k:
        idx = np.flatnonzero(remaining)
        if idx.size == 0:
            _warn_exhausted(len(tokens), k, len(seg))
            break
        c = idx[rng.integers(idx.size)]
        disk = idx[mean_corner_distance(contours[idx], contours[c]) <= tol]
        tokens.append(disk_token(seg[disk]))
        members.append(disk.size)
        centres.append(int(c))
        remaining[disk] = False
    return _result(tokens, members, centres, kept, k, dropped)


def _result(
    tokens: list, members: list, centres: list, kept: np.ndarray, k: int, dropped: dict[str, int]
) -> KDiskResult:
    c = np.array(centres, np.int64)
    c[c >= 0] = kept[c[c >= 0]]  # centre indices refer to the caller's input rows
    return KDiskResult(np.array(tokens), np.array(members, np.int64), c, len(kept), k, dropped)


class _Grid:
    """Segments sorted by a grid cell of their end position; a cell row is a contiguous run."""

    def __init__(self, xy: np.ndarray, cell: float) -> None:
        self.cell = cell
        cx = np.floor(xy[:, 0] / cell).astype(np.int64)
        cy = np.floor(xy[:, 1] / cell).astype(np.int64)
        self.cx0, self.cy0 = int(cx.min()) - 1, int(cy.min()) - 1
        self.stride = int(cy.max()) - self.cy0 + 2
        # |xy| <= MAX_SEGMENT_M (far segments are dropped first), so only a tiny tol can overflow
        if (int(cx.max()) - self.cx0 + 2) * self.stride > 2**62:
            raise ValueError(f"tol {cell} m is too small for a grid over {2 * MAX_SEGMENT_M} m")
        self.keys_of = (cx - self.cx0) * self.stride + (cy - self.cy0)
        self.order = np.argsort(self.keys_of, kind="stable")
        self.keys = self.keys_of[self.order]

    def compact(self, remaining: np.ndarray) -> None:
        keep = remaining[self.order]
        self.order = self.order[keep]
        self.keys = self.keys[keep]

    def neighbours(self, i: int) -> np.ndarray:
        """Indices of segments in the 3x3 cells around segment ``i``'s cell (removed ones included)."""
        key = int(self.keys_of[i])
        lo = np.array([key - self.stride - 1, key - 1, key + self.stride - 1])
        bounds = np.searchsorted(self.keys, np.concatenate([lo, lo + 3]))
        return np.concatenate([self.order[bounds[j] : bounds[j + 3]] for j in range(3)])


def kdisk_fit(
    segments: np.ndarray,
    k: int,
    tol: float,
    seed: int,
    length: float = VEHICLE_LENGTH,
    width: float = VEHICLE_WIDTH,
) -> KDiskResult:
    """K-disk fit; identical to :func:`kdisk_fit_plain` for the same inputs, much faster."""
    seg, kept, dropped = _check(segments, k, tol)
    n = len(seg)
    contours = end_contours(seg, length, width)
    zero = end_contours(np.zeros(3), length, width)
    # The disk test is the exact one; the grid is only a conservative prefilter
    # (|centre difference| <= mean corner distance <= tol), with a margin for rounding.
    grid = _Grid(seg[:, :2], tol * (1.0 + 1e-6) + 1e-9)
    remaining = np.ones(n, bool)
    nblocks = (n + _BLOCK - 1) // _BLOCK
    counts = np.bincount(np.arange(n) // _BLOCK, minlength=nblocks)
    removed_since = 0

    def remove(idx: np.ndarray) -> None:
        nonlocal removed_since
        remaining[idx] = False
        counts[:] -= np.bincount(idx // _BLOCK, minlength=nblocks)
        removed_since += idx.size

    # Stand still: its disk is found from the grid cells around the origin.
    origin = np.flatnonzero(np.abs(seg[:, :2]).max(axis=1) <= grid.cell * 2)
    near = origin[mean_corner_distance(contours[origin], zero) <= tol]
    remove(near)
    tokens, members, centres = [np.zeros(3)], [near.size], [-1]
    rng = np.random.default_rng(seed)
    left = n - near.size
    while len(tokens) < k:
        if left == 0:
            _warn_exhausted(len(tokens), k, n)
            break
        r = int(rng.integers(left))
        # the r-th remaining segment in input order: block by cumulative counts, then within it
        cum = np.cumsum(counts)
        b = int(np.searchsorted(cum, r, side="right"))
        before = int(cum[b - 1]) if b else 0
        c = b * _BLOCK + int(np.flatnonzero(remaining[b * _BLOCK : (b + 1) * _BLOCK])[r - before])
        cand = grid.neighbours(c)
        cand = cand[remaining[cand]]
        disk = np.sort(cand[mean_corner_distance(contours[cand], contours[c]) <= tol])
        tokens.append(disk_token(seg[disk]))
        members.append(disk.size)
        centres.append(c)
        remove(disk)
        left -= disk.size
        if removed_since > _COMPACT * len(grid.order):
            grid.compact(remaining)
            removed_since = 0
    return _result(tokens, members, centres, kept, k, dropped)
