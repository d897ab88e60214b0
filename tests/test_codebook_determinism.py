"""Codebook files are a function of inputs + seed only; bad segments and tokens never reach a file.

Issue 14 items 10 and 11: the safetensors header was written in a
per-process random order (``__metadata__`` is a Rust ``HashMap`` inside
``safetensors``), so identical fits gave different bytes and a tokenize rerun
after an identical refit raised ``StageMismatchError``; one corrupt pose far
outside the grid range aborted ``kdisk_fit``; ``save_codebook`` accepted NaN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load

from pipelines.cli import main
from tests.test_codebook_stage import write_extract
from tokenizer.codebook import Codebook, CodebookError, CodebookMeta, load_codebook, save_codebook
from tokenizer.kdisk import FAR_SEGMENT, kdisk_fit, kdisk_fit_plain
from tokenizer.segments import future_segments
from tokenizer.synthetic import simulate_futures

ROOT = Path(__file__).resolve().parents[1]

_FIT_AND_SAVE = """
import sys
from tokenizer.codebook import Codebook, CodebookMeta, save_codebook
from tokenizer.kdisk import kdisk_fit
from tokenizer.segments import future_segments
from tokenizer.synthetic import simulate_futures
segs = future_segments(simulate_futures(300, seed=3)).reshape(-1, 3)
res = kdisk_fit(segs, 64, 0.05, 7)
meta = CodebookMeta(k=64, tol=0.05, vehicle_length=4.8, vehicle_width=2.0, dt=0.5, seed=7,
                    datasets=["waymo_e2e", "nuscenes"], mix={"waymo_e2e": 2.0, "nuscenes": 1.0},
                    segments_available={"waymo_e2e": 10, "nuscenes": 20, "nuplan": 30}, coverage=0.5)
save_codebook(Codebook.from_tokens(res.tokens, meta), sys.argv[1])
"""


def test_codebook_bytes_are_identical_across_processes(tmp_path) -> None:
    # Five processes with different hash seeds: before the fix the two metadata keys came out in
    # either order per process (all five agreeing by chance has probability 1/16).
    outs = []
    for i, seed in enumerate(("0", "1", "2", "random", "12345")):
        out = tmp_path / f"cb{i}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        subprocess.run(
            [sys.executable, "-c", _FIT_AND_SAVE, str(out)], check=True, env=env, cwd=ROOT
        )
        outs.append(
            ((out / "codebook.safetensors").read_bytes(), (out / "codebook.json").read_bytes())
        )
    assert all(o == outs[0] for o in outs[1:])
    st = outs[0][0]
    n = int.from_bytes(st[:8], "little")
    header = json.loads(st[8 : 8 + n])
    assert list(header["__metadata__"]) == ["format_version", "k"]
    assert load(st)["tokens"].shape == (64, 3)  # still a standard safetensors file
    assert (
        "created_at" not in json.loads(outs[0][1]) or json.loads(outs[0][1])["created_at"] is None
    )


def test_same_file_twice_in_one_process(tmp_path) -> None:
    segs = future_segments(simulate_futures(200, seed=1)).reshape(-1, 3)
    meta = CodebookMeta(k=32, tol=0.05, vehicle_length=4.8, vehicle_width=2.0, dt=0.5, seed=0)
    cb = Codebook.from_tokens(kdisk_fit(segs, 32, 0.05, 0).tokens, meta)
    digests = set()
    for i in range(8):  # Rust's RandomState also varies between maps within one process
        st, js = save_codebook(cb, tmp_path / str(i))
        digests.add(st.read_bytes() + js.read_bytes())
    assert len(digests) == 1


def test_tokenize_rerun_after_identical_refit(tmp_path, capsys) -> None:
    write_extract(tmp_path, "nuscenes", 150, seed=2, shards=2)
    fit = ["codebook", "--data", str(tmp_path), "--k", "64"]
    assert main(fit) == 0
    first = (tmp_path / "codebook" / "codebook.safetensors").read_bytes()
    assert main(["tokenize", "--data", str(tmp_path), "--engine", "local"]) == 0
    # refit in a fresh process (different hash seed), as a user rerunning the pipeline would
    env = {**os.environ, "PYTHONHASHSEED": "99", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "pipelines.cli", *fit], check=True, env=env, cwd=ROOT,
                   capture_output=True)  # fmt: skip
    assert (tmp_path / "codebook" / "codebook.safetensors").read_bytes() == first
    # before the fix: StageMismatchError (the fingerprint is the tensor file's sha256)
    assert main(["tokenize", "--data", str(tmp_path), "--engine", "local"]) == 0
    report = json.loads((tmp_path / "codebook" / "report.json").read_text())
    assert report["fit"]["fitted_at"]  # the fit's time is kept, outside the codebook files


def test_dataset_order_on_the_command_line_does_not_change_the_codebook(tmp_path) -> None:
    write_extract(tmp_path, "nuscenes", 80, seed=2, shards=1)
    write_extract(tmp_path, "waymo_e2e", 80, seed=3, shards=1)
    got = []
    for i, order in enumerate((["nuscenes", "waymo_e2e"], ["waymo_e2e", "nuscenes"])):
        out = tmp_path / f"cb{i}"
        assert (
            main(
                [
                    "codebook",
                    "--data",
                    str(tmp_path),
                    "--k",
                    "32",
                    "--datasets",
                    *order,
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        got.append(
            (out / "codebook.safetensors").read_bytes() + (out / "codebook.json").read_bytes()
        )
    assert got[0] == got[1]


# --------------------------------------------------------------------------- item 11


def test_far_out_of_grid_segment_is_dropped_and_counted(caplog) -> None:
    segs = future_segments(simulate_futures(300, seed=3)).reshape(-1, 3)
    corrupt = segs.copy()
    corrupt[17] = (4.0e12, -3.0e12, 0.1)  # one corrupt pose: before the fix "too large for a grid"
    res = kdisk_fit(corrupt, 128, 0.05, 0)
    assert res.dropped == {FAR_SEGMENT: 1}
    assert res.n_segments == len(segs) - 1
    assert FAR_SEGMENT in caplog.text
    # the same tokens as a fit on the other segments (the reference, which never saw the bad one)
    ref = kdisk_fit_plain(np.delete(segs, 17, axis=0), 128, 0.05, 0)
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    clean = kdisk_fit(segs, 128, 0.05, 0)
    assert clean.dropped == {} and clean.n_segments == len(segs)


def test_fit_info_counts_dropped_segments(tmp_path) -> None:
    write_extract(tmp_path, "nuscenes", 120, seed=4, shards=1)
    shard = next((tmp_path / "extract" / "nuscenes" / "shards").glob("*.parquet"))
    t = pq.read_table(shard).to_pylist()
    t[5]["future"][4] = [9.0e11, 9.0e11, 0.0]  # a teleporting pose: two segments far out
    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(shard)), shard)
    assert (
        main(["codebook", "--data", str(tmp_path), "--k", "64", "--set", "heldout_fraction=0"]) == 0
    )
    report = json.loads((tmp_path / "codebook" / "report.json").read_text())
    assert report["fit"]["segments_dropped"] == {FAR_SEGMENT: 2}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_tokens_never_reach_a_file(tmp_path, bad) -> None:
    meta = CodebookMeta(k=3, tol=0.05, vehicle_length=4.8, vehicle_width=2.0, dt=0.5, seed=0)
    tokens = np.array([[0.0, 0, 0], [1.0, 0, 0], [2.0, bad, 0]])
    with pytest.raises(CodebookError, match="1 tokens hold NaN/inf, first token 2"):
        Codebook.from_tokens(tokens, meta)
    good = Codebook.from_tokens(tokens[:2], meta.__class__(**{**meta.__dict__, "k": 2}))
    broken = Codebook(np.array([[0.0, 0, 0], [bad, 0, 0]], np.float32), good.contours, good.meta)
    with pytest.raises(CodebookError, match="NaN/inf"):
        save_codebook(broken, tmp_path / "cb")
    assert not (tmp_path / "cb" / "codebook.safetensors").exists()
    nan_cov = Codebook(
        good.tokens,
        good.contours,
        meta.__class__(**{**good.meta.__dict__, "coverage": float("nan")}),
    )
    with pytest.raises(ValueError):
        save_codebook(nan_cov, tmp_path / "cb2")
    save_codebook(good, tmp_path / "ok")
    assert load_codebook(tmp_path / "ok").k == 2
