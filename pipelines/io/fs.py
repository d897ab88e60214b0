"""One filesystem layer for every input and output: local paths and object-store URLs.

Built on **fsspec** (with s3fs / gcsfs), the library the ``datasets`` /
``huggingface_hub`` ecosystem uses, so ``s3://``, ``gs://``, ``hf://``,
``memory://`` ... work wherever a local path does; pathlib-style objects for
URLs come from ``universal_pathlib`` (``UPath``, itself a thin layer over
fsspec), so code written against :class:`pathlib.Path` (``/``, ``.name``,
``.glob``, ``.open``, ``.read_text``) keeps working on both. Local paths stay
plain :class:`pathlib.Path` objects.

Credentials and endpoints come only from the environment and each library's
standard chain (``AWS_ENDPOINT_URL`` / ``AWS_ACCESS_KEY_ID`` ... for S3 and
S3-compatible servers, application-default credentials for GCS); nothing here
reads, stores or logs them.

Object stores have no atomic rename: :func:`write_bytes` and
:func:`write_parquet` write locally through a temp name + ``os.replace`` and
remotely with a single object PUT (visible whole or not at all). The commit
protocol built on top (unique data object names, the marker written last,
readers trusting markers only) lives in :mod:`pipelines.core.runner`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

try:  # a pathlib API over fsspec; only needed for URLs
    from upath import UPath
except ImportError:  # pragma: no cover - declared as a dependency
    UPath = None  # type: ignore[assignment,misc]

AnyPath = str | os.PathLike | PurePath

LOCAL_PROTOCOLS = ("file", "local")


def is_url(p: AnyPath) -> bool:
    """True for ``scheme://...`` of a non-local filesystem (``s3://b/k``, ``gs://b/k``)."""
    if isinstance(p, Path) and not _is_upath(p):
        return False
    s = str(p)
    if "://" not in s:
        return False
    return s.split("://", 1)[0] not in LOCAL_PROTOCOLS


def _is_upath(p: Any) -> bool:
    return UPath is not None and isinstance(p, UPath) and p.protocol not in ("", *LOCAL_PROTOCOLS)


def as_path(p: AnyPath) -> Path:
    """A path object for ``p``: :class:`pathlib.Path` locally, a ``UPath`` for a URL.

    Use this (not ``Path(p)``) on anything a user typed: ``Path("gs://b/x")``
    collapses the double slash into ``gs:/b/x``. Also the ``type=`` of CLI
    path arguments.
    """
    if _is_upath(p):
        return p  # type: ignore[return-value]
    if isinstance(p, Path):
        return p
    s = os.fspath(p) if not isinstance(p, str) else p
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    if is_url(s):
        if UPath is None:
            raise RuntimeError(f"{s}: URLs need universal_pathlib (pip install universal-pathlib)")
        return UPath(s)  # type: ignore[return-value]  # a pathlib-compatible path over fsspec
    return Path(s)


def to_str(p: AnyPath) -> str:
    """The string form that round-trips through :func:`as_path` (``s3://b/k`` keeps its scheme)."""
    return str(as_path(p))


def url_to_fs(p: AnyPath) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or URL (``fsspec.core.url_to_fs``)."""
    return fsspec.core.url_to_fs(to_str(p))


def refresh(p: AnyPath) -> None:
    """Forget cached listings under ``p`` (s3fs/gcsfs cache them per process).

    Other processes (workers on other machines) write markers and shards; a
    driver that listed a prefix before must not trust that listing afterwards.
    """
    if is_url(p):
        fsys, inner = url_to_fs(p)
        fsys.invalidate_cache(inner)


def join(base: AnyPath, *parts: str) -> Path:
    """``base / part / ...`` keeping URL schemes intact."""
    return as_path(base).joinpath(*parts)


def exists(p: AnyPath) -> bool:
    refresh(p)
    return as_path(p).exists()


def is_dir(p: AnyPath) -> bool:
    refresh(p)
    return as_path(p).is_dir()


def is_file(p: AnyPath) -> bool:
    refresh(p)
    return as_path(p).is_file()


def open_file(p: AnyPath, mode: str = "rb") -> IO[Any]:
    """Open a file for reading or writing (binary or text) anywhere fsspec reaches."""
    path = as_path(p)
    if "w" in mode and not is_url(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    return path.open(mode)


def makedirs(p: AnyPath) -> None:
    """Create a directory locally; a no-op on object stores (prefixes need no creation)."""
    path = as_path(p)
    if not is_url(path):
        path.mkdir(parents=True, exist_ok=True)


def glob(base: AnyPath, pattern: str) -> list[Path]:
    """Entries of ``base`` matching ``pattern``, sorted by their string form."""
    path = as_path(base)
    refresh(path)
    if not path.is_dir():
        return []
    return sorted(path.glob(pattern), key=str)


def listdir(p: AnyPath) -> list[Path]:
    """Direct children of a directory (sorted); ``[]`` when it does not exist."""
    path = as_path(p)
    refresh(path)
    if not path.is_dir():
        return []
    return sorted(path.iterdir(), key=str)


def remove(p: AnyPath, missing_ok: bool = True) -> None:
    path = as_path(p)
    try:
        path.unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(p: AnyPath) -> None:
    """Delete a directory / prefix and everything below it (no error when absent)."""
    refresh(p)
    fs, inner = url_to_fs(p)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def read_bytes(p: AnyPath) -> bytes:
    refresh(p)
    return as_path(p).read_bytes()


def read_text(p: AnyPath) -> str:
    return as_path(p).read_text()


def cat_many(paths: Sequence[AnyPath]) -> list[bytes | None]:
    """Contents of several small files (concurrent requests on object stores); ``None`` if absent."""
    if not paths:
        return []
    fs, _ = url_to_fs(paths[0])
    inner = [url_to_fs(p)[1] for p in paths]
    got = fs.cat(inner, on_error="return")
    return [None if isinstance(got.get(k), Exception) or k not in got else got[k] for k in inner]


def write_bytes(p: AnyPath, data: bytes) -> None:
    """Write a whole file so that readers see the old content or the new, never a partial one.

    Locally: a unique temp name, fsync, ``os.replace``. On an object store: one
    PUT (objects become visible whole).
    """
    path = as_path(p)
    if is_url(path):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_parquet(table: pa.Table, p: AnyPath, **kwargs: Any) -> None:
    """Write one Parquet file atomically (temp + rename locally, one object upload remotely)."""
    path = as_path(p)
    kwargs.setdefault("compression", "zstd")
    if is_url(path):
        with path.open("wb") as fh:
            pq.write_table(table, fh, **kwargs)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp, **kwargs)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_parquet(p: AnyPath, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a Parquet file (or ``columns`` of it) from a local path or URL."""
    fs, inner = url_to_fs(p)
    return pq.read_table(inner, columns=list(columns) if columns else None, filesystem=fs)


def parquet_file(p: AnyPath) -> pq.ParquetFile:
    """A :class:`pyarrow.parquet.ParquetFile` for streaming row groups / batches."""
    path = as_path(p)
    if not is_url(path):
        return pq.ParquetFile(path)
    return pq.ParquetFile(path.open("rb"))


def local_path(p: AnyPath) -> Path | None:
    """The local :class:`~pathlib.Path` of ``p``, or ``None`` for an object-store URL."""
    path = as_path(p)
    return None if is_url(path) else path
