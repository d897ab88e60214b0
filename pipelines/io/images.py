"""Camera frames: decode a JPEG, resize it to a pixel budget, re-encode it once.

Frames are resized exactly once, at extraction (DESIGN.md section 3), so later
stages never decode full-resolution images. The target size follows the
Qwen2.5-VL rule (``smart_resize``): keep the aspect ratio, fit within
``max_pixels`` and round both sides to a multiple of ``multiple`` (28 = the
ViT patch 14 times the 2x2 merge), never upscaling past the source size.

Decoding uses PIL's JPEG ``draft`` mode: libjpeg scales by 1/2, 1/4 or 1/8 in
the DCT domain while decoding, which is several times faster than a full
decode followed by a resize and is what makes extraction cheap.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


class ImageError(ValueError):
    """An image could not be decoded; the message names the source."""


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """How frames are stored: pixel budget, side multiple, JPEG quality."""

    max_pixels: int = 448 * 448  # area budget of the stored frame
    multiple: int = 28  # both sides are multiples of this (Qwen2.5-VL patch 14 x merge 2)
    quality: int = 90  # JPEG quality of the single re-encode
    draft: bool = True  # DCT-domain downscale while decoding (fast path)
    # PIL filter for the final resize: nearest, bilinear, bicubic, lanczos
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.max_pixels < self.multiple * self.multiple:
            raise ValueError(
                f"image.max_pixels {self.max_pixels} is below one {self.multiple}x{self.multiple} tile"
            )
        if not 1 <= self.quality <= 100:
            raise ValueError(f"image.quality {self.quality} must be in [1, 100]")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"image.resample {self.resample!r} is not one of {sorted(_RESAMPLE)}")


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True, slots=True)
class StoredImage:
    """A re-encoded frame and the size it was resized from."""

    jpeg: bytes
    width: int
    height: int
    source_width: int
    source_height: int


def target_size(width: int, height: int, max_pixels: int, multiple: int = 28) -> tuple[int, int]:
    """The stored ``(width, height)``: aspect kept, area <= ``max_pixels``, sides multiples of ``multiple``.

    Sides are rounded to the nearest multiple, then shrunk to the budget; the
    source size is never exceeded by more than the rounding (no upscaling).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is not positive")
    w = max(multiple, round(width / multiple) * multiple)
    h = max(multiple, round(height / multiple) * multiple)
    if w * h > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w = max(multiple, math.floor(width / beta / multiple) * multiple)
        h = max(multiple, math.floor(height / beta / multiple) * multiple)
    return w, h


def scale_intrinsics(k: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Intrinsics ``(3,3)`` of an image resized from ``src`` to ``dst`` (both ``(width, height)``).

    A resize maps pixel edges to pixel edges, so with pixel centres at integer
    coordinates (OpenCV) the principal point maps as ``(c + 0.5) * s - 0.5``.
    """
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    out = np.array(k, dtype=np.float64).reshape(3, 3).copy()
    out[0, 0] *= sx
    out[0, 1] *= sx
    out[0, 2] = (out[0, 2] + 0.5) * sx - 0.5
    out[1, 1] *= sy
    out[1, 2] = (out[1, 2] + 0.5) * sy - 0.5
    return out


def decode_resized(
    data: bytes, cfg: ImageConfig, source: str = "<bytes>"
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``data`` straight to the target size; returns the RGB image and the source size."""
    try:
        im = Image.open(io.BytesIO(data))
        src = im.size
        dst = target_size(src[0], src[1], cfg.max_pixels, cfg.multiple)
        box = None
        if cfg.draft and im.format == "JPEG":
            # libjpeg picks the largest 1/n scale still >= dst. Its output is ceil(W/n) pixels wide, the
            # last one covering padding past the source edge; ``box`` is the source's exact extent
            # (W/n), so the resize maps source edges to stored edges and scale_intrinsics stays exact.
            drafted = im.draft("RGB", dst)
            if drafted is not None and drafted[1][2:] != im.size:
                box = drafted[1]
        im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{source}: cannot decode image ({exc})") from None
    if im.size != dst or box is not None:
        im = im.resize(dst, _RESAMPLE[cfg.resample], box=box, reducing_gap=None)
    return im, src


def resize_jpeg(data: bytes, cfg: ImageConfig, source: str = "<bytes>") -> StoredImage:
    """Decode, resize to the pixel budget and re-encode once as JPEG at ``cfg.quality``."""
    im, src = decode_resized(data, cfg, source)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=cfg.quality, optimize=False)
    return StoredImage(buf.getvalue(), im.size[0], im.size[1], src[0], src[1])


def read_jpeg_file(path: str, cfg: ImageConfig) -> StoredImage:
    """:func:`resize_jpeg` of a file; a missing or unreadable file raises ``ImageError`` naming it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    return resize_jpeg(data, cfg, path)
