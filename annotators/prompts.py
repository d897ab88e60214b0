"""The annotation prompt: versioned templates filled by one builder (DESIGN.md section 6).

Templates live in ``annotators/templates/<version>/`` (``system.txt``,
``user.txt``, ``few_shot.json``, filled with :class:`string.Template`), so a
prompt change is a new version directory and a new cache key, never an edit
in place. :func:`build_prompt` turns one sample row into a
:class:`PromptRequest` whose images are kept as raw JPEG bytes plus
references; :meth:`PromptRequest.openai_messages` inlines them as
``data:image/jpeg;base64,`` URLs for sending and :meth:`PromptRequest.render`
shows the same prompt with images elided (``annotate --dry-run --show N``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from annotators.config import ClipConfig, PromptConfig
from annotators.ego_text import describe_ego_state
from annotators.grounding import describe_fact, object_facts
from schemas.enums import Lateral, Longitudinal

TEMPLATE_DIR = Path(__file__).parent / "templates"
IMAGE_REF = "image_ref"  # message part type standing for one image until it is inlined


class PromptError(ValueError):
    """A row cannot be turned into a prompt (missing hint, camera or frames)."""


@dataclass(frozen=True)
class Templates:
    version: str
    system: str  # fully rendered (few-shot examples included)
    user: Template
    few_shot: tuple[dict[str, Any], ...]


@functools.lru_cache(maxsize=8)
def load_templates(version: str, few_shot: bool = True) -> Templates:
    """Load and check the templates of ``version`` (cached)."""
    d = TEMPLATE_DIR / version
    if not d.is_dir():
        known = sorted(p.name for p in TEMPLATE_DIR.iterdir() if p.is_dir())
        raise PromptError(
            f"template version {version!r} not found under {TEMPLATE_DIR}; known: {known}"
        )
    examples = tuple(json.loads((d / "few_shot.json").read_text()))
    for i, ex in enumerate(examples):
        hint, act = ex["hint"], ex["answer"]["action"]
        if hint != act:
            raise PromptError(
                f"{d / 'few_shot.json'} example {i}: action {act} differs from hint {hint}"
            )
    quote = ", ".join
    system = Template((d / "system.txt").read_text()).substitute(
        lateral_choices=quote(f'"{v}"' for v in Lateral.values()),
        longitudinal_choices=quote(f'"{v}"' for v in Longitudinal.values()),
        examples=_render_examples(examples) if few_shot else "",
    )
    return Templates(version, system.strip(), Template((d / "user.txt").read_text()), examples)


def _render_examples(examples: tuple[dict[str, Any], ...]) -> str:
    parts = ["\nExamples (situations summarised in words; your input has images):"]
    for i, ex in enumerate(examples, 1):
        hint = ex["hint"]
        parts.append(
            f'\nExample {i}. {ex["situation"]} Ground-truth future action: lateral = "{hint["lateral"]}"; '
            f'longitudinal = "{hint["longitudinal"]}".\nAnswer: {json.dumps(ex["answer"])}'
        )
    return "\n".join(parts)


def few_shot_texts(version: str = "v1") -> list[str]:
    """The reasoning texts of the few-shot examples (for the copy filter)."""
    out = []
    for ex in load_templates(version).few_shot:
        a = ex["answer"]
        out.append(
            " ".join(
                [a["scene"], *(" ".join(o.values()) for o in a["critical_objects"]), a["intent"]]
            )
        )
    return out


@dataclass
class PromptRequest:
    """One rendered prompt; images as raw JPEG bytes referenced from ``messages``."""

    sample_id: str
    template_version: str
    messages: list[
        dict[str, Any]
    ]  # OpenAI chat messages; image parts are {"type": IMAGE_REF, "index": i}
    images: list[bytes] = field(default_factory=list)
    image_labels: list[str] = field(default_factory=list)  # "front t-1.5s 448x252"
    image_hashes: list[str] = field(default_factory=list)  # sha256 hex of each JPEG
    hint: tuple[str, str] = ("", "")  # (lateral, longitudinal)

    def _map_images(self, fn: Any) -> list[dict[str, Any]]:
        out = []
        for m in self.messages:
            content = m["content"]
            if isinstance(content, list):
                content = [fn(p["index"]) if p.get("type") == IMAGE_REF else p for p in content]
            out.append({"role": m["role"], "content": content})
        return out

    def openai_messages(self) -> list[dict[str, Any]]:
        """Messages with every image inlined as a base64 JPEG data URL."""

        def inline(i: int) -> dict[str, Any]:
            b64 = base64.b64encode(self.images[i]).decode("ascii")
            return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64}}

        return self._map_images(inline)

    def keyed_messages(self) -> list[dict[str, Any]]:
        """Messages with images replaced by their hashes (what the cache key hashes)."""
        return self._map_images(lambda i: {"type": "image_sha256", "sha256": self.image_hashes[i]})

    def render(self) -> str:
        """Human-readable prompt with images as ``<image ...>`` placeholders."""
        lines = [f"=== {self.sample_id} (template {self.template_version}) ==="]
        for m in self._map_images(
            lambda i: {
                "type": "text",
                "text": f"<image {self.image_labels[i]}, {len(self.images[i]) / 1024:.1f} KiB>",
            }
        ):
            lines.append(f"--- {m['role']} ---")
            content = m["content"]
            if isinstance(content, str):
                lines.append(content)
            else:
                lines.append("".join(p["text"] for p in content))
        return "\n".join(lines)


def select_frames(
    camera: Mapping[str, Any], clip: ClipConfig
) -> list[tuple[float, Mapping[str, Any]]]:
    """``clip.frames`` frames spaced ``1/clip.hz`` apart ending at the last (current) frame.

    Returns ``(seconds relative to t0, frame)`` oldest first. Each target time
    takes the nearest stored frame; a clip shorter than asked gives fewer frames.
    """
    frames = list(camera.get("frames") or ())
    if not frames:
        raise PromptError(f"camera {camera.get('name')!r} has no frames")
    t0 = int(frames[-1]["timestamp_us"])
    chosen: dict[int, float] = {}
    for k in range(clip.frames - 1, -1, -1):
        target = t0 - k * 1e6 / clip.hz
        j = min(range(len(frames)), key=lambda i: abs(int(frames[i]["timestamp_us"]) - target))
        if j not in chosen:
            chosen[j] = (int(frames[j]["timestamp_us"]) - t0) / 1e6
    return [(dt, frames[j]) for j, dt in sorted(chosen.items())]


def build_prompt(row: Mapping[str, Any], cfg: PromptConfig) -> PromptRequest:
    """Render the annotation prompt of one sample row."""
    sid = row["sample_id"]
    lat, lon = row.get("meta_lateral"), row.get("meta_longitudinal")
    if not lat or not lon:
        raise PromptError(
            f"sample {sid!r} has no future meta-action (meta_lateral/meta_longitudinal) to use as hint"
        )
    tpl = load_templates(cfg.template_version, cfg.few_shot)
    clip = cfg.clip_for(row["dataset"])
    by_name = {c["name"]: c for c in row.get("cameras") or ()}
    missing = [n for n in clip.cameras if n not in by_name]
    if len(missing) == len(clip.cameras):
        raise PromptError(
            f"sample {sid!r} has none of the prompt cameras {list(clip.cameras)} (has {sorted(by_name)})"
        )

    req = PromptRequest(sample_id=sid, template_version=tpl.version, messages=[], hint=(lat, lon))
    parts: list[dict[str, Any]] = []
    head, _, tail = tpl.user.template.partition("$cameras")
    fill = _fill_values(row, cfg, [n for n in clip.cameras if n in by_name])
    parts.append({"type": "text", "text": Template(head).substitute(fill)})
    for name in clip.cameras:
        if name not in by_name:
            continue
        cam = by_name[name]
        picked = select_frames(cam, clip)
        parts.append(
            {"type": "text", "text": f"{name.replace('_', ' ')} camera ({len(picked)} frames):"}
        )
        for dt, frame in picked:
            data = bytes(frame["image"]["bytes"])
            req.image_labels.append(f"{name} t{dt:+.1f}s {cam['width']}x{cam['height']}")
            req.image_hashes.append(hashlib.sha256(data).hexdigest())
            parts.append({"type": IMAGE_REF, "index": len(req.images)})
            req.images.append(data)
        parts.append({"type": "text", "text": "\n"})
    if missing:
        parts.append(
            {
                "type": "text",
                "text": f"(Cameras not available for this sample: {', '.join(missing)}.)\n",
            }
        )
    parts.append({"type": "text", "text": Template(tail).substitute(fill)})
    req.messages = [{"role": "system", "content": tpl.system}, {"role": "user", "content": parts}]
    return req


def _fill_values(row: Mapping[str, Any], cfg: PromptConfig, cameras: list[str]) -> dict[str, str]:
    facts = object_facts(row, cfg.max_objects, cameras)
    if facts:
        grounding = (
            "Labelled objects near the ego vehicle (ground truth, nearest first):\n"
            + "\n".join(f"- {describe_fact(f)}" for f in facts)
        )
    else:
        grounding = "No object labels are available for this sample; rely on the images."
    return {
        "dataset": str(row["dataset"]),
        "ego_state": describe_ego_state(row),
        "grounding": grounding,
        "hint_lateral": str(row["meta_lateral"]),
        "hint_longitudinal": str(row["meta_longitudinal"]),
    }
