"""Append-only, crash-safe result store keyed by request key (DESIGN.md section 6).

Layout: one directory of JSONL *segments*. Every writer (process) appends to
its own segment, named ``<utc time>-<host>-<pid>-<uuid>.jsonl``, so writers on
several machines sharing a file system never write the same file and need no
lock. Each line is ``{"k": key, "v": value, "c": checksum}`` and is flushed
and fsynced before the result counts as done. Readers merge every segment in
name (roughly creation) order and ignore what a crash can leave behind: a
torn last line, a line whose checksum does not match. Per key, the first
``ok`` result wins; without one, the last failure is kept (a rerun resends
it when asked to).

On an object store (``s3://``, ``gs://``: any URL :mod:`pipelines.io.fs`
resolves) there is no append and no fsync. There a writer turns every flush
batch into one immutable object, ``<utc time>-<host>-<pid>-<uuid>-<seq>.jsonl``
(``seq`` counts the writer's batches, zero-padded so names sort in write
order), uploaded with a single PUT: it is visible whole or not at all, so a
kill loses at most the batch in flight, whose results were not yet reported as
committed. A batch counts as done only when its PUT has returned. Readers
merge every object in name order exactly as they merge local segments, so
the precedence rules above are the same on both.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.io import fs

log = logging.getLogger(__name__)
SEGMENT_SUFFIX = ".jsonl"


def _checksum(key: str, value: Any) -> str:
    blob = json.dumps([key, value], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_line(key: str, value: dict[str, Any]) -> bytes:
    """One committed record as a JSONL line."""
    rec = {"k": key, "v": value, "c": _checksum(key, value)}
    return (json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


@dataclass
class LoadStats:
    segments: int = 0
    lines: int = 0
    torn: int = 0  # last line without newline (crash or a writer still writing)
    corrupt: int = 0  # invalid JSON or checksum mismatch
    duplicates: int = 0  # a key already holding an ok result


def _segments(directory: Path) -> list[tuple[Path, bytes]]:
    """``(path, content)`` of every segment, in name order (one concurrent fetch remotely)."""
    segs = sorted(fs.glob(directory, f"*{SEGMENT_SUFFIX}"), key=lambda p: p.name)
    if not fs.is_url(directory):
        return [(seg, seg.read_bytes()) for seg in segs]
    got = fs.cat_many(segs)
    out = []
    for seg, data in zip(segs, got, strict=True):
        if data is None:  # objects are immutable and never deleted while a run holds the lease
            raise OSError(f"cache segment {seg} was listed but cannot be read")
        out.append((seg, data))
    return out


def iter_records(
    directory: str | Path, stats: LoadStats | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Valid ``(key, value)`` records of every segment, in segment-name then line order.

    ``directory`` is a local path or an object-store URL (:func:`pipelines.io.fs.as_path`).
    """
    stats = stats if stats is not None else LoadStats()
    directory = fs.as_path(directory)
    if not fs.is_dir(directory):
        return
    for _seg, data in _segments(directory):
        stats.segments += 1
        lines = data.split(b"\n")
        if lines and lines[-1]:
            stats.torn += 1
        for raw in lines[:-1]:
            if not raw:
                continue
            stats.lines += 1
            try:
                rec = json.loads(raw)
                key, value, check = rec["k"], rec["v"], rec["c"]
            except (ValueError, KeyError, TypeError):
                stats.corrupt += 1
                continue
            if _checksum(key, value) != check:
                stats.corrupt += 1
                continue
            yield key, value


def _writer_stem() -> str:
    """``<utc time>-<host>-<pid>-<uuid>``: unique per writer; names sort in creation order."""
    now = time.time()  # microseconds
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}"
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
    return f"{stamp}-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultCache:
    """Results of one scope (e.g. one input partition); values are JSON dicts with a ``status``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = fs.as_path(directory)  # never Path(): that turns s3://b/k into s3:/b/k
        self.remote = fs.is_url(self.directory)
        self._fh: Any = None
        self.segment: Path | None = None  # local: the open segment; remote: the last object written
        self._stem: str | None = None  # remote: this writer's object-name prefix
        self._seq = 0
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def load(self) -> tuple[dict[str, dict[str, Any]], LoadStats]:
        """Merged view: key -> first ok value, else the last failure."""
        stats = LoadStats()
        out: dict[str, dict[str, Any]] = {}
        for key, value in iter_records(self.directory, stats):
            prev = out.get(key)
            if prev is not None and prev.get("status") == "ok":
                stats.duplicates += 1
                continue
            out[key] = value
        if stats.torn or stats.corrupt:
            log.warning(
                "cache %s: ignored %d torn and %d corrupt lines (crash leftovers)",
                self.directory,
                stats.torn,
                stats.corrupt,
            )
        return out, stats

    def _open(self) -> Any:
        if self._fh is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.segment = self.directory / f"{_writer_stem()}{SEGMENT_SUFFIX}"
            # O_APPEND + O_EXCL: our own new file; appends land at the end even if reopened.
            fd = os.open(self.segment, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            self._fh = os.fdopen(fd, "ab", buffering=0)
            _fsync_dir(self.directory)  # the new file's name must survive a crash too
        return self._fh

    def _write_sync(self, data: bytes) -> None:
        if self.remote:
            self._put_object(data)
            return
        fh = self._open()
        try:
            view = memoryview(data)
            while view:  # an unbuffered write may be partial (e.g. a full disk)
                view = view[fh.write(view) :]
            os.fsync(fh.fileno())
        except BaseException:
            # The segment may now end in a torn line; later records appended to it would be
            # glued to that fragment and lost on load. Continue in a fresh segment instead.
            self.close()
            raise

    def _put_object(self, data: bytes) -> None:
        """One immutable object per batch (object stores have no append): one PUT, whole or absent."""
        if self._stem is None:
            self._stem = _writer_stem()
        self._seq += 1  # never reused, also after a failed PUT (it may have landed after all)
        obj = self.directory / f"{self._stem}-{self._seq:08d}{SEGMENT_SUFFIX}"
        fs.write_bytes(obj, data)
        self.segment = obj

    def append(self, key: str, value: dict[str, Any]) -> None:
        """Commit one record (durable when this returns)."""
        self._write_sync(encode_line(key, value))

    async def commit(self, key: str, value: dict[str, Any]) -> None:
        """Commit one record from async code; concurrent commits share one write + fsync."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((encode_line(key, value), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())
        await fut

    async def _flush_loop(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._write_sync, b"".join(line for line, _ in batch))
            except BaseException as exc:  # the caller must not treat these as done
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()
