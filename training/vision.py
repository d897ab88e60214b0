"""Camera clips -> Qwen2.5-VL video patches, without torchvision.

transformers' ``Qwen2VLVideoProcessor`` (and the fast image processor) import
torchvision, which is not available beside our torch build. The PIL image
processor exists, but it treats each frame as a still image (duplicating it
over the temporal patch), which doubles the vision tokens and loses temporal
merging. So :class:`ClipProcessor` does the video path itself with numpy and
PIL, reproducing ``Qwen2VLVideoProcessor`` exactly: ``smart_resize`` to a
multiple of ``patch_size * merge_size`` within ``[min_pixels, max_pixels]``,
bicubic resize, rescale to [0, 1], CLIP mean/std normalisation, padding the
frame count to a multiple of ``temporal_patch_size`` by repeating the last
frame, and the same patch layout ``(t, h/m, w/m, m, m, C, tp, p, p)``.

The pixel budget is fixed per run and saved with every checkpoint
(``clip_processor.json``) so SFT, RFT and eval feed identical inputs.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

CLIP_PROCESSOR_FILE = "clip_processor.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of ``factor``, area within bounds, aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} is above 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class ClipProcessor:
    """Tokenizer + video patchifier; implements ``annotators.training_prompt.ClipProcessorLike``."""

    tokenizer: Any = field(repr=False)
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56  # per frame
    max_pixels: int = 448 * 448  # per frame: the fixed pixel budget
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_video_tokens(self, grid_thw: np.ndarray) -> int:
        return int(np.prod(grid_thw)) // (self.merge_size**2)

    def process_clip(self, jpegs: Sequence[bytes], fps: float) -> tuple[np.ndarray, np.ndarray, float]:
        """JPEG frames (oldest first) -> (patches [N, C*tp*p*p], grid_thw [3], seconds per grid)."""
        from PIL import Image

        if not jpegs:
            raise ValueError("clip has no frames")
        frames = []
        size = None
        for data in jpegs:
            with Image.open(io.BytesIO(data)) as src:
                rgb = src.convert("RGB")
            if size is None:  # one size per clip (frames of a clip share a resolution)
                h, w = self.frame_size(rgb.height, rgb.width)
                size = (w, h)
            frames.append(np.asarray(rgb.resize(size, Image.Resampling.BICUBIC), dtype=np.float32))
        video = np.stack(frames)  # (T, H, W, C)
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        video = (video / 255.0 - mean) / std
        video = video.transpose(0, 3, 1, 2)  # (T, C, H, W)
        if pad := -video.shape[0] % self.temporal_patch_size:
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        t, c, h, w = video.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gt, gh, gw = t // tp, h // p, w // p
        x = video.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        patches = np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p), dtype=np.float32)
        return patches, np.asarray([gt, gh, gw], np.int64), float(tp / fps)

    # ------------------------------------------------------------------ persistence

    def settings(self) -> dict[str, Any]:
        d = asdict(replace(self, tokenizer=None))
        d.pop("tokenizer")
        return d

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Tokenizer files, ``clip_processor.json``, and Qwen-style preprocessor configs for other tools."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        (out / CLIP_PROCESSOR_FILE).write_text(json.dumps(self.settings(), indent=2))
        common = {
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "min_pixels": self.min_pixels,  # the older key names, read by vLLM/transformers too
            "max_pixels": self.max_pixels,
        }
        (out / "preprocessor_config.json").write_text(
            json.dumps({**common, "image_processor_type": "Qwen2VLImageProcessor",
                        "processor_class": "Qwen2_5_VLProcessor"}, indent=2)
        )
        (out / "video_preprocessor_config.json").write_text(
            json.dumps({**common, "video_processor_type": "Qwen2VLVideoProcessor",
                        "processor_class": "Qwen2_5_VLProcessor"}, indent=2)
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> ClipProcessor:
        """Load from a checkpoint or a Qwen2.5-VL model dir.

        A ``clip_processor.json`` (written with every checkpoint and by
        ``training.tiny``) fixes the inputs the model was trained on: its
        settings win, ``None`` overrides keep them, and an explicit override
        that differs is a :class:`ProcessorSettingsError` naming both values
        (SFT, RFT and eval must feed identical inputs). A stock Qwen2.5-VL
        directory (``preprocessor_config.json`` only) is a starting point:
        explicit overrides set the pixel budget of the run.
        """
        from transformers import AutoTokenizer

        p = Path(path)
        tok = AutoTokenizer.from_pretrained(str(path))
        settings: dict[str, Any] = {}
        given = {k: v for k, v in overrides.items() if v is not None}
        if (p / CLIP_PROCESSOR_FILE).is_file():
            settings = json.loads((p / CLIP_PROCESSOR_FILE).read_text())
            conflicts = {k: (settings[k], v) for k, v in given.items()
                         if k in settings and _differs(settings[k], v)}
            if conflicts:
                detail = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in conflicts.items())
                raise ProcessorSettingsError(
                    f"{p / CLIP_PROCESSOR_FILE} fixes the model's inputs and the run asks for different ones "
                    f"({detail}); drop the setting (e.g. --set model.max_pixels=null) to use the checkpoint's"
                )
            given = {k: v for k, v in given.items() if k not in settings}
        elif (p / "preprocessor_config.json").is_file():  # a stock Qwen2.5-VL checkpoint
            pre = json.loads((p / "preprocessor_config.json").read_text())
            for key in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
                if key in pre:
                    settings[key] = pre[key]
            for key in ("image_mean", "image_std"):
                if key in pre:
                    settings[key] = tuple(pre[key])
        settings.update(given)
        if "image_mean" in settings:
            settings["image_mean"] = tuple(settings["image_mean"])
            settings["image_std"] = tuple(settings["image_std"])
        return cls(tokenizer=tok, **settings)


class ProcessorSettingsError(ValueError):
    """An explicit processor setting contradicts the checkpoint's ``clip_processor.json``."""


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return [float(x) for x in a] != [float(x) for x in b]
    return a != b
