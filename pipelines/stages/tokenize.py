"""Tokenize stage: add ``action_tokens`` (int16 [10]) to extracted samples.

Input: one dataset's extracted shards (``<data>/extract/<dataset>/``), one
partition per input shard. Output: the same rows and columns plus
``action_tokens`` (codebook ids of the future, rollout-aware greedy).

A row without a future (test split) cannot be tokenized: it is dropped with
reason ``no_future`` rather than written with a null ``action_tokens``,
because pyarrow (<= 25) cannot read back a Parquet column of nullable
fixed-size lists that holds nulls (apache/arrow GH-35692: "Expected all lists
to be of size=10 but index i had size=0"), so one null would make the whole
shard unreadable downstream. No later stage can use such a row anyway (the
annotator needs the future's meta-action; the build drops rows without
tokens). A row whose future is malformed (wrong length, a null pose, NaN) fails
with ``invalid_future``.

The whole shard's futures are encoded in one batch (vectorised); the codebook
is loaded once per worker in :meth:`TokenizeStage.setup`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.shards import list_shards
from pipelines.core.stage import Drop, Fail, Outcome, Partition, Stage
from pipelines.io.fs import as_path, parquet_file
from schemas.sample import ACTION_TOKENS_FIELD, FUTURE_STEPS, schema_with
from tokenizer.codebook import codebook_paths, load_codebook
from tokenizer.tokenizer import ActionTokenizer

log = logging.getLogger(__name__)

NO_FUTURE = "no_future"
INVALID_FUTURE = "invalid_future"


class TokenizeStage(Stage):
    """Encode every row's future with a codebook; rows keep all their columns."""

    name = "tokenize"

    def __init__(self, in_dir: str | Path, codebook: str | Path) -> None:
        self.in_dir = as_path(in_dir)  # local path or s3:// / gs:// URL
        self.codebook_path = as_path(codebook)
        shards = list_shards(self.in_dir)
        if not shards:
            raise FileNotFoundError(
                f"no shards under {self.in_dir / 'shards'} to tokenize; run `drivevla extract` first"
            )
        base = parquet_file(shards[0]).schema_arrow
        self.output_schema = schema_with(ACTION_TOKENS_FIELD, base=base)
        st_path, _ = codebook_paths(self.codebook_path)
        # a changed codebook must not mix with tokens of the old one in one output
        k = load_codebook(self.codebook_path).k  # fail now, not in a worker, if it is invalid
        if k > np.iinfo(np.int16).max + 1:  # action_tokens is int16: larger ids would wrap around
            raise ValueError(f"codebook {self.codebook_path} has K={k}; action_tokens (int16) holds K <= 32768")
        self._codebook_sha = hashlib.sha256(st_path.read_bytes()).hexdigest()
        self._tokenizer: ActionTokenizer | None = None

    def config_dict(self) -> dict[str, Any]:
        return {"in_dir": str(self.in_dir), "codebook_sha256": self._codebook_sha}

    def partitions(self) -> list[Partition]:
        return [Partition(p.stem, {"shard": str(p)}) for p in list_shards(self.in_dir)]

    def setup(self) -> None:
        self._tokenizer = ActionTokenizer(load_codebook(self.codebook_path), workers=1)

    def teardown(self) -> None:
        self._tokenizer = None

    def process(self, partition: Partition) -> Iterator[Outcome]:
        if self._tokenizer is None:
            self.setup()
        assert self._tokenizer is not None
        path = partition.payload["shard"]
        # One thread: a worker has one CPU (Ray actors take num_cpus=1); measured 1.3-1.8x faster end to end
        # than pq.read_table's threaded dataset reader on the 2-core test machine (bench/scale.py).
        table = parquet_file(path).read(use_threads=False)
        ids, ok, bad = encode_ids(self._tokenizer, table.column("future"))
        # Dropped and failed rows are reported one by one; only their sample ids become Python objects.
        sample_ids = table.column("sample_id").to_pylist()
        for i in np.flatnonzero(~ok):
            i = int(i)
            if i in bad:
                yield Fail(sample_ids[i], INVALID_FUTURE, bad[i], path)
            else:
                yield Drop(sample_ids[i], NO_FUTURE, path)
        if ok.any():
            # The written rows stay Arrow: select them, append the token column (images are never decoded).
            kept = keep_rows(table, ok)
            tokens = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int16()), FUTURE_STEPS)
            name = ACTION_TOKENS_FIELD.name
            if name in kept.column_names:
                kept = kept.set_column(kept.column_names.index(name), ACTION_TOKENS_FIELD, tokens)
            else:
                kept = kept.append_column(ACTION_TOKENS_FIELD, tokens)
            yield kept.cast(self.output_schema)


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
    fut = sub.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, FUTURE_STEPS, 3)
    rows = np.flatnonzero(ok)
    finite = np.isfinite(fut).all(axis=(1, 2))
    for i in rows[~finite]:
        bad[int(i)] = "future holds NaN/inf values"
        ok[i] = False
    ids = tokenizer.encode(fut[finite]).astype(np.int16) if finite.any() else np.zeros((0, FUTURE_STEPS), np.int16)
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
