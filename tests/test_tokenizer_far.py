"""Futures far from every token (reversing, sharp turns): an exact bounded query, no full scan (issue 14 item 12).

Before the fix every row the k-NN stages could not prove fell back to
``TokenIndex.nearest_full`` (all K tokens per row: 340-600 futures/s); the
tests below forbid that path and check the answers against the plain scan.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.geometry import box_corners
from tokenizer.codebook import Codebook, CodebookMeta
from tokenizer.kdisk import kdisk_fit
from tokenizer.nearest import TokenIndex
from tokenizer.report import coverage
from tokenizer.segments import compose_poses, future_segments
from tokenizer.synthetic import simulate_futures
from tokenizer.tokenizer import ActionTokenizer


@pytest.fixture(scope="module")
def tok() -> ActionTokenizer:
    segs = future_segments(simulate_futures(8_000, seed=1)).reshape(-1, 3)
    res = kdisk_fit(segs, 512, 0.05, seed=0)
    meta = CodebookMeta(
        k=len(res.tokens), tol=0.05, vehicle_length=4.8, vehicle_width=2.0, dt=0.5, seed=0
    )
    return ActionTokenizer(Codebook.from_tokens(res.tokens, meta), workers=1)


def unicycle(n: int, v: float, yaw_rate: float, seed: int) -> np.ndarray:
    """Futures ``(n,10,3)`` at constant speed ``v`` (negative: reversing) and yaw rate, +-20% per future."""
    rng = np.random.default_rng(seed)
    v_ = v * rng.uniform(0.8, 1.2, n)[:, None]
    w = yaw_rate * rng.uniform(0.8, 1.2, n)[:, None]
    h = np.cumsum(np.broadcast_to(w, (n, 50)) * 0.1, axis=1)
    x = np.cumsum(v_ * np.cos(h) * 0.1, axis=1)
    y = np.cumsum(v_ * np.sin(h) * 0.1, axis=1)
    p = np.arange(4, 50, 5)
    return np.stack([x[:, p], y[:, p], (h[:, p] + np.pi) % (2 * np.pi) - np.pi], -1)


def plain_encode(tokens: np.ndarray, fut: np.ndarray) -> np.ndarray:
    state = np.zeros((len(fut), 3))
    out = np.empty((len(fut), 10), np.int64)
    for t in range(10):  # every token placed at the state, compared in the ego frame
        placed = box_corners(compose_poses(state[:, None], tokens[None]))
        out[:, t] = (
            np.linalg.norm(placed - box_corners(fut[:, t])[:, None], axis=-1).sum(-1).argmin(1)
        )
        state = compose_poses(state, tokens[out[:, t]])
    return out


@pytest.fixture()
def no_full_scan(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("full scan of every token")

    monkeypatch.setattr(TokenIndex, "nearest_full", refuse)


def test_far_futures_encode_exactly_without_a_full_scan(tok, no_full_scan) -> None:
    fut = np.concatenate([
        unicycle(150, -2.0, 0.0, 1),  # reversing: 1-10 m behind every token
        unicycle(150, 4.0, 1.0, 2),  # sharp turn: 1 rad/s at 4 m/s
        unicycle(100, 1.0, -2.5, 3),  # turning on the spot
        simulate_futures(200, seed=4).astype(np.float64),
    ])  # fmt: skip
    np.testing.assert_array_equal(tok.encode(fut), plain_encode(tok.tokens, fut))


def test_far_poses_nearest_equals_full_scan_with_ties(tok, monkeypatch) -> None:
    idx = tok.index
    rng = np.random.default_rng(5)
    poses = np.concatenate([
        rng.uniform([-40, -40, -np.pi], [40, 40, np.pi], (2000, 3)),  # anywhere, most far off
        idx.tokens[rng.integers(idx.tokens.shape[0], size=50)] + [0.0, 0.0, np.pi],  # facing back
        np.tile([[-3.0, 0.0, 0.0]], (5, 1)),
    ])  # fmt: skip
    want_ids, want_best = idx.nearest_full(poses)
    monkeypatch.setattr(TokenIndex, "nearest_full", lambda *a, **k: pytest.fail("full scan"))
    ids, best = idx.nearest(poses)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(best, want_best)


def test_ties_go_to_the_lowest_id(no_full_scan) -> None:
    # two identical far tokens and many near the origin: the far query must pick id 1, not 2
    base = np.array([[0.0, 0.0, 0.0], [-30.0, 5.0, 0.3], [-30.0, 5.0, 0.3]])
    near = np.column_stack([np.linspace(0.1, 10, 60), np.zeros(60), np.zeros(60)])
    idx = TokenIndex(np.concatenate([base, near]))
    ids, _ = idx.nearest(np.array([[-31.0, 4.0, 0.2]]))
    assert ids.tolist() == [1]


def test_coverage_is_the_same_exact_share(tok, no_full_scan) -> None:
    segs = np.concatenate([
        future_segments(simulate_futures(3_000, seed=8)).reshape(-1, 3),
        future_segments(unicycle(300, -2.0, 0.5, 9)).reshape(-1, 3),
    ])  # fmt: skip
    idx = tok.index
    got = coverage(idx, segs, 0.05)
    contours = box_corners(idx.tokens)
    q = box_corners(segs)
    mins = np.concatenate([
        np.linalg.norm(contours[None] - q[a : a + 2000, None], axis=-1).mean(-1).min(1)
        for a in range(0, len(q), 2000)
    ])  # fmt: skip
    assert got == float(np.mean(mins <= 0.05))
    assert 0.3 < got < 1.0
