"""Built shards -> batches: shard index, row decoding, length-grouped resumable sampling, collation.

Reading: the build stage writes Parquet shards (``<data>/build/train-*.parquet``;
the same files ``datasets.load_dataset("parquet", data_files=...)`` reads).
The trainer reads them with pyarrow directly, one row group at a time,
instead of ``datasets``: exact resume, length grouping and decode workers need
random access by row, and ``load_dataset`` would first copy every JPEG into
its Arrow cache. Shuffling is block-wise (row groups shuffled, rows shuffled
inside a window) so each worker reads a row group once per window.

Decoding: :class:`BuiltRows` turns a row into model inputs with the one
prompt builder (:func:`annotators.training_prompt.model_inputs_from_row`), in
DataLoader worker processes when ``num_workers`` > 0.

Sampling: :class:`LengthGroupedBatchSampler` is a pure function of
(seed, epoch, rank, world size), so a resumed run skips the consumed batches
and sees exactly the batches an uninterrupted run would have seen.

Public API for GRPO/eval: ``ShardIndex.from_glob``, ``BuiltRows(index,
processor, ...)`` (``raw_row(i)`` for reward inputs), ``LengthGroupedBatchSampler``,
``collate(examples, pad_id, padding_side)``.
"""

from __future__ import annotations

import glob
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from annotators.training_prompt import CAMERAS_FOR_MODEL, model_inputs_from_row

log = logging.getLogger(__name__)

REASONING_COLUMNS = ("reasoning_scene", "reasoning_objects", "reasoning_intent")
# Columns eval and rewards need next to the model inputs.
META_COLUMNS = ("sample_id", "dataset", "future", "velocity", "meta_lateral", "meta_longitudinal",
                "action_tokens", "think_mode", "preference_trajectories", "preference_scores", "objects")


def expand_globs(patterns: str | Sequence[str]) -> list[str]:
    """Sorted files matching comma-separated globs; none matching is an error naming the patterns."""
    pats = [p.strip() for p in patterns.split(",")] if isinstance(patterns, str) else list(patterns)
    files = sorted({f for p in pats if p for f in glob.glob(p)})
    if not files:
        raise FileNotFoundError(f"no Parquet shards match {pats}: build the dataset first (make build)")
    return files


@dataclass(frozen=True)
class ShardIndex:
    """Where each row lives: (file, row group, offset) plus a length hint for grouping."""

    files: tuple[str, ...]
    file_idx: np.ndarray  # (N,) int32
    group_idx: np.ndarray  # (N,) int32 row group within the file
    offset: np.ndarray  # (N,) int32 row within the row group
    block: np.ndarray  # (N,) int32 global row-group id (shuffling unit)
    length_hint: np.ndarray  # (N,) int32 relative target length (chars/4)

    def __len__(self) -> int:
        return len(self.file_idx)

    @classmethod
    def from_glob(cls, patterns: str | Sequence[str]) -> ShardIndex:
        import pyarrow.parquet as pq

        files = expand_globs(patterns)
        fi, gi, off, blk, hint = [], [], [], [], []
        block = 0
        for k, f in enumerate(files):
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            cols = [c for c in ("think_mode", *REASONING_COLUMNS) if c in names]
            lengths = _length_hints(pf.read(columns=cols)) if cols else np.zeros(pf.metadata.num_rows)
            pos = 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                fi.append(np.full(n, k))
                gi.append(np.full(n, g))
                off.append(np.arange(n))
                blk.append(np.full(n, block))
                hint.append(lengths[pos : pos + n])
                pos += n
                block += 1
        cat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32)  # noqa: E731
        idx = cls(tuple(files), cat(fi), cat(gi), cat(off), cat(blk), cat(hint))
        log.info("indexed %d rows in %d shards (%d row groups)", len(idx), len(files), block)
        return idx


def _length_hints(table: Any) -> np.ndarray:
    total = np.full(table.num_rows, 40, dtype=np.int64)  # answer block, ~40 tokens
    for c in REASONING_COLUMNS:
        if c in table.column_names:
            vals = table.column(c).to_pylist()
            total += np.asarray([len(v or "") // 4 for v in vals], dtype=np.int64)
    return total


class BuiltRows:
    """Map-style dataset: global row index -> model-input example (numpy), decoded on access.

    Keeps a small per-process LRU of decoded row groups. Picklable (file
    handles are opened lazily in each worker).
    """

    def __init__(
        self,
        index: ShardIndex,
        processor: Any,
        *,
        num_action_tokens: int,
        cameras: Sequence[str] = CAMERAS_FOR_MODEL,
        with_target: bool = True,
        check_stored_messages: bool = True,
        max_length: int | None = None,
        cache_groups: int = 4,
    ) -> None:
        self.index = index
        self.processor = processor
        self.num_action_tokens = num_action_tokens
        self.cameras = tuple(cameras)
        self.with_target = with_target
        self.check_stored_messages = check_stored_messages
        self.max_length = max_length
        self.cache_groups = cache_groups
        self._cache: OrderedDict[tuple[int, int], list[dict[str, Any]]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.index)

    def raw_row(self, i: int) -> dict[str, Any]:
        """The built row as a dict (all columns)."""
        import pyarrow.parquet as pq

        key = (int(self.index.file_idx[i]), int(self.index.group_idx[i]))
        rows = self._cache.get(key)
        if rows is None:
            table = pq.ParquetFile(self.index.files[key[0]]).read_row_group(key[1])
            rows = table.to_pylist()
            self._cache[key] = rows
            while len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return rows[int(self.index.offset[i])]

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.raw_row(i)
        ex = model_inputs_from_row(
            row,
            self.processor,
            with_target=self.with_target,
            num_action_tokens=self.num_action_tokens,
            cameras=self.cameras,
            check_stored_messages=self.check_stored_messages,
        )
        if self.max_length is not None and len(ex["input_ids"]) > self.max_length:
            raise ValueError(
                f"sample {row.get('sample_id')!r} in {self.index.files[self.index.file_idx[i]]}: "
                f"{len(ex['input_ids'])} tokens exceed data.max_length={self.max_length}"
            )
        ex["is_slow"] = row.get("think_mode") == "slow"
        ex["index"] = int(i)
        ex["meta"] = {k: row.get(k) for k in META_COLUMNS}
        return ex


class LengthGroupedBatchSampler:
    """Deterministic, resumable, length-grouped batches of row indices for one rank.

    Per epoch: row groups are shuffled (seed, epoch), rows shuffled inside
    windows of ``batch_size * world_size * group_size`` rows, each window
    sorted by length hint and cut into batches (similar lengths -> little
    padding), batches shuffled, then dealt round-robin to ranks. The tail
    that does not fill a batch on every rank is dropped. ``start_batch``
    skips batches already consumed (resume).
    """

    def __init__(
        self,
        index: ShardIndex,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        group_size: int = 16,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        self.index, self.batch_size, self.rank, self.world_size = index, batch_size, rank, world_size
        self.group_size, self.shuffle, self.seed, self.drop_last = group_size, shuffle, seed, drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        n = len(self.index)
        if not self.shuffle:
            order = np.arange(n)
            batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            blocks = rng.permutation(int(self.index.block.max()) + 1 if n else 0)
            rank_of_block = np.empty_like(blocks)
            rank_of_block[blocks] = np.arange(len(blocks))
            order = np.lexsort((rng.random(n), rank_of_block[self.index.block]))
            window = self.batch_size * self.world_size * self.group_size
            batches = []
            for s in range(0, n, window):
                w = order[s : s + window]
                w = w[np.argsort(-self.index.length_hint[w], kind="stable")]
                chunk = [w[i : i + self.batch_size] for i in range(0, len(w), self.batch_size)]
                batches += [chunk[j] for j in rng.permutation(len(chunk))]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.global_batches(self.epoch)[self.rank :: self.world_size]
        for b in mine[self.start_batch :]:
            yield [int(i) for i in b]

    def __len__(self) -> int:
        return max(0, len(self.global_batches(self.epoch)[self.rank :: self.world_size]) - self.start_batch)


def video_tensors(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The processor's video arrays of several examples, concatenated as torch tensors."""
    import torch  # lazy, like the rest of this module: data loading code runs in light workers

    keys = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return {k: torch.from_numpy(np.concatenate([e[k] for e in examples])) for k in keys}


def collate(examples: Sequence[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad to the longest sequence (labels -100 and attention 0 on padding) and concatenate videos.

    ``padding_side="left"`` is for batched generation. Returns torch tensors
    plus ``sample_ids``, ``indices`` and ``meta`` (lists).
    """
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    b = len(examples)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    mm = torch.zeros((b, n), dtype=torch.long)
    att = torch.zeros((b, n), dtype=torch.long)
    has_labels = "labels" in examples[0]
    labels = torch.full((b, n), -100, dtype=torch.long) if has_labels else None
    for i, e in enumerate(examples):
        L = len(e["input_ids"])
        sl = slice(0, L) if padding_side == "right" else slice(n - L, n)
        ids[i, sl] = torch.from_numpy(e["input_ids"])
        mm[i, sl] = torch.from_numpy(e["mm_token_type_ids"])
        att[i, sl] = 1
        if labels is not None:
            labels[i, sl] = torch.from_numpy(e["labels"])
    out: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": att,
        "mm_token_type_ids": mm,
        **video_tensors(examples),
        "is_slow": torch.tensor([bool(e.get("is_slow")) for e in examples]),
        "sample_ids": [e["sample_id"] for e in examples],
        "indices": [e.get("index") for e in examples],
        "meta": [e.get("meta") for e in examples],
    }
    if labels is not None:
        out["labels"] = labels
    return out


def model_batch(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The tensors the HF model's forward takes, on ``device`` (labels excluded)."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
            "second_per_grid_ts")
    return {k: batch[k].to(device) for k in keys}
