"""Build stage: annotated samples + action tokens + filter verdicts -> training shards (DESIGN.md section 8).

One partition per (split, dataset, annotated input shard), named
``{split}-{dataset}-{k:05d}``; the runner writes its rows to
``<data>/build/shards/{split}-{dataset}-{k:05d}-{j:05d}.parquet``. Every input
row belongs to exactly one split (by a hash of ``dataset/scene_id``), so it is
written, dropped or failed in exactly one partition and the counts add up.

A row:

* without ``action_tokens`` (no future, or not tokenized) is dropped
  (``no_action_tokens``);
* slow with rejected reasoning (``filter_reasons`` non-empty) becomes fast
  (``on_rejected: fast``; reasoning cleared, reasons kept) or is dropped
  (``on_rejected: drop``; reason ``rejected_reasoning:<first reason key>``);
* gets ``messages`` from :func:`annotators.training_prompt.render_messages`,
  the one prompt builder SFT, RFT and evaluation import.

The output schema is fixed (:data:`BUILD_SCHEMA`) and carries the matching
``datasets.Features`` under the ``huggingface`` metadata key, so
``datasets.load_dataset("parquet", ...)`` decodes the camera frames as images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from annotators.filters import reason_key
from annotators.schema import ANNOTATION_FIELDS
from annotators.training_prompt import PROMPT_VERSION, PromptError, render_messages
from pipelines.core.shards import list_shards, read_parquet
from pipelines.core.stage import Drop, Fail, Outcome, Partition, Stage
from pipelines.io.fs import as_path, parquet_file
from schemas.enums import ThinkMode
from schemas.sample import (
    ACTION_TOKENS_FIELD,
    IMAGE_TYPE,
    MESSAGES_TYPE,
    SAMPLE_FIELDS,
    SCHEMA_VERSION,
    sample_features,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
BUILD_VERSION = "1.1.0"  # 1.1.0: top-level `thumbnail` column
THUMBNAIL = "thumbnail"

_REASONING_KEEP = (
    "reasoning_scene",
    "reasoning_intent",
    "reasoning_action_lateral",
    "reasoning_action_longitudinal",
    "think_mode",
    "think_reasons",
    "think_score",
    "annotation_provenance",
)
REASONING_CLEARED = ("reasoning_scene", "reasoning_objects", "critical_objects", "reasoning_intent",
                     "reasoning_action_lateral", "reasoning_action_longitudinal")  # fmt: skip
CRITICAL_OBJECTS_TYPE = next(f.type for f in ANNOTATION_FIELDS if f.name == "reasoning_objects")


def format_critical_objects(objects: Any) -> str | None:
    """The annotator's critical objects as one text: ``name (location): behaviour; why.`` per object."""
    if objects is None or isinstance(objects, str):
        return objects
    parts = []
    for o in objects:
        head = str(o.get("name") or "object").strip()
        if o.get("location"):
            head += f" ({str(o['location']).strip()})"
        tail = "; ".join(str(o[k]).strip().rstrip(".") for k in ("behaviour", "why") if o.get(k))
        parts.append(f"{head}: {tail}." if tail else f"{head}.")
    return " ".join(parts) if parts else None

BUILD_FIELDS: list[pa.Field] = [
    *SAMPLE_FIELDS,
    ACTION_TOKENS_FIELD,
    *(f for f in ANNOTATION_FIELDS if f.name in _REASONING_KEEP),
    # The prompt builder reads the objects part as text; the structured list stays alongside.
    pa.field("reasoning_objects", pa.string()),  # critical objects as one text (format_critical_objects)
    pa.field("critical_objects", CRITICAL_OBJECTS_TYPE),  # the annotator's list: name, location, behaviour, why
    pa.field("annotated_think_mode", pa.string()),  # think_mode before rejected reasoning was demoted
    pa.field("filter_reasons", pa.list_(pa.string())),  # why the reasoning was rejected (empty: accepted / fast)
    pa.field("messages", MESSAGES_TYPE),  # rendered chat: system, user, assistant
    pa.field("prompt_version", pa.string()),  # annotators.training_prompt.PROMPT_VERSION
    # front camera at the current time (the same JPEG as in `cameras`), top level so the Hub viewer shows it
    pa.field(THUMBNAIL, IMAGE_TYPE),
]
BUILD_COLUMNS: tuple[str, ...] = tuple(f.name for f in BUILD_FIELDS)


def build_features() -> Any:
    """The ``datasets.Features`` of :data:`BUILD_SCHEMA` (every camera frame and the thumbnail an ``Image``)."""
    import datasets

    features = sample_features(pa.schema(BUILD_FIELDS))
    features[THUMBNAIL] = datasets.Image()
    return features


def thumbnail(cameras: Any) -> dict[str, Any] | None:
    """The front camera's frame at the current time (the last frame), or None without a front camera."""
    for cam in cameras or ():
        if cam.get("name") == "front" and cam.get("frames"):
            return cam["frames"][-1].get("image")
    return None


def build_schema() -> pa.Schema:
    """:data:`BUILD_FIELDS` with the schema version and the embedded ``datasets`` features."""
    hf = json.dumps({"info": {"features": build_features().to_dict()}})
    # All fields nullable: `datasets` applies the embedded features only to fields equal to its own
    # (always nullable) Arrow fields; a non-nullable field would silently lose its Image feature.
    return pa.schema(
        [f.with_nullable(True) for f in BUILD_FIELDS],
        metadata={
            b"schema_version": SCHEMA_VERSION.encode(),
            b"build_version": BUILD_VERSION.encode(),
            b"prompt_version": PROMPT_VERSION.encode(),
            b"huggingface": hf.encode(),
        },
    )


@dataclass(frozen=True, slots=True)
class BuildConfig:
    """``build:`` section of ``configs/build.yaml``."""

    val_fraction: float = 0.1  # share of scenes (by hash) in the validation split
    min_val_scenes: int = 1  # per dataset with >= 2 scenes: lowest-hash scenes fill up validation
    split_salt: str = ""  # changes the scene hash (a different but still deterministic split)
    on_rejected: str = "fast"  # slow sample with rejected reasoning: "fast" (demote) or "drop"
    shard_max_rows: int = 1000
    shard_max_mb: int = 500
    cameras: tuple[str, ...] = ("front", "front_left", "front_right", "back")  # cameras in the prompt

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction <= 0.5:
            raise ValueError(f"build.val_fraction must be in [0, 0.5], got {self.val_fraction}")
        if self.on_rejected not in ("fast", "drop"):
            raise ValueError(f"build.on_rejected must be 'fast' or 'drop', got {self.on_rejected!r}")
        if self.shard_max_rows < 1 or self.shard_max_mb < 1:
            raise ValueError("build.shard_max_rows and build.shard_max_mb must be >= 1")


def scene_hash(dataset: str, scene_id: str, salt: str = "") -> float:
    """A stable number in [0, 1) per scene: the split key (no scene lands in two splits)."""
    digest = hashlib.sha256(f"{salt}:{dataset}/{scene_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def validation_scenes(dataset: str, scenes: Sequence[str], cfg: BuildConfig) -> set[str]:
    """Scenes with ``hash < val_fraction``, topped up to ``min_val_scenes`` by lowest hash.

    The threshold rule keeps a scene's split stable when data is added; the
    top-up only matters for tiny datasets (it never takes every scene).
    """
    ranked = sorted(set(scenes), key=lambda s: scene_hash(dataset, s, cfg.split_salt))
    val = [s for s in ranked if scene_hash(dataset, s, cfg.split_salt) < cfg.val_fraction]
    want = min(cfg.min_val_scenes, len(ranked) - 1) if cfg.val_fraction > 0 else 0
    if len(val) < want:
        val = ranked[:want]
    return set(val)


def read_num_action_tokens(codebook_dir: str | Path) -> int:
    """K of the codebook the tokens were made with (``codebook.json``)."""
    meta = as_path(codebook_dir) / "codebook.json"
    if not meta.is_file():
        raise FileNotFoundError(f"codebook metadata {meta} not found: run `drivevla codebook` first")
    return int(json.loads(meta.read_text())["k"])


@dataclass(frozen=True, slots=True)
class DatasetInputs:
    """Where one dataset's inputs are."""

    dataset: str
    annotate_dir: str  # annotated samples (images, labels, reasoning; action_tokens if tokenized first)
    filter_dir: str  # filter verdicts by sample_id


class BuildStage(Stage):
    """Join samples, tokens and accepted reasoning into training rows with rendered messages."""

    name = "build"

    def __init__(self, inputs: Sequence[DatasetInputs], cfg: BuildConfig, num_action_tokens: int) -> None:
        self.inputs = list(inputs)
        self.cfg = cfg
        self.num_action_tokens = int(num_action_tokens)
        self.output_schema = build_schema()

    def config_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.cfg),
            "num_action_tokens": self.num_action_tokens,
            "prompt_version": PROMPT_VERSION,
            "build_version": BUILD_VERSION,
            "inputs": [
                [i.dataset, [[p.name, p.stat().st_size] for p in list_shards(i.annotate_dir)], _fingerprint_of(i.filter_dir)]
                for i in self.inputs
            ],  # new annotations or new filter verdicts must not mix with an old build
        }

    def partitions(self) -> list[Partition]:
        parts = []
        for inp in self.inputs:
            shards = list_shards(inp.annotate_dir)
            if not shards:
                raise FileNotFoundError(f"no annotated shards under {inp.annotate_dir} for {inp.dataset}")
            if not list_shards(inp.filter_dir):
                raise FileNotFoundError(f"no filter output under {inp.filter_dir}; run `drivevla build` (filter step)")
            scenes = pa.concat_tables([read_parquet(p, columns=["scene_id"]) for p in shards])
            val = sorted(validation_scenes(inp.dataset, scenes.column("scene_id").to_pylist(), self.cfg))
            for k, shard in enumerate(shards):
                for split in SPLITS:
                    payload = {
                        "dataset": inp.dataset,
                        "split": split,
                        "shard": str(shard),
                        "filter_dir": inp.filter_dir,
                        "validation_scenes": val,
                    }
                    parts.append(Partition(f"{split}-{inp.dataset}-{k:05d}", payload))
        return parts

    def process(self, partition: Partition) -> Iterator[Outcome]:
        pl = partition.payload
        shard = as_path(pl["shard"])
        val = set(pl["validation_scenes"])
        want_val = pl["split"] == "validation"
        verdicts = _load_verdicts(as_path(pl["filter_dir"]), shard.stem)
        pf = parquet_file(shard)
        present = [c for c in pf.schema_arrow.names if c in BUILD_COLUMNS]
        val_set = pa.array(sorted(val), pa.string())
        for batch in pf.iter_batches(batch_size=64, columns=present):
            # The other split's rows are skipped in Arrow (the other split's partition handles them),
            # so only this split's rows, images included, become Python objects for prompt rendering.
            in_val = pc.fill_null(pc.is_in(batch.column("scene_id"), value_set=val_set), False)
            for row in batch.filter(in_val if want_val else pc.invert(in_val)).to_pylist():
                yield self._one(row, verdicts, str(shard))

    def _one(self, row: dict[str, Any], verdicts: Mapping[str, dict[str, Any]], file: str) -> Outcome:
        sid = row["sample_id"]
        verdict = verdicts.get(sid)
        if verdict is None:
            return Fail(sid, "MissingFilterVerdict", "no filter verdict for this sample; rerun the filter step", file)
        if row.get("action_tokens") is None:
            return Drop(sid, "no_action_tokens", file)
        objs = row.get("reasoning_objects")
        if not isinstance(objs, str):
            row["critical_objects"] = objs
            row["reasoning_objects"] = format_critical_objects(objs)
        mode = row.get("think_mode") or ThinkMode.FAST.value
        row["annotated_think_mode"] = mode
        reasons = list(verdict["filter_reasons"] or [])
        row["filter_reasons"] = reasons
        if mode == ThinkMode.SLOW.value and reasons:
            if self.cfg.on_rejected == "drop":
                return Drop(sid, f"rejected_reasoning:{reason_key(reasons[0])}", file)
            row["think_mode"] = ThinkMode.FAST.value
            for key in REASONING_CLEARED:
                row[key] = None
        try:
            row["messages"] = render_messages(row, self.num_action_tokens, self.cfg.cameras)
        except PromptError as exc:
            return Fail(sid, "PromptError", str(exc), file)
        row["prompt_version"] = PROMPT_VERSION
        row[THUMBNAIL] = thumbnail(row.get("cameras"))
        return {c: row.get(c) for c in BUILD_COLUMNS}


def _fingerprint_of(stage_dir: str | Path) -> str | None:
    p = as_path(stage_dir) / "manifest.json"
    return json.loads(p.read_text()).get("fingerprint") if p.is_file() else None


def _load_verdicts(filter_dir: Path, stem: str) -> dict[str, dict[str, Any]]:
    """The filter rows of one annotated shard (the filter stage's partition id is the shard stem)."""
    pattern = re.compile(re.escape(stem) + r"-\d{5}\.parquet")
    files = [p for p in list_shards(filter_dir) if pattern.fullmatch(p.name)]
    out: dict[str, dict[str, Any]] = {}
    for p in files:
        for r in read_parquet(p, columns=["sample_id", "filter_passed", "filter_reasons"]).to_pylist():
            out[r["sample_id"]] = r
    return out


def shard_split_and_dataset(path: str | Path) -> tuple[str, str]:
    """``(split, dataset)`` from a build shard name ``{split}-{dataset}-{k}-{j}.parquet``."""
    parts = as_path(path).stem.split("-")
    if len(parts) < 4 or parts[0] not in SPLITS:
        raise ValueError(f"{path} is not a build shard name '{{split}}-{{dataset}}-{{k}}-{{j}}.parquet'")
    return parts[0], "-".join(parts[1:-2])


def shard_bytes(cfg: BuildConfig) -> int:
    return int(cfg.shard_max_mb * 1024 * 1024)
