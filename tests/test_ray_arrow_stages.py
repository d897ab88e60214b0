"""Issue 12 item 5: row-level stages stream Arrow batches; output identical to the row-by-row path."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.runner import run_stage
from pipelines.core.shards import ShardWriter, list_shards, read_table
from pipelines.core.stage import Drop, Fail, Partition, Stage
from pipelines.stages.tokenize import (
    TokenizeStage,
    encode_column,
    input_schema,
    input_shards,
    read_input,
)
from schemas.sample import ACTION_TOKENS_FIELD


@pytest.fixture(scope="module")
def extracted(sample_data, tmp_path_factory):
    from pipelines.cli import main

    root = tmp_path_factory.mktemp("arrow")
    assert main(["extract", "--dataset", "waymo_e2e", "--input", str(sample_data.waymo_e2e), "--out", str(root),
                 "--engine", "local"]) == 0  # fmt: skip
    assert main(["codebook", "--data", str(root), "--k", "32", "--datasets", "waymo_e2e"]) == 0
    return root


def _row_path_reference(stage: TokenizeStage, out_schema: pa.Schema) -> tuple[pa.Table, int, int]:
    """What the row-by-row tokenize wrote before the Arrow path (to_pylist, add the column, from_pylist)."""
    stage.setup()
    rows, dropped, failed = [], 0, 0
    for shard in (s for part in stage.partitions() for s in part.payload["shards"]):
        table = pq.read_table(shard)
        tokens, bad = encode_column(stage._tokenizer, table.column("future"))
        for i, row in enumerate(table.to_pylist()):
            if i in bad:
                failed += 1
            elif tokens[i] is None:
                dropped += 1
            else:
                row[ACTION_TOKENS_FIELD.name] = tokens[i]
                rows.append(row)
    return pa.Table.from_pylist(rows, schema=out_schema), dropped, failed


def test_tokenize_arrow_path_matches_row_path_and_never_builds_rows(extracted, tmp_path, monkeypatch):
    extract_dir = extracted / "extract" / "waymo_e2e"
    stage = TokenizeStage(extract_dir, extracted / "codebook")
    reference, dropped, failed = _row_path_reference(stage, input_schema(extract_dir, tmp_path / "tok"))

    # Every written row must arrive as Arrow: the per-row dict path of the shard writer now raises.
    def no_rows(self, row):
        raise AssertionError(f"row {row.get('sample_id')} was turned into a Python dict")

    # and tokenize reads no column but sample_id and future (the frames are never read)
    read = pq.ParquetFile.read

    def only_two_columns(self, columns=None, **kw):
        assert columns is not None and set(columns) == {"sample_id", "future"}, columns
        return read(self, columns=columns, **kw)

    monkeypatch.setattr(ShardWriter, "add", no_rows)
    monkeypatch.setattr(pq.ParquetFile, "read", only_two_columns)
    summary = run_stage(stage, tmp_path / "tok", engine="local", progress=False)
    monkeypatch.undo()
    assert summary.ok and summary.written == reference.num_rows > 0
    assert sum(summary.dropped.values()) == dropped and sum(summary.failed.values()) == failed
    assert read_table(tmp_path / "tok").column_names == ["source_shard", "sample_id", "action_tokens"]
    # the token table joined with the extracted rows is what the row path wrote
    out = pa.concat_tables([read_input(u) for u in input_shards(extract_dir, tmp_path / "tok")])
    pq.write_table(reference, tmp_path / "ref.parquet", compression="zstd")  # as the row path's writer did
    reference = pq.read_table(tmp_path / "ref.parquet")
    assert out.schema.equals(reference.schema, check_metadata=True)
    assert out.equals(reference)


SCHEMA = pa.schema([("sample_id", pa.string()), ("v", pa.int64())])


class MixedStage(Stage):
    """Rows as dicts, Arrow tables and record batches, interleaved with drops and fails."""

    name = "mixed"
    output_schema = SCHEMA

    def partitions(self):
        return [Partition("a"), Partition("b")]

    def process(self, partition):
        yield {"sample_id": f"{partition.id}/0", "v": 0}
        yield pa.table({"sample_id": [f"{partition.id}/{i}" for i in range(1, 8)], "v": list(range(1, 8))},
                       schema=SCHEMA)  # fmt: skip
        yield Drop(f"{partition.id}/x", "boring")
        yield {"sample_id": f"{partition.id}/8", "v": 8}
        yield pa.record_batch({"sample_id": [f"{partition.id}/9"], "v": [9]}, schema=SCHEMA)
        yield Fail(f"{partition.id}/y", "Bad", "cursed")


def test_batches_and_rows_mix_in_order_and_shards_stay_bounded(tmp_path):
    summary = run_stage(MixedStage(), tmp_path, max_rows=3, progress=False)
    assert summary.written == 20 and summary.dropped == {"boring": 2} and summary.failed == {"Bad": 2}
    t = read_table(tmp_path)
    assert t.column("sample_id").to_pylist() == [f"{p}/{i}" for p in "ab" for i in range(10)]
    sizes = [pq.read_metadata(p).num_rows for p in list_shards(tmp_path)]
    assert sizes == [3, 3, 3, 1] * 2


def test_shard_writer_splits_a_large_batch_by_bytes(tmp_path):
    schema = pa.schema([("sample_id", pa.string()), ("img", pa.binary())])
    w = ShardWriter(tmp_path, "p", schema, max_rows=1000, max_bytes=10_000)
    w.add_table(pa.table({"sample_id": [str(i) for i in range(20)], "img": [b"x" * 2000] * 20}, schema=schema))
    w.flush()
    sizes = [pq.read_metadata(tmp_path / n).num_rows for n in w.written]
    assert sum(sizes) == 20 and len(sizes) >= 4 and max(sizes) <= 5


def test_shard_writer_bounds_dict_rows_by_bytes_measuring_some_rows(tmp_path, monkeypatch):
    """Rows added one by one: one in SIZE_SAMPLE is measured, and shards still split near max_bytes."""
    import pipelines.core.shards as shards

    measured = []
    real = shards._row_nbytes
    monkeypatch.setattr(shards, "_row_nbytes", lambda row: measured.append(row["sample_id"]) or real(row))
    schema = pa.schema([("sample_id", pa.string()), ("img", pa.binary())])
    w = ShardWriter(tmp_path, "p", schema, max_rows=1000, max_bytes=20_000)
    for i in range(64):
        w.add({"sample_id": str(i), "img": b"x" * 2000})
    w.flush()
    sizes = [pq.read_metadata(tmp_path / n).num_rows for n in w.written]
    assert sum(sizes) == 64 and max(sizes) <= 10 and len(sizes) == 7  # 10 rows of ~2 kB per 20 kB shard
    assert len(measured) < 64 // shards.SIZE_SAMPLE + len(sizes) + 1
