"""``drivevla codebook`` and ``drivevla tokenize`` on extracted-style shards; the tokenize stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.core.runner import run_stage
from pipelines.core.shards import read_table
from pipelines.stages.tokenize import (
    INVALID_FUTURE,
    NO_FUTURE,
    StaleTokensError,
    TokenizeStage,
    input_schema,
    input_shards,
    read_input,
)
from schemas.sample import ACTION_TOKENS_FIELD
from tokenizer import ActionTokenizer, load_codebook
from tokenizer.synthetic import simulate_futures

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("split", pa.string()),
        ("future", pa.list_(pa.list_(pa.float32(), 3))),
        ("jpeg", pa.binary()),  # stands in for the camera columns: carried through untouched
    ]
)


def write_extract(
    root, dataset: str, n: int, seed: int, nulls: int = 0, nan_rows: int = 0, shards: int = 3
) -> None:
    d = root / "extract" / dataset / "shards"
    d.mkdir(parents=True)
    fut = simulate_futures(n, seed=seed).tolist()
    for i in range(nan_rows):
        fut[i][3][1] = float("nan")
    rows = [
        {
            "sample_id": f"{dataset}/s{i // 10}/{i}",
            "split": "train",
            "future": f,
            "jpeg": bytes([i % 256]),
        }
        for i, f in enumerate(fut)
    ]
    rows += [
        {"sample_id": f"{dataset}/t/{i}", "split": "test", "future": None, "jpeg": b"\x00"}
        for i in range(nulls)
    ]
    per = (len(rows) + shards - 1) // shards
    for s in range(shards):
        pq.write_table(
            pa.Table.from_pylist(rows[s * per : (s + 1) * per], schema=SCHEMA),
            d / f"p{s}-00000.parquet",
        )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_extract(root, "waymo_e2e", 400, seed=1, nulls=6)
    write_extract(root, "nuscenes", 200, seed=2)
    rc = main(["codebook", "--data", str(root), "--k", "256", "--mix", "waymo_e2e=2,nuscenes=1",
               "--set", "heldout_fraction=0.1"])  # fmt: skip
    assert rc == 0
    return root


def test_codebook_command_writes_codebook_and_report(data) -> None:
    out = data / "codebook"
    cb = load_codebook(out)
    assert cb.k == 256 and cb.meta.mix == {"nuscenes": 1.0, "waymo_e2e": 2.0}
    report = json.loads((out / "report.json").read_text())
    assert report["fit"]["null_futures"]["waymo_e2e"] == 6
    assert {"nuscenes", "waymo_e2e"} <= set(report["heldout"])
    assert len(report["usage"]["histogram"]) == 256
    assert (out / "tokens.png").stat().st_size > 1000


def test_codebook_command_rejects_bad_options(data, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["codebook", "--data", str(data), "--mix", "waymo_e2e"])
    assert (
        main(["codebook", "--data", str(data), "--set", "nonsense=1", "--out", str(data / "x")])
        == 2
    )
    with pytest.raises(FileNotFoundError, match="carla"):
        main(["codebook", "--data", str(data), "--datasets", "carla", "--out", str(data / "y")])


def test_tokenize_command_writes_a_token_table_and_resumes(data, capsys) -> None:
    assert main(["tokenize", "--data", str(data), "--engine", "local"]) == 0
    out = data / "tokenize" / "waymo_e2e"
    table = read_table(out)  # readable: no null fixed-size lists (apache/arrow GH-35692)
    # a token table: sample ids and tokens only (the frames stay in the extracted shards)
    assert table.column_names == ["source_shard", "sample_id", "action_tokens"]
    assert len(list((out / "shards").glob("*.parquet"))) == 1  # 3 extracted shards, one partition
    assert table.schema.field("action_tokens").type == ACTION_TOKENS_FIELD.type
    assert table.num_rows == 400 and table.column("action_tokens").null_count == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["dropped"] == {NO_FUTURE: 6} and manifest["totals"]["seen"] == 406
    # joined with the extracted rows: every tokenized row whole, in the extracted order
    extract_dir = data / "extract" / "waymo_e2e"
    joined = pa.concat_tables([read_input(u) for u in input_shards(extract_dir, out)])
    assert joined.num_rows == 400 and joined.column("jpeg").null_count == 0
    assert joined.schema.equals(input_schema(extract_dir, out))
    extracted = read_table(extract_dir)
    with_future = extracted.filter(extracted.column("future").is_valid())
    assert joined.drop_columns(["action_tokens"]).equals(with_future)
    rows = joined.to_pylist()
    tok = ActionTokenizer(load_codebook(data / "codebook"))
    np.testing.assert_array_equal(
        np.array([r["action_tokens"] for r in rows]),
        tok.encode(np.array([r["future"] for r in rows])),
    )
    assert f"dropped  {NO_FUTURE}" in capsys.readouterr().out
    # a rerun skips every finished partition
    stage = TokenizeStage(extract_dir, data / "codebook")
    summary = run_stage(stage, out, engine="local", progress=False)
    assert all(p.skipped for p in summary.partitions) and summary.written == 400


def test_tokens_that_no_longer_match_their_extracted_shard_are_refused(data, tmp_path) -> None:
    write_extract(tmp_path, "nuscenes", 30, seed=4, shards=2)
    extract_dir, tok_dir = tmp_path / "extract" / "nuscenes", tmp_path / "tok"
    assert run_stage(TokenizeStage(extract_dir, data / "codebook"), tok_dir, progress=False).ok
    units = input_shards(extract_dir, tok_dir)
    assert [u.rows for u in units] == [15, 15] and all(read_input(u).num_rows == 15 for u in units)
    # extract rewrote a shard after tokenize (rows in another order): the join names both files
    shard = next((extract_dir / "shards").glob("*.parquet"))
    table = pq.read_table(shard)
    pq.write_table(table.take(list(range(table.num_rows - 1, -1, -1))), shard)
    stale = next(u for u in units if u.shard == str(shard))
    with pytest.raises(
        StaleTokensError, match="in another order.*rerun `drivevla tokenize --overwrite`"
    ) as err:
        read_input(stale)
    assert str(shard) in str(err.value) and stale.tokens[0] in str(err.value)
    # an extracted shard that is gone
    shard.unlink()
    with pytest.raises(StaleTokensError, match=shard.stem):
        input_shards(extract_dir, tok_dir)


def test_tokenize_partitions_group_extracted_shards_and_report_per_shard(data, tmp_path) -> None:
    write_extract(
        tmp_path, "nuscenes", 60, seed=5, nulls=3, nan_rows=2, shards=6
    )  # 11 rows a shard
    extract_dir = tmp_path / "extract" / "nuscenes"
    stage = TokenizeStage(extract_dir, data / "codebook", rows_per_partition=25)
    parts = stage.partitions()
    # no markers here: each shard counts as the default size, so one shard per partition
    assert [len(p.payload["shards"]) for p in parts] == [1] * 6
    # with the extract markers' counts (10 rows a shard, say): two shards per partition of 25 rows
    done = extract_dir / "_done"
    done.mkdir()
    for shard in sorted((extract_dir / "shards").glob("*.parquet")):
        (done / f"{shard.stem}.json").write_text(
            json.dumps({"shards": [shard.name], "written": 10})
        )
    parts = stage.partitions()
    assert [len(p.payload["shards"]) for p in parts] == [2, 2, 2]
    assert [p.id for p in parts] == [Path(p.payload["shards"][0]).stem for p in parts]
    summary = run_stage(stage, tmp_path / "tok", progress=False)
    assert summary.written == 58 and summary.failed == {INVALID_FUTURE: 2}
    assert summary.dropped == {NO_FUTURE: 3} and len(summary.partitions) == 3
    # each failure names the extracted shard its row came from (the NaN futures are rows 0 and 1)
    failures = json.dumps([f for p in summary.partitions for f in p.failures])
    assert failures.count(str(extract_dir / "shards" / "p0-00000.parquet")) == 2, failures
    units = input_shards(extract_dir, tmp_path / "tok")
    stems = [p.stem for p in sorted((extract_dir / "shards").glob("*"))]
    assert [u.id for u in units] == stems and [u.rows for u in units] == [9, 11, 11, 11, 11, 5]
    joined = pa.concat_tables([read_input(u) for u in units])
    assert joined.num_rows == 58 and joined.column("future").null_count == 0


def test_tokenize_stage_fails_bad_futures(data, tmp_path) -> None:
    write_extract(tmp_path, "nuscenes", 30, seed=3, nan_rows=2, shards=1)
    stage = TokenizeStage(tmp_path / "extract" / "nuscenes", data / "codebook")
    summary = run_stage(stage, tmp_path / "out", engine="local", progress=False)
    assert summary.written == 28 and summary.failed == {INVALID_FUTURE: 2}
    assert summary.seen == 30


def test_config_file_matches_the_defaults() -> None:
    from pipelines.commands.codebook import DEFAULT_CONFIG
    from pipelines.config import load_config
    from tokenizer.fit import CodebookConfig

    assert load_config(CodebookConfig, DEFAULT_CONFIG) == CodebookConfig()


def test_encode_column_isolates_each_bad_row(data) -> None:
    from pipelines.stages.tokenize import encode_column

    tok = ActionTokenizer(load_codebook(data / "codebook"), workers=1)
    fut = simulate_futures(6, seed=4).tolist()
    fut[1][9] = None  # a null pose: flatten() would drop it and shift the rows after it
    fut[2][3][0] = float("nan")
    fut[3] = fut[3][:9]
    fut[4] = None
    col = pa.chunked_array([pa.array(fut, type=SCHEMA.field("future").type)])
    ids, bad = encode_column(tok, col)
    assert (
        sorted(bad) == [1, 2, 3]
        and "null pose" in bad[1]
        and "NaN" in bad[2]
        and "9 poses" in bad[3]
    )
    assert ids[1] is None and ids[4] is None
    good = np.array([fut[0], fut[5]], np.float64)
    np.testing.assert_array_equal(np.array([ids[0], ids[5]]), tok.encode(good))


def test_tokenize_after_a_codebook_refit_asks_for_overwrite(tmp_path, caplog) -> None:
    write_extract(tmp_path, "waymo_e2e", 120, seed=6)
    fit = ["codebook", "--data", str(tmp_path), "--k", "32", "--datasets", "waymo_e2e"]
    assert main(fit) == 0
    tokenize = ["tokenize", "--data", str(tmp_path), "--engine", "local"]
    assert main(tokenize) == 0
    assert main([*fit[:4], "16", *fit[5:]]) == 0  # a refit with another K: tokens of the old one must not mix
    assert main(tokenize) == 2
    assert "--datasets waymo_e2e --overwrite" in caplog.text
    assert main([*tokenize, "--overwrite"]) == 0
    tokens = read_table(tmp_path / "tokenize" / "waymo_e2e").column("action_tokens").to_pylist()
    assert max(max(t) for t in tokens) < 16
