"""Tokenize stage: the ``action_tokens`` (int16 [10]) of every extracted sample.

Input: one dataset's extracted shards (``<data>/extract/<dataset>/``), one
partition per input shard. Output: a *token table* beside them, one shard per
input shard, with two columns: ``sample_id`` and ``action_tokens`` (codebook
ids of the future, rollout-aware greedy), rows in the input's order.

Why not the extracted rows plus a column (as before 1.2 of the pipeline): the
rows hold every camera frame, and rewriting them cost about 20 times the
encoding itself (``bench/scale.py``: 0.045 of the encoder's rate end to end);
tokenize reads only ``sample_id`` and ``future`` and writes a few bytes per
row. The next stage that needs whole rows (annotate) reads the extracted shard
anyway and joins the tokens to it by ``sample_id``, in order
(:func:`read_input`): a join that checks the token table still matches its
extracted shard (same samples, same order) and otherwise names both files.

A row without a future (test split) cannot be tokenized: it is dropped with
reason ``no_future`` rather than written with a null ``action_tokens``,
because pyarrow (<= 25) cannot read back a Parquet column of nullable
fixed-size lists that holds nulls (apache/arrow GH-35692: "Expected all lists
to be of size=10 but index i had size=0"), so one null would make the whole
shard unreadable downstream. No later stage can use such a row anyway (the
annotator needs the future's meta-action; the build drops rows without
tokens); the join leaves it out as well. A row whose future is malformed (wrong
length, a null pose, NaN) fails with ``invalid_future``.

The whole shard's futures are encoded in one batch (vectorised); the codebook
is loaded once per worker in :meth:`TokenizeStage.setup`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.shards import (
    DEFAULT_MAX_ROWS,
    SHARD_DIR,
    committed_markers,
    list_shards,
    read_parquet,
)
from pipelines.core.stage import Drop, Fail, Outcome, Partition, Stage
from pipelines.io import fs
from pipelines.io.fs import as_path, parquet_file
from schemas.sample import ACTION_TOKENS_FIELD, FUTURE_STEPS, schema_with
from tokenizer.codebook import codebook_paths, load_codebook
from tokenizer.tokenizer import ActionTokenizer

log = logging.getLogger(__name__)

NO_FUTURE = "no_future"
INVALID_FUTURE = "invalid_future"


# the stem of the extracted shard a token row belongs to
SOURCE_SHARD_FIELD = pa.field("source_shard", pa.string(), nullable=False)
TOKEN_COLUMNS = (SOURCE_SHARD_FIELD.name, "sample_id", ACTION_TOKENS_FIELD.name)
ROWS_PER_PARTITION = 8192  # extracted rows per tokenize partition (about 0.1 s of encoding)
READ_COLUMNS = ["sample_id", "future"]  # all tokenize reads of an extracted shard


class StaleTokensError(ValueError):
    """A token shard does not match its extracted shard (extract was rerun after tokenize)."""


class TokenizeStage(Stage):
    """Encode every row's future with a codebook; write ``source_shard``, ``sample_id``, ``action_tokens``.

    One partition covers consecutive extracted shards holding about ``rows_per_partition``
    rows (estimated from the extract markers' counts, no shard is opened for it), so the
    per-partition costs (a marker, a Parquet file, the encoder's per-call work) are paid
    once per few thousand rows, not once per extracted shard (256 rows by default, fewer
    with full-size frames).
    """

    name = "tokenize"
    shard_rows = row_group_rows = 1 << 20  # about 40 bytes a row: one token shard (one row group) per partition

    def __init__(
        self, in_dir: str | Path, codebook: str | Path, rows_per_partition: int = ROWS_PER_PARTITION
    ) -> None:
        self.in_dir = as_path(in_dir)  # local path or s3:// / gs:// URL
        self.codebook_path = as_path(codebook)
        if rows_per_partition < 1:
            raise ValueError(f"rows_per_partition must be >= 1, not {rows_per_partition}")
        self.rows_per_partition = rows_per_partition
        shards = list_shards(self.in_dir)
        if not shards:
            raise FileNotFoundError(
                f"no shards under {self.in_dir / 'shards'} to tokenize; run `drivevla extract` first"
            )
        base = parquet_file(shards[0]).schema_arrow
        self.output_schema = pa.schema(
            [SOURCE_SHARD_FIELD, base.field("sample_id"), ACTION_TOKENS_FIELD],
            metadata=base.metadata,
        )
        st_path, _ = codebook_paths(self.codebook_path)
        # a changed codebook must not mix with tokens of the old one in one output
        k = load_codebook(self.codebook_path).k  # fail now, not in a worker, if it is invalid
        if k > np.iinfo(np.int16).max + 1:  # action_tokens is int16: larger ids would wrap around
            raise ValueError(
                f"codebook {self.codebook_path} has K={k}; action_tokens (int16) holds K <= 32768"
            )
        self._codebook_sha = hashlib.sha256(st_path.read_bytes()).hexdigest()
        self._tokenizer: ActionTokenizer | None = None

    def config_dict(self) -> dict[str, Any]:
        # "output" changes the fingerprint of outputs written before the token-table layout
        return {
            "in_dir": str(self.in_dir),
            "codebook_sha256": self._codebook_sha,
            "output": list(TOKEN_COLUMNS),
            "rows_per_partition": self.rows_per_partition,
        }

    def partitions(self) -> list[Partition]:
        shards = list_shards(self.in_dir)
        estimate = _rows_per_shard(self.in_dir, shards)
        parts, group, rows = [], [], 0
        for p in shards:
            n = estimate.get(str(p), DEFAULT_MAX_ROWS)
            if group and rows + n > self.rows_per_partition:
                parts.append(Partition(Path(group[0]).stem, {"shards": group}))
                group, rows = [], 0
            group.append(str(p))
            rows += n
        if group:
            parts.append(Partition(Path(group[0]).stem, {"shards": group}))
        return parts

    def setup(self) -> None:
        self._tokenizer = ActionTokenizer(load_codebook(self.codebook_path), workers=1)

    def teardown(self) -> None:
        self._tokenizer = None

    def process(self, partition: Partition) -> Iterator[Outcome]:
        if self._tokenizer is None:
            self.setup()
        assert self._tokenizer is not None
        paths = list(partition.payload["shards"])
        # One thread: a worker has one CPU (Ray actors take num_cpus=1). Only the two columns
        # tokenize needs are read: the camera frames are never read, decoded or rewritten.
        tables = [parquet_file(p).read(columns=READ_COLUMNS, use_threads=False) for p in paths]
        counts = np.array([t.num_rows for t in tables])
        table = pa.concat_tables(tables)
        of_row = np.repeat(np.arange(len(paths)), counts)  # row -> index of its extracted shard
        ids, ok, bad = encode_ids(
            self._tokenizer, table.column("future")
        )  # one batch for the group
        # Dropped and failed rows are reported one by one; only their sample ids become Python objects.
        sample_ids = table.column("sample_id")
        for i in np.flatnonzero(~ok):
            i = int(i)
            sid, path = sample_ids[i].as_py(), paths[of_row[i]]
            if i in bad:
                yield Fail(sid, INVALID_FUTURE, bad[i], path)
            else:
                yield Drop(sid, NO_FUTURE, path)
        if ok.any():
            tokens = pa.FixedSizeListArray.from_arrays(
                pa.array(ids.reshape(-1), pa.int16()), FUTURE_STEPS
            )
            keep = pa.array(ok)
            stems = pa.array([Path(p).stem for p in paths], pa.string())
            source = pc.take(stems, pa.array(of_row[ok], pa.int32()))
            yield pa.Table.from_arrays(
                [source, sample_ids.filter(keep), tokens], schema=self.output_schema
            )


def _rows_per_shard(in_dir: Path, shards: list[Path]) -> dict[str, int]:
    """Rows of each extracted shard, estimated from the extract markers (``written`` over the shards listed).

    Only partition sizes depend on it, never what is written; shards no marker counts
    (a directory written by hand) get the default shard size.
    """
    markers = committed_markers(in_dir) or {}
    d = fs.join(in_dir, SHARD_DIR)
    out = {}
    for m in markers.values():
        names = m.get("shards") or []
        for name in names:
            out[str(d / name)] = max(1, int(m.get("written", 0)) // len(names))
    return {str(p): out.get(str(p), DEFAULT_MAX_ROWS) for p in shards}


def keep_rows(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """The rows where ``mask``, as zero-copy slices of ``table`` (``filter`` would copy every image)."""
    if mask.all():
        return table
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    runs = [table.slice(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return pa.concat_tables(runs) if runs else table.slice(0, 0)


def encode_ids(
    tokenizer: ActionTokenizer, column: pa.ChunkedArray | pa.Array
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """``(ids, ok, bad)``: int16 ids ``[ok.sum(), 10]`` of the rows where ``ok``, and why rows are bad.

    A row that is neither ``ok`` nor in ``bad`` has no future (null). Vectorised: the
    futures go to the encoder as one float64 array; no row becomes a Python object.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    bad: dict[int, str] = {}
    for i in np.flatnonzero(valid & (lengths != FUTURE_STEPS)):
        bad[int(i)] = f"future has {int(lengths[i])} poses, expected {FUTURE_STEPS}"
    ok = valid & (lengths == FUTURE_STEPS)
    if ok.any():
        # a null pose would vanish in flatten() and shift every later row's values
        poses = arr.filter(pa.array(ok)).flatten()
        null_pose = poses.is_null().to_numpy(zero_copy_only=False).reshape(-1, FUTURE_STEPS)
        for i in np.flatnonzero(ok)[null_pose.any(axis=1)]:
            bad[int(i)] = "future holds a null pose"
            ok[i] = False
    if not ok.any():
        return np.zeros((0, FUTURE_STEPS), np.int16), ok, bad
    sub = arr.filter(pa.array(ok))
    fut = (
        sub.flatten()
        .flatten()
        .to_numpy(zero_copy_only=False)
        .astype(np.float64)
        .reshape(-1, FUTURE_STEPS, 3)
    )
    rows = np.flatnonzero(ok)
    finite = np.isfinite(fut).all(axis=(1, 2))
    for i in rows[~finite]:
        bad[int(i)] = "future holds NaN/inf values"
        ok[i] = False
    ids = (
        tokenizer.encode(fut[finite]).astype(np.int16)
        if finite.any()
        else np.zeros((0, FUTURE_STEPS), np.int16)
    )
    return ids.reshape(-1, FUTURE_STEPS), ok, bad


def encode_column(
    tokenizer: ActionTokenizer, column: pa.ChunkedArray
) -> tuple[list[list[int] | None], dict[int, str]]:
    """Token ids per row of a ``future`` column (None where null or bad) and the rows that cannot be encoded."""
    ids, ok, bad = encode_ids(tokenizer, column)
    out: list[list[int] | None] = [None] * len(ok)
    for r, t in zip(np.flatnonzero(ok), ids.tolist(), strict=True):
        out[int(r)] = t
    return out, bad


# --------------------------------------------------------------------------- reading rows with their tokens


@dataclass(frozen=True)
class InputShard:
    """One unit of work of a stage that reads extracted rows (with their action tokens, where tokenized).

    ``id`` is the extracted shard's stem (the partition id of the stages that read rows).
    ``tokens`` are the token shards holding its rows' tokens (usually one), ``None`` when not
    tokenized. ``rows`` is how many rows :func:`read_input` gives.
    """

    id: str
    shard: str
    tokens: tuple[str, ...] | None
    rows: int


def input_shards(in_dir: str | Path, tokens_dir: str | Path | None = None) -> list[InputShard]:
    """The committed shards of ``in_dir``, in canonical order, with their token shards in ``tokens_dir``.

    Without ``tokens_dir``: every extracted shard (row counts from the Parquet footers).
    With it: the extracted shards that have tokenized rows (one whose rows tokenize all
    dropped has none and no unit); only the token shards' ``source_shard`` column is read.
    Token shards naming an extracted shard that is gone, or lacking that column (written
    by an older version), raise :class:`StaleTokensError`.
    """
    extracted = list_shards(in_dir)
    if tokens_dir is None:
        return [
            InputShard(p.stem, str(p), None, parquet_file(p).metadata.num_rows) for p in extracted
        ]
    by_stem = {p.stem: p for p in extracted}
    found: dict[str, list[tuple[str, int]]] = {}
    for tp in list_shards(tokens_dir):
        if SOURCE_SHARD_FIELD.name not in parquet_file(tp).schema_arrow.names:
            raise StaleTokensError(
                f"token shard {tp} has no {SOURCE_SHARD_FIELD.name!r} column (written by an older "
                f"version); rerun `drivevla tokenize --overwrite`"
            )
        counts = pc.value_counts(read_parquet(tp, [SOURCE_SHARD_FIELD.name]).column(0))
        for item in counts.to_pylist():
            stem, n = item["values"], item["counts"]
            if stem not in by_stem:
                raise StaleTokensError(
                    f"token shard {tp} holds tokens of extracted shard {stem!r}, which {in_dir} no "
                    f"longer holds (extract was rerun after tokenize); rerun `drivevla tokenize --overwrite`"
                )
            found.setdefault(stem, []).append((str(tp), n))
    return [
        InputShard(
            p.stem, str(p), tuple(t for t, _ in found[p.stem]), sum(n for _, n in found[p.stem])
        )
        for p in extracted
        if p.stem in found
    ]


def input_schema(in_dir: str | Path, tokens_dir: str | Path | None = None) -> pa.Schema:
    """The schema of :func:`read_input`'s tables: the extracted schema, plus ``action_tokens`` with ``tokens_dir``.

    The token field is the one stored in the token shards (as Parquet gives it back), so the
    schema matches the joined tables exactly.
    """
    shards = list_shards(in_dir)
    if not shards:
        raise FileNotFoundError(f"no shards under {fs.join(in_dir, SHARD_DIR)}")
    base = parquet_file(shards[0]).schema_arrow
    if tokens_dir is None:
        return base
    token_shards = list_shards(tokens_dir)
    name = ACTION_TOKENS_FIELD.name
    field = (
        parquet_file(token_shards[0]).schema_arrow.field(name)
        if token_shards
        else ACTION_TOKENS_FIELD
    )
    return schema_with(field, base=base)


def read_input(unit: InputShard, columns: Sequence[str] | None = None) -> pa.Table:
    """The unit's extracted rows (``columns`` of them), joined with their ``action_tokens`` when tokenized.

    The join keeps the extracted rows whose ``sample_id`` the token shard lists, in the
    extracted order, and checks that they are exactly the token shard's rows in the same
    order: anything else means the extracted shard changed after tokenize, and the error
    names both files. No row becomes a Python object (zero-copy slices, one appended column).
    """
    if unit.tokens is None:
        return read_parquet(unit.shard, columns)
    name = ACTION_TOKENS_FIELD.name
    want = None if columns is None else [c for c in columns if c != name]
    if want is not None and "sample_id" not in want:
        want = ["sample_id", *want]
    tok = pa.concat_tables([read_parquet(t, list(TOKEN_COLUMNS)) for t in unit.tokens])
    tok = tok.filter(pc.equal(tok.column(SOURCE_SHARD_FIELD.name), unit.id))
    base = read_parquet(unit.shard, want)
    ids = tok.column("sample_id").combine_chunks()
    mask = pc.is_in(base.column("sample_id"), value_set=ids).to_numpy(zero_copy_only=False)
    rows = keep_rows(base, mask)
    if rows.num_rows != tok.num_rows or not rows.column("sample_id").equals(
        tok.column("sample_id")
    ):
        how = (
            "in another order" if rows.num_rows == tok.num_rows else f"only {rows.num_rows} of them"
        )
        raise StaleTokensError(
            f"token shard {', '.join(unit.tokens)} does not match extracted shard {unit.shard}: it lists "
            f"{tok.num_rows} samples of that shard, which holds {how}; the extracted rows changed after "
            f"tokenize: rerun `drivevla tokenize --overwrite`"
        )
    field, column = tok.schema.field(name), tok.column(name)
    if name in rows.column_names:
        rows = rows.set_column(rows.column_names.index(name), field, column)
    else:
        rows = rows.append_column(field, column)
    return rows if columns is None else rows.select(list(columns))
