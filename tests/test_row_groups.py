"""Parquet row groups of about 100 rows / 100 MB for image data (issue 14 item 14).

Before, every shard was one row group (up to 512 rows / 256 MB of images): the
Hub viewer refuses row groups over ~286 MiB and streaming reads a whole group.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.shards import ROW_GROUP_ROWS, ShardWriter, list_shards, write_table_atomic

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ]
)


def _rows(n: int, size: int) -> list[dict]:
    return [
        {"sample_id": f"s{i}", "image": {"bytes": os.urandom(size), "path": None}} for i in range(n)
    ]


def _groups(path) -> list[tuple[int, int]]:
    md = pq.ParquetFile(path).metadata
    return [
        (md.row_group(g).num_rows, md.row_group(g).total_byte_size)
        for g in range(md.num_row_groups)
    ]


def test_shards_have_row_groups_of_100_rows(tmp_path) -> None:
    w = ShardWriter(tmp_path / "shards", "p0", SCHEMA, max_rows=512)
    for r in _rows(250, 1000):
        w.add(r)
    w.flush()
    (shard,) = list_shards(tmp_path)
    assert [n for n, _ in _groups(shard)] == [100, 100, 50]
    assert pq.read_table(shard).num_rows == 250  # nothing lost


def test_row_groups_are_capped_by_bytes(tmp_path) -> None:
    # 40 rows of 300 kB with a 1 MB row-group budget: 3 rows per group
    w = ShardWriter(tmp_path / "shards", "p0", SCHEMA, max_rows=40, row_group_bytes=1_000_000)
    for r in _rows(40, 300_000):
        w.add(r)
    (shard,) = list_shards(tmp_path)
    groups = _groups(shard)
    assert {n for n, _ in groups[:-1]} == {3} and sum(n for n, _ in groups) == 40
    assert max(b for _, b in groups) < 1_100_000


def test_write_table_atomic_defaults_to_small_groups(tmp_path) -> None:
    table = pa.Table.from_pylist(_rows(230, 10), schema=SCHEMA)
    write_table_atomic(table, tmp_path / "a.parquet")
    assert max(n for n, _ in _groups(tmp_path / "a.parquet")) == ROW_GROUP_ROWS
    write_table_atomic(
        table, tmp_path / "b.parquet", row_group_size=None
    )  # pyarrow's default, on request
    assert len(_groups(tmp_path / "b.parquet")) == 1
