"""TFRecord framing without TensorFlow: a writer and a verifying, seekable reader.

A TFRecord file is a sequence of records, each framed as::

    uint64 length (little endian)
    uint32 masked_crc32c(length bytes)
    bytes  data[length]
    uint32 masked_crc32c(data)

with ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32)``.
WOD-E2E ships its ``E2EDFrame`` protos this way. The reader yields the byte
offset of every record so that an index ``name -> (file, offset)`` can be
built in one pass and single records re-read later with :func:`read_record_at`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import google_crc32c

from pipelines.io.fs import open_file

log = logging.getLogger(__name__)

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked crc of length
_FOOTER = struct.Struct("<I")  # masked crc of data
HEADER_SIZE = _HEADER.size  # 12 bytes
FOOTER_SIZE = _FOOTER.size  # 4 bytes


class TFRecordError(IOError):
    """A TFRecord file is truncated or corrupt; names the file, byte offset and cause."""

    def __init__(self, path: str | Path, offset: int, cause: str) -> None:
        self.path = str(path)
        self.offset = offset
        self.cause = cause
        super().__init__(f"{self.path}: record at byte offset {offset}: {cause}")


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C that TFRecord stores after the length and after the data."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One record's bytes on disk: header, data, footer."""
    length = struct.pack("<Q", len(data))
    return b"".join(
        (length, struct.pack("<I", masked_crc32c(length)), data, _FOOTER.pack(masked_crc32c(data)))
    )


def write_records(path: str | Path, records: Iterable[bytes]) -> int:
    """Write ``records`` to a new TFRecord file at ``path``; return how many were written.

    Written to ``<path>.tmp`` and renamed, so a crash never leaves a truncated
    file under the final name.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        for data in records:
            f.write(frame_record(bytes(data)))
            n += 1
    tmp.replace(path)
    return n


def _read_one(f: BinaryIO, path: str | Path, offset: int, verify: bool) -> bytes | None:
    """Read the record starting at ``offset`` (``f`` positioned there); None at a clean EOF."""
    header = f.read(HEADER_SIZE)
    if not header:
        return None
    if len(header) < HEADER_SIZE:
        raise TFRecordError(
            path, offset, f"truncated header ({len(header)} of {HEADER_SIZE} bytes)"
        )
    length, length_crc = _HEADER.unpack(header)
    if verify and masked_crc32c(header[:8]) != length_crc:
        raise TFRecordError(path, offset, "CRC mismatch in the length field (corrupt file?)")
    data = f.read(length)
    if len(data) < length:
        raise TFRecordError(path, offset, f"truncated data ({len(data)} of {length} bytes)")
    footer = f.read(FOOTER_SIZE)
    if len(footer) < FOOTER_SIZE:
        raise TFRecordError(
            path, offset, f"truncated data CRC ({len(footer)} of {FOOTER_SIZE} bytes)"
        )
    if verify and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
        raise TFRecordError(path, offset, "CRC mismatch in the record data (corrupt file?)")
    return data


def iter_records(path: str | Path, verify: bool = True) -> Iterator[tuple[int, bytes]]:
    """Yield ``(byte offset, record bytes)`` for every record of a TFRecord file.

    Raises :class:`TFRecordError` (file, offset, cause) on truncation or, with
    ``verify``, on a CRC mismatch of the length or the data.
    """
    with open_file(path, "rb") as f:
        offset = 0
        while True:
            data = _read_one(f, path, offset, verify)
            if data is None:
                return
            yield offset, data
            offset += HEADER_SIZE + len(data) + FOOTER_SIZE


def read_record_at(path: str | Path, offset: int, verify: bool = True) -> bytes:
    """Read the single record starting at ``offset`` (as yielded by :func:`iter_records`)."""
    with open_file(path, "rb") as f:
        f.seek(offset)
        data = _read_one(f, path, offset, verify)
    if data is None:
        raise TFRecordError(path, offset, "offset is at or past the end of the file")
    return data
