"""Action codebook: segments, K-disk fit (fast == plain), codebook file, encode/decode, text tokens."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.geometry import box_corners
from tokenizer import (
    ActionTokenizer,
    Codebook,
    CodebookError,
    CodebookMeta,
    action_token_strings,
    format_action_tokens,
    kdisk_fit,
    kdisk_fit_plain,
    load_codebook,
    parse_action_tokens,
    register_action_tokens,
    save_codebook,
)
from tokenizer.fit import CodebookConfig, fit_codebook
from tokenizer.nearest import TokenIndex
from tokenizer.segments import (
    allocate,
    compose_poses,
    future_segments,
    heldout_mask,
    read_futures,
    relative_poses,
    sample_segments,
)
from tokenizer.synthetic import simulate_futures


@pytest.fixture(scope="module")
def fitted() -> ActionTokenizer:
    """A K=512 codebook on 100k realistic synthetic segments."""
    segs = future_segments(simulate_futures(10_000, seed=1)).reshape(-1, 3)
    res = kdisk_fit(segs, 512, 0.05, seed=0)
    meta = CodebookMeta(
        k=len(res.tokens), tol=0.05, vehicle_length=4.8, vehicle_width=2.0, dt=0.5, seed=0
    )
    return ActionTokenizer(Codebook.from_tokens(res.tokens, meta))


def straight(speed: float, n: int = 1) -> np.ndarray:
    t = np.arange(1, 11) * 0.5
    f = np.zeros((n, 10, 3))
    f[..., 0] = speed * t
    return f


# --------------------------------------------------------------------------- segments


def test_straight_future_gives_equal_segments() -> None:
    segs = future_segments(straight(10.0))
    np.testing.assert_allclose(segs, np.tile([5.0, 0.0, 0.0], (1, 10, 1)), atol=1e-12)


def test_segments_are_in_the_previous_pose_frame() -> None:
    # a constant-rate turn: every segment is the same motion in its own start frame
    w, v = 0.3, 8.0  # rad/s, m/s
    t = np.arange(1, 11) * 0.5
    fut = np.stack([v / w * np.sin(w * t), v / w * (1 - np.cos(w * t)), w * t], axis=-1)[None]
    segs = future_segments(fut)[0]
    np.testing.assert_allclose(segs, np.tile(segs[0], (10, 1)), atol=1e-9)
    np.testing.assert_allclose(segs[0, 2], 0.15, atol=1e-12)
    # composing the segments from the origin gives the future back
    state, out = np.zeros(3), []
    for s in segs:
        state = compose_poses(state, s)
        out.append(state)
    np.testing.assert_allclose(np.array(out), fut[0], atol=1e-9)
    np.testing.assert_allclose(relative_poses(fut[0, 3], fut[0, 4]), segs[4], atol=1e-12)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.full((2, 10, 3), np.nan), "NaN"),
        (np.zeros((2, 9, 3)), "shape"),
        (np.zeros((10, 3)), "shape"),
        (np.zeros((0, 10, 3)), "empty"),
        ([["a"] * 3] * 10, "numeric|shape"),
    ],
)
def test_bad_futures_are_refused(bad, match, fitted: ActionTokenizer) -> None:
    with pytest.raises(ValueError, match=match):
        future_segments(bad)
    with pytest.raises(ValueError, match=match):
        fitted.encode(bad)


def test_allocate_mix_water_filling() -> None:
    assert allocate({"a": 100, "b": 100}, {"a": 1, "b": 1}, 500) == {"a": 100, "b": 100}
    assert allocate({"a": 100, "b": 100}, {"a": 1, "b": 1}, 50) == {"a": 25, "b": 25}
    assert allocate({"a": 10, "b": 100}, {"a": 1, "b": 1}, 50) == {
        "a": 10,
        "b": 40,
    }  # a short: b fills
    assert allocate({"a": 100, "b": 100}, {"a": 3, "b": 1}, 40) == {"a": 30, "b": 10}
    assert allocate({"a": 100, "b": 100}, {"a": 1, "b": 0}, 500) == {
        "a": 100,
        "b": 0,
    }  # weight 0 excludes
    assert sum(allocate({"a": 7, "b": 9, "c": 11}, {"a": 1, "b": 1, "c": 1}, 20).values()) == 20


def test_sample_segments_is_reproducible_and_capped() -> None:
    rng = np.random.default_rng(0)
    per = {"x": rng.normal(size=(1000, 3)), "y": rng.normal(size=(300, 3))}
    a = sample_segments(per, 400, seed=3, mix={"x": 1, "y": 1})
    b = sample_segments(per, 400, seed=3, mix={"x": 1, "y": 1})
    assert len(a.segments) == 400 and a.drawn == {"x": 200, "y": 200}
    np.testing.assert_array_equal(a.segments, b.segments)
    assert not np.array_equal(a.segments, sample_segments(per, 400, seed=4).segments)
    with pytest.raises(ValueError, match="not read"):
        sample_segments(per, 400, seed=0, mix={"z": 1})


def test_heldout_mask_is_stable_and_sized() -> None:
    ids = np.array([f"waymo_e2e/s{i}/{i}" for i in range(4000)], dtype=object)
    m = heldout_mask(ids, 0.1, seed=0)
    assert 0.08 < m.mean() < 0.12
    np.testing.assert_array_equal(
        m[::-1], heldout_mask(ids[::-1], 0.1, seed=0)
    )  # per id, not per position
    assert not np.array_equal(m, heldout_mask(ids, 0.1, seed=1))


# --------------------------------------------------------------------------- K-disk


def test_fast_fit_equals_plain_reference() -> None:
    segs = future_segments(simulate_futures(2_000, seed=5)).reshape(-1, 3)  # 20k segments
    for k, tol, seed in ((128, 0.05, 0), (64, 0.2, 7)):
        fast = kdisk_fit(segs, k, tol, seed)
        plain = kdisk_fit_plain(segs, k, tol, seed)
        np.testing.assert_array_equal(fast.tokens, plain.tokens)
        np.testing.assert_array_equal(fast.centres, plain.centres)
        np.testing.assert_array_equal(fast.members, plain.members)
        assert len(fast.tokens) == k


def independent_kdisk(
    segs: np.ndarray, k: int, tol: float, seed: int, length: float = 4.8, width: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """DESIGN.md section 4 written out from scratch (no tokenizer helpers): tokens and centres."""
    hl, hw = length / 2, width / 2
    x, y, th = segs[:, 0], segs[:, 1], segs[:, 2]
    c, s = np.cos(th), np.sin(th)
    corners = np.stack(
        [
            np.stack([x + c * hl - s * hw, y + s * hl + c * hw], -1),  # front-left
            np.stack([x + c * hl + s * hw, y + s * hl - c * hw], -1),  # front-right
            np.stack([x - c * hl + s * hw, y - s * hl - c * hw], -1),  # back-right
            np.stack([x - c * hl - s * hw, y - s * hl + c * hw], -1),  # back-left
        ],
        axis=1,
    )
    still = np.array([[hl, hw], [hl, -hw], [-hl, -hw], [-hl, hw]])

    def dist(ref: np.ndarray) -> np.ndarray:
        return np.linalg.norm(corners - ref, axis=-1).mean(-1)

    left = dist(still) > tol  # stand still takes its disk first
    tokens, centres = [np.zeros(3)], [-1]
    rng = np.random.default_rng(seed)
    while len(tokens) < k and left.any():
        rem = np.flatnonzero(left)
        ctr = rem[rng.integers(rem.size)]  # the r-th remaining segment in input order
        disk = left & (dist(corners[ctr]) <= tol)
        m = segs[disk]
        circ = np.arctan2(np.sin(m[:, 2]).mean(), np.cos(m[:, 2]).mean())
        tokens.append([m[:, 0].mean(), m[:, 1].mean(), circ])
        centres.append(ctr)
        left &= ~disk
    return np.array(tokens), np.array(centres)


def test_fast_fit_equals_an_independent_implementation(caplog: pytest.LogCaptureFixture) -> None:
    segs = future_segments(simulate_futures(2_000, seed=5)).reshape(-1, 3)  # 20k segments
    # run to exhaustion (every block, many compactions) and a K-limited fit
    for k, tol, seed in ((10**6, 0.2, 7), (128, 0.05, 0)):
        with caplog.at_level(logging.WARNING, logger="tokenizer.kdisk"):
            fast = kdisk_fit(segs, k, tol, seed)
        tokens, centres = independent_kdisk(segs, k, tol, seed)
        np.testing.assert_array_equal(fast.centres, centres)
        np.testing.assert_allclose(fast.tokens, tokens, rtol=0, atol=1e-12)
    assert fast.members.sum() < len(segs)  # the K-limited fit left segments over


def test_fit_method_facts() -> None:
    segs = future_segments(simulate_futures(1_000, seed=2)).reshape(-1, 3)
    res = kdisk_fit(segs, 100, 0.05, seed=0)
    np.testing.assert_array_equal(res.tokens[0], [0.0, 0.0, 0.0])  # stand still first
    assert res.centres[0] == -1 and (res.centres[1:] >= 0).all()
    assert res.members.sum() <= len(segs) and (res.members[1:] >= 1).all()
    # each token is the mean of a disk around its centre, so it lies close to that centre segment
    d = np.linalg.norm(
        box_corners(res.tokens[1:]) - box_corners(segs[res.centres[1:]]), axis=-1
    ).mean(-1)
    assert d.max() <= 2 * 0.05 + 1e-9


def test_fit_runs_out_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    segs = future_segments(straight(10.0, 3) + np.array([0.0, 0.0, 0.0])).reshape(-1, 3)
    segs = np.concatenate([segs, future_segments(straight(3.0, 2)).reshape(-1, 3)])
    with caplog.at_level(logging.WARNING, logger="tokenizer.kdisk"):
        res = kdisk_fit(segs, 2048, 0.05, seed=0)
    assert res.exhausted and len(res.tokens) == 3  # stand still, (5,0,0), (1.5,0,0)
    assert "ran out after 3 of 2048" in caplog.text
    np.testing.assert_array_equal(kdisk_fit_plain(segs, 2048, 0.05, seed=0).tokens, res.tokens)


def test_fit_refuses_bad_segments() -> None:
    with pytest.raises(ValueError, match="empty"):
        kdisk_fit(np.zeros((0, 3)), 8, 0.05, 0)
    with pytest.raises(ValueError, match="NaN"):
        kdisk_fit(np.full((4, 3), np.nan), 8, 0.05, 0)
    with pytest.raises(ValueError, match="shape"):
        kdisk_fit(np.zeros((4, 2)), 8, 0.05, 0)


# --------------------------------------------------------------------------- nearest / encode / decode


def test_nearest_matches_full_scan(fitted: ActionTokenizer) -> None:
    idx: TokenIndex = fitted.index
    rng = np.random.default_rng(0)
    q = future_segments(simulate_futures(3_000, seed=9)).reshape(-1, 3)
    q = np.concatenate(
        [q, q[:500] + rng.normal(0, [2.0, 2.0, 0.5], (500, 3))]
    )  # far-off queries too
    ids, best = idx.nearest(q)
    ids_full, best_full = idx.nearest_full(q)
    np.testing.assert_array_equal(ids, ids_full)
    np.testing.assert_array_equal(best, best_full)


def test_encode_matches_plain_rollout(fitted: ActionTokenizer) -> None:
    fut = simulate_futures(200, seed=11).astype(np.float64)
    contours = box_corners(fitted.tokens)
    state = np.zeros((len(fut), 3))
    want = np.empty((len(fut), 10), np.int64)
    for t in range(10):  # the plain method: tokens placed at the state, compared in the ego frame
        placed = box_corners(compose_poses(state[:, None], fitted.tokens[None]))
        gt = box_corners(fut[:, t])[:, None]
        want[:, t] = np.linalg.norm(placed - gt, axis=-1).sum(-1).argmin(1)
        state = compose_poses(state, fitted.tokens[want[:, t]])
    assert contours.shape == (fitted.k, 4, 2)
    np.testing.assert_array_equal(fitted.encode(fut), want)


def test_round_trip_of_token_futures_is_exact(fitted: ActionTokenizer) -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, fitted.k, size=(500, 10))
    fut = fitted.decode(ids)
    np.testing.assert_array_equal(fitted.encode(fut), ids)
    np.testing.assert_allclose(fitted.decode(fitted.encode(fut)), fut, atol=1e-9)


def test_ade_on_realistic_futures_is_small(fitted: ActionTokenizer) -> None:
    fut = simulate_futures(2_000, seed=42)  # unseen by the fit
    dec = fitted.decode(fitted.encode(fut))
    err = np.linalg.norm(dec[..., :2] - fut[..., :2], axis=-1)
    # K=512 on 100k segments: a rollout-aware code keeps the mean error near the tolerance scale
    assert err.mean() < 0.25, err.mean()
    assert np.median(err[:, -1]) < 0.25


def test_decode_refuses_bad_ids(fitted: ActionTokenizer) -> None:
    with pytest.raises(ValueError, match="outside"):
        fitted.decode(np.array([[fitted.k] * 10]))
    with pytest.raises(ValueError, match="shape"):
        fitted.decode(np.zeros((0, 10), int))
    with pytest.raises(ValueError, match="integers"):
        fitted.decode(np.zeros((1, 10)))


# --------------------------------------------------------------------------- codebook file


def _codebook(k: int = 16) -> Codebook:
    segs = future_segments(simulate_futures(300, seed=3)).reshape(-1, 3)
    res = kdisk_fit(segs, k, 0.05, 0)
    meta = CodebookMeta(
        k=k, tol=0.05, vehicle_length=4.8, vehicle_width=2.0, dt=0.5, seed=0, datasets=["nuscenes"]
    )
    return Codebook.from_tokens(res.tokens, meta)


def test_codebook_round_trip(tmp_path) -> None:
    cb = _codebook()
    st, js = save_codebook(cb, tmp_path)
    back = load_codebook(tmp_path)
    np.testing.assert_array_equal(back.tokens, cb.tokens)
    np.testing.assert_array_equal(back.contours, cb.contours)
    assert (
        back.meta.k == 16 and back.meta.datasets == ["nuscenes"] and back.meta.frequency_hz == 2.0
    )
    assert load_codebook(st).meta == back.meta and load_codebook(js).meta == back.meta
    meta = json.loads(js.read_text())
    for key in (
        "k",
        "tol",
        "vehicle_length",
        "vehicle_width",
        "dt",
        "seed",
        "created_at",
        "format_version",
        "library_version",
        "segment_count",
        "coverage",
        "mix",
        "frequency_hz",
    ):
        assert key in meta
    assert not any(p.suffix in (".pkl", ".pt") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"k": 17}, "K=17"),
        ({"vehicle_length": 5.5}, "contours do not match"),
        ({"format_version": 99}, "format_version"),
        ({"tol": -1.0}, "tol"),
        ({"frequency_hz": 10.0}, "frequency_hz"),
        ({"dt": 0.1, "frequency_hz": 10.0}, "dt 0.1 s"),
        ({"surprise": 1}, "unknown keys"),
        ({"tensors_sha256": "0" * 64}, "belongs to other tensors"),
        ({"tensors_sha256": ""}, "tensors_sha256 is empty"),
    ],
)
def test_tampered_metadata_is_refused(tmp_path, change, match) -> None:
    _, js = save_codebook(_codebook(), tmp_path)
    meta = json.loads(js.read_text())
    meta.update(change)
    js.write_text(json.dumps(meta))
    with pytest.raises(CodebookError, match=match) as err:
        load_codebook(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_tensors_swapped_under_metadata_are_refused(tmp_path) -> None:
    save_codebook(_codebook(16), tmp_path / "a")
    save_codebook(_codebook(8), tmp_path / "b")
    (tmp_path / "a" / "codebook.safetensors").write_bytes(
        (tmp_path / "b" / "codebook.safetensors").read_bytes()
    )
    with pytest.raises(CodebookError, match="codebook.json"):
        load_codebook(tmp_path / "a")
    with pytest.raises(CodebookError, match="does not exist"):
        load_codebook(tmp_path / "missing")


# --------------------------------------------------------------------------- text tokens


def test_action_token_strings_and_parse() -> None:
    assert action_token_strings(3) == ["<action_0>", "<action_1>", "<action_2>"]
    text = "reasoning... " + format_action_tokens([5, 1, 0, 2, 2, 3, 4, 1, 1, 0])
    res = parse_action_tokens(text, k=8)
    assert res.ok and res.ids == [5, 1, 0, 2, 2, 3, 4, 1, 1, 0]
    res = parse_action_tokens(format_action_tokens([1] * 9 + [8]), k=8)
    assert (
        not res.ok and res.ids == [1] * 9 and "unknown action token '<action_8>'" in res.errors[0]
    )
    res = parse_action_tokens(format_action_tokens([1] * 7), k=8)
    assert res.ids == [1] * 7 and res.errors == ["missing action tokens: found 7, expected 10"]
    res = parse_action_tokens(format_action_tokens([1] * 11), k=8)
    assert len(res.ids) == 11 and "extra action tokens" in res.errors[0]
    res = parse_action_tokens("<action_01>" + format_action_tokens([1] * 9), k=8)
    assert "malformed" in res.errors[0] and len(res.ids) == 9
    for odd in ("\u00b2", "\u0663", "+3", " 3"):  # superscript two, Arabic-Indic three: not ids
        res = parse_action_tokens(f"<action_{odd}>" + format_action_tokens([1] * 9), k=8)
        assert res.ids == [1] * 9 and not res.ok
    assert parse_action_tokens("no tokens at all", k=8).errors == [
        "missing action tokens: found 0, expected 10"
    ]


def test_register_with_local_hf_tokenizer() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "the": 2, "car": 3, "turns": 4, "left": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    first = register_action_tokens(hf, 32)
    assert first == len(vocab)  # computed from the tokenizer, not assumed
    assert register_action_tokens(hf, 32) == first  # idempotent
    ids = hf.encode("the car " + format_action_tokens([3, 31, 0]), add_special_tokens=False)
    assert ids == [2, 3, first + 3, first + 31, first + 0]
    assert hf.convert_ids_to_tokens(first + 7) == "<action_7>"
    decoded = hf.decode(ids, skip_special_tokens=False)
    assert parse_action_tokens(decoded, 32, expected=3).ids == [3, 31, 0]


# --------------------------------------------------------------------------- from shards


def _write_extract(
    root, dataset: str, futures: np.ndarray, nulls: int = 0, shards: int = 2
) -> None:
    d = root / "extract" / dataset / "shards"
    d.mkdir(parents=True)
    ids = [f"{dataset}/scene{i // 20}/{i}" for i in range(len(futures) + nulls)]
    rows = [f.tolist() for f in futures] + [None] * nulls
    schema = pa.schema(
        [("sample_id", pa.string()), ("future", pa.list_(pa.list_(pa.float32(), 3)))]
    )
    per = (len(rows) + shards - 1) // shards
    for s in range(shards):
        t = pa.table(
            {"sample_id": ids[s * per : (s + 1) * per], "future": rows[s * per : (s + 1) * per]},
            schema=schema,
        )
        pq.write_table(t, d / f"part-{s:05d}.parquet")


def test_read_futures_skips_and_counts_nulls(tmp_path) -> None:
    fut = simulate_futures(50, seed=0)
    _write_extract(tmp_path, "nuscenes", fut, nulls=7)
    fs = read_futures("nuscenes", tmp_path / "extract" / "nuscenes")
    assert fs.null_futures == 7 and fs.futures.shape == (50, 10, 3) and len(fs.sample_ids) == 50
    np.testing.assert_array_equal(fs.futures, fut)


def test_fit_codebook_end_to_end(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    _write_extract(tmp_path, "waymo_e2e", simulate_futures(600, seed=1), nulls=5)
    _write_extract(tmp_path, "nuscenes", simulate_futures(300, seed=2))
    cfg = CodebookConfig(
        k=4096, max_segments=5_000, heldout_fraction=0.2, mix={"waymo_e2e": 1, "nuscenes": 1}
    )
    with caplog.at_level(logging.WARNING):
        cb, report = fit_codebook(tmp_path, cfg, tmp_path / "codebook")
    assert "ran out" in caplog.text and cb.k < 4096 and cb.meta.k_requested == 4096
    assert cb.meta.segment_count == 5_000 and cb.meta.datasets == ["nuscenes", "waymo_e2e"]
    assert 0.99 <= cb.meta.coverage <= 1.0  # exhausted: every segment sits in some disk
    assert report["fit"]["null_futures"] == {"nuscenes": 0, "waymo_e2e": 5}
    assert (
        set(report["heldout"]) == {"nuscenes", "waymo_e2e"} and report["overall"]["futures"] > 100
    )
    assert report["overall"]["ade_m"] < 1.0 and report["usage"]["perplexity"] > 1
    for name in (
        "codebook.safetensors",
        "codebook.json",
        "report.json",
        "tokens.png",
        "roundtrip.png",
        "usage.png",
        "config.yaml",
    ):
        assert (tmp_path / "codebook" / name).is_file(), name
    assert load_codebook(tmp_path / "codebook").meta.coverage == cb.meta.coverage
