"""The codebook file: ``codebook.safetensors`` (tensors) + ``codebook.json`` (metadata). Never pickle.

Tensors: ``tokens [K,3]`` float32 (dx m, dy m, dtheta rad in the segment
start frame) and ``contours [K,4,2]`` float32 (end contours FL, FR, BR, BL of
the vehicle box at each token). The JSON records how the codebook was made
and a SHA-256 of the tensor file, so a JSON paired with the wrong tensors is
refused. :func:`load_codebook` validates everything and names the file in
every error.

Both files are a function of the fit's inputs and seed only (same bytes for
an identical refit, in any process): the safetensors header is serialised
here with sorted keys (``safetensors`` writes its ``__metadata__`` map in
Rust ``HashMap`` order, which differs between processes), the JSON is written
with sorted keys, and no wall-clock time goes into either (the fit's time is
in ``report.json``). The tokenize stage fingerprints the tensor file, so an
identical refit keeps earlier tokenize outputs valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_tensors

from pipelines.core.shards import atomic_write_bytes
from pipelines.io.fs import as_path
from schemas.sample import MODEL_DT
from tokenizer.segments import end_contours

FORMAT_VERSION = 1
TENSORS_NAME = "codebook.safetensors"
META_NAME = "codebook.json"
CONTOUR_ATOL = 1e-3  # m: stored contours must match the tokens' (float32 storage)


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("drivevla")
    except PackageNotFoundError:  # not installed as a distribution (e.g. run from a checkout)
        return "0.0.0+unknown"


class CodebookError(ValueError):
    """A codebook file is missing, malformed or inconsistent; the message names the file."""


@dataclass(frozen=True)
class CodebookMeta:
    """What a codebook is and how it was made (the JSON half of the file)."""

    k: int
    tol: float  # m, K-disk radius (mean corner distance)
    vehicle_length: float  # m
    vehicle_width: float  # m
    dt: float  # s per token (0.5 at 2 Hz)
    seed: int
    datasets: list[str] = field(default_factory=list)
    mix: dict[str, float] = field(default_factory=dict)
    segment_count: int = 0  # segments the fit used
    segments_available: dict[str, int] = field(default_factory=dict)
    coverage: float | None = None  # share of fit segments within tol of some token
    k_requested: int | None = None  # differs from k when segments ran out
    library_version: str = field(default_factory=library_version)
    # No wall-clock default: the file must not change between identical fits. Kept for
    # files written before that (they are still read); a fit's time is in report.json.
    created_at: str | None = None
    format_version: int = FORMAT_VERSION
    tensors_sha256: str = ""  # filled by save_codebook

    @property
    def frequency_hz(self) -> float:
        return 1.0 / self.dt

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["frequency_hz"] = self.frequency_hz
        return d


@dataclass(frozen=True)
class Codebook:
    """Tokens and their end contours with metadata; build with :meth:`from_tokens` or :func:`load_codebook`."""

    tokens: np.ndarray  # (K,3) float32 dx m, dy m, dtheta rad
    contours: np.ndarray  # (K,4,2) float32 end contours FL, FR, BR, BL
    meta: CodebookMeta

    @property
    def k(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, meta: CodebookMeta) -> Codebook:
        """Tokens ``(K,3)`` with their end contours; refuses NaN/inf or headings outside [-pi, pi]."""
        tok = np.asarray(tokens, np.float64)
        check_tokens(tok, "tokens")
        contours = end_contours(tok, meta.vehicle_length, meta.vehicle_width)
        return cls(tok.astype(np.float32), contours.astype(np.float32), meta)


def check_tokens(tokens: np.ndarray, what: str) -> None:
    """Raise :class:`CodebookError` unless ``tokens`` is a finite ``(K,3)`` array with headings in [-pi, pi]."""
    if tokens.ndim != 2 or tokens.shape[1] != 3 or len(tokens) == 0:
        raise CodebookError(f"{what}: shape {tokens.shape}, expected (K, 3) with K >= 1")
    bad = ~np.isfinite(tokens).all(axis=1)
    if bad.any():
        raise CodebookError(
            f"{what}: {int(bad.sum())} tokens hold NaN/inf, first token {int(np.flatnonzero(bad)[0])}"
        )
    if np.abs(tokens[:, 2]).max() > math.pi + 1e-5:
        raise CodebookError(f"{what}: token headings outside [-pi, pi]")


_ST_DTYPES = {np.dtype("float32"): "F32", np.dtype("float64"): "F64"}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file with a canonical header (sorted metadata, tensors in name order).

    The format (huggingface/safetensors README): an 8-byte little-endian header
    length, a JSON header ``{"__metadata__": {str: str}, name: {"dtype", "shape",
    "data_offsets": [begin, end]}}`` padded with spaces to a multiple of 8, then
    the little-endian tensor bytes. ``safetensors.numpy.save`` writes the
    metadata map in a per-process random order, so the bytes are built here.
    """
    header: dict[str, Any] = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()  # insertion order: sorted, as built
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def codebook_paths(path: str | Path) -> tuple[Path, Path]:
    """``(tensors, json)`` for a codebook directory, ``.safetensors`` file or ``.json`` file."""
    p = as_path(path)  # local path or s3:// / gs:// URL
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    return p / TENSORS_NAME, p / META_NAME


def save_codebook(codebook: Codebook, path: str | Path) -> tuple[Path, Path]:
    """Write the pair atomically (tensors first, then the JSON that vouches for them)."""
    st_path, js_path = codebook_paths(path)
    tokens = np.asarray(codebook.tokens)
    check_tokens(tokens, str(st_path))  # a NaN never reaches a file
    expect = end_contours(
        tokens.astype(np.float64), codebook.meta.vehicle_length, codebook.meta.vehicle_width
    )
    if codebook.contours.shape != expect.shape or not np.allclose(
        codebook.contours, expect, atol=CONTOUR_ATOL
    ):
        raise CodebookError(
            f"{st_path}: contours do not match the tokens (build codebooks with Codebook.from_tokens)"
        )
    data = safetensors_bytes(
        {
            "tokens": np.ascontiguousarray(tokens, np.float32),
            "contours": np.ascontiguousarray(codebook.contours, np.float32),
        },
        {"format_version": str(FORMAT_VERSION), "k": str(codebook.k)},
    )
    meta = replace(codebook.meta, k=codebook.k, tensors_sha256=hashlib.sha256(data).hexdigest())
    try:  # before writing anything: a NaN in the metadata is not JSON
        text = json.dumps(meta.to_json(), indent=1, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as exc:
        raise CodebookError(f"{js_path}: metadata holds NaN/inf ({exc})") from None
    atomic_write_bytes(st_path, data)
    atomic_write_bytes(js_path, text.encode())
    return st_path, js_path


def load_codebook(path: str | Path) -> Codebook:
    """Read and validate a codebook; raise :class:`CodebookError` naming the file on any mismatch."""
    st_path, js_path = codebook_paths(path)
    for p in (st_path, js_path):
        if not p.is_file():
            raise CodebookError(
                f"codebook file {p} does not exist (a codebook is {TENSORS_NAME} + {META_NAME})"
            )
    try:
        raw = json.loads(js_path.read_text())
    except json.JSONDecodeError as exc:
        raise CodebookError(f"{js_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CodebookError(f"{js_path}: expected a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CodebookError(
            f"{js_path}: format_version {raw.get('format_version')!r}, this library reads {FORMAT_VERSION}"
        )
    freq = raw.pop("frequency_hz", None)
    names = {f.name for f in fields(CodebookMeta)}
    unknown = sorted(set(raw) - names)
    missing = sorted(
        n for n in ("k", "tol", "vehicle_length", "vehicle_width", "dt", "seed") if n not in raw
    )
    if unknown or missing:
        raise CodebookError(f"{js_path}: unknown keys {unknown}, missing keys {missing}")
    try:
        meta = CodebookMeta(**raw)
    except TypeError as exc:
        raise CodebookError(f"{js_path}: {exc}") from None
    if freq is not None and not (
        isinstance(meta.dt, (int, float)) and meta.dt > 0 and math.isclose(freq * meta.dt, 1.0)
    ):
        raise CodebookError(f"{js_path}: frequency_hz {freq!r} does not match dt {meta.dt!r}")
    data = st_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if not meta.tensors_sha256:  # without it a JSON could vouch for any tensors of the same K
        raise CodebookError(
            f"{js_path}: tensors_sha256 is empty (write codebooks with save_codebook)"
        )
    if meta.tensors_sha256 != digest:
        raise CodebookError(
            f"{js_path}: tensors_sha256 does not match {st_path} (the metadata belongs to other tensors)"
        )
    try:
        tensors = load_tensors(data)  # the bytes whose hash was just checked
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CodebookError(f"{st_path}: not a readable safetensors file ({exc})") from None
    tokens, contours = tensors.get("tokens"), tensors.get("contours")
    if tokens is None or contours is None:
        raise CodebookError(
            f"{st_path}: expected tensors 'tokens' and 'contours', found {sorted(tensors)}"
        )
    _validate(tokens, contours, meta, st_path, js_path)
    return Codebook(tokens.astype(np.float32), contours.astype(np.float32), meta)


def _validate(
    tokens: np.ndarray, contours: np.ndarray, meta: CodebookMeta, st: Path, js: Path
) -> None:
    if not isinstance(meta.k, int) or meta.k < 1:
        raise CodebookError(f"{js}: k must be a positive integer, got {meta.k!r}")
    for name in ("tol", "vehicle_length", "vehicle_width", "dt"):
        v = getattr(meta, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise CodebookError(f"{js}: {name} must be a positive number, got {v!r}")
    if not math.isclose(meta.dt, MODEL_DT):  # tokens are segments between the 2 Hz future poses
        raise CodebookError(f"{js}: dt {meta.dt} s, but futures are sampled every {MODEL_DT} s")
    if tokens.shape != (meta.k, 3):
        raise CodebookError(
            f"{st}: tokens have shape {tokens.shape}, but {js.name} says K={meta.k} (expected ({meta.k}, 3))"
        )
    if contours.shape != (meta.k, 4, 2):
        raise CodebookError(
            f"{st}: contours have shape {contours.shape}, expected ({meta.k}, 4, 2)"
        )
    if not (np.isfinite(tokens).all() and np.isfinite(contours).all()):
        raise CodebookError(f"{st}: tensors hold NaN/inf values")
    if np.abs(tokens[:, 2]).max() > math.pi + 1e-5:
        raise CodebookError(f"{st}: token headings outside [-pi, pi]")
    expect = end_contours(tokens.astype(np.float64), meta.vehicle_length, meta.vehicle_width)
    err = float(np.abs(expect - contours).max())
    if err > CONTOUR_ATOL:
        raise CodebookError(
            f"{st}: contours do not match the tokens for a {meta.vehicle_length} x {meta.vehicle_width} m vehicle "
            f"(max error {err:.3g} m; {js.name} vehicle size or the tensors were changed)"
        )
