"""The codebook file: ``codebook.safetensors`` (tensors) + ``codebook.json`` (metadata). Never pickle.

Tensors: ``tokens [K,3]`` float32 (dx m, dy m, dtheta rad in the segment
start frame) and ``contours [K,4,2]`` float32 (end contours FL, FR, BR, BL of
the vehicle box at each token). The JSON records how the codebook was made
and a SHA-256 of the tensor file, so a JSON paired with the wrong tensors is
refused. :func:`load_codebook` validates everything and names the file in
every error.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

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
    created_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
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
        tok = np.asarray(tokens, np.float64)
        contours = end_contours(tok, meta.vehicle_length, meta.vehicle_width)
        return cls(tok.astype(np.float32), contours.astype(np.float32), meta)


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
    data = save_tensors(  # serialised in memory: no local temp file (the target may be a URL)
        {
            "tokens": np.ascontiguousarray(codebook.tokens, np.float32),
            "contours": np.ascontiguousarray(codebook.contours, np.float32),
        },
        metadata={"format_version": str(FORMAT_VERSION), "k": str(codebook.k)},
    )
    atomic_write_bytes(st_path, data)
    meta = replace(codebook.meta, k=codebook.k, tensors_sha256=hashlib.sha256(data).hexdigest())
    atomic_write_bytes(
        js_path, (json.dumps(meta.to_json(), indent=1, sort_keys=True) + "\n").encode()
    )
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
