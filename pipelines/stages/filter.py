"""Filter stage: every slow-thinking reasoning passes or gets reasons (DESIGN.md section 7).

Input: one dataset's annotation output (``<data>/annotate/<dataset>/``), one
partition per input shard. Output: a thin table (no images) with one row per
input row: ``sample_id``, ``think_mode``, ``filter_passed`` (null for fast
rows, which carry no reasoning) and ``filter_reasons`` (every reason, empty
when accepted). The build stage joins it back by ``sample_id``.

Duplicates are a dataset-wide property, so :meth:`FilterStage.partitions` first
reads the reasoning columns of every input shard (text only, cheap), runs the
per-row filters and the deduplicator, and hands each partition the duplicate
verdicts of its own rows. The optional LLM judge runs per partition, only on
rows every other filter accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from annotators.filters import (
    Deduplicator,
    FilterConfig,
    RowFilters,
    needs_filter,
    reason_key,
    reasoning_text,
)
from annotators.judge import JudgeConfig
from pipelines.core.shards import atomic_write_bytes, iter_rows, list_shards, read_parquet
from pipelines.core.stage import Outcome, Partition, Stage
from pipelines.io.fs import as_path, parquet_file

log = logging.getLogger(__name__)

FILTER_STATS = "filter_stats.json"
ANNOTATION_OK = "ok"

FILTER_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("scene_id", pa.string()),
        pa.field("think_mode", pa.string()),  # as annotated (before any demotion by build)
        pa.field("filter_passed", pa.bool_()),  # null: fast row, nothing to filter
        pa.field("filter_reasons", pa.list_(pa.string())),  # "<key>: <detail>", empty when accepted
    ]
)

# What the filters read; images are never loaded.
READ_COLUMNS = (
    "sample_id",
    "dataset",
    "scene_id",
    "think_mode",
    "annotation_status",
    "annotation_error",
    "meta_lateral",
    "meta_longitudinal",
    "command",
    "velocity",
    "acceleration",
    "history_meta_lateral",
    "history_meta_longitudinal",
    "reasoning_scene",
    "reasoning_objects",
    "reasoning_intent",
    "reasoning_action_lateral",
    "reasoning_action_longitudinal",
)


@dataclass(frozen=True, slots=True)
class FilterStageConfig:
    """``filter:`` and ``judge:`` sections of ``configs/build.yaml``."""

    filter: FilterConfig = field(default_factory=FilterConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


def _columns_of(path: Path) -> list[str]:
    names = parquet_file(path).schema_arrow.names
    return [c for c in READ_COLUMNS if c in names]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return read_parquet(path, columns=_columns_of(path)).to_pylist()


def row_reasons(row: dict[str, Any], filters: RowFilters) -> list[str]:
    """Reasons from the per-row filters (annotation failures count as a reason too)."""
    if row.get("annotation_status") != ANNOTATION_OK:
        err = row.get("annotation_error") or row.get("annotation_status") or "no annotation"
        return [f"annotation_failed: {err}"]
    return filters.reasons(row)


class FilterStage(Stage):
    """Run the filters over one dataset's annotated shards."""

    name = "filter"
    output_schema = FILTER_SCHEMA

    def __init__(self, annotate_dir: str | Path, cfg: FilterStageConfig, few_shot: list[str] | None = None) -> None:
        self.annotate_dir = as_path(annotate_dir)  # local path or s3:// / gs:// URL
        self.cfg = cfg
        self.few_shot = few_shot  # None: the annotator's own few-shot texts
        self._judge: Any = None

    def config_dict(self) -> dict[str, Any]:
        shards = list_shards(self.annotate_dir)
        return {
            **asdict(self.cfg),
            # Duplicate verdicts depend on the whole input: a changed input must not mix with old output.
            "input": [[p.name, p.stat().st_size] for p in shards],
            "few_shot_sha256": hashlib.sha256(json.dumps(self._few_shot_texts()).encode()).hexdigest(),
        }

    def _few_shot_texts(self) -> list[str]:
        if self.few_shot is not None:
            return list(self.few_shot)
        from annotators.prompts import few_shot_texts

        return few_shot_texts(self.cfg.filter.few_shot_version)

    def _filters(self) -> RowFilters:
        return RowFilters(self.cfg.filter, self._few_shot_texts())

    def partitions(self) -> list[Partition]:
        shards = list_shards(self.annotate_dir)
        if not shards:
            raise FileNotFoundError(f"no annotated shards under {self.annotate_dir}; run `drivevla annotate` first")
        filters = self._filters()
        texts: list[tuple[str, str]] = []
        where: dict[str, str] = {}
        for p in shards:
            for row in _read_rows(p):
                if needs_filter(row) and not row_reasons(row, filters):
                    texts.append((row["sample_id"], reasoning_text(row)))
                    where[row["sample_id"]] = p.name
        dups = Deduplicator(self.cfg.filter.dedup).duplicates(texts)
        per_shard: dict[str, dict[str, str]] = {}
        for sid, reason in dups.items():
            per_shard.setdefault(where[sid], {})[sid] = reason
        log.info("filter %s: %d reasoning texts, %d duplicates", self.annotate_dir, len(texts), len(dups))
        return [
            Partition(p.stem, {"shard": str(p), "duplicates": per_shard.get(p.name, {})}) for p in shards
        ]

    def setup(self) -> None:
        if self.cfg.judge.enabled:
            from annotators.judge import Judge

            self._judge = Judge(self.cfg.judge)

    def teardown(self) -> None:
        if self._judge is not None:
            self._judge.close()
            self._judge = None

    def process(self, partition: Partition) -> Iterator[Outcome]:
        filters = self._filters()
        dups: dict[str, str] = dict(partition.payload["duplicates"])
        rows = _read_rows(as_path(partition.payload["shard"]))
        reasons: dict[str, list[str]] = {}
        for row in rows:
            if needs_filter(row):
                r = row_reasons(row, filters)
                if row["sample_id"] in dups:
                    r.append(dups[row["sample_id"]])
                reasons[row["sample_id"]] = r
        if self._judge is not None:
            todo = [row for row in rows if needs_filter(row) and not reasons[row["sample_id"]]]
            for sid, verdict in self._judge.judge(todo).items():
                if verdict is not True:
                    reasons[sid].append(verdict[1])
        for row in rows:
            sid = row["sample_id"]
            slow = sid in reasons
            yield {
                "sample_id": sid,
                "dataset": row.get("dataset"),
                "scene_id": row.get("scene_id"),
                "think_mode": row.get("think_mode"),
                "filter_passed": (not reasons[sid]) if slow else None,
                "filter_reasons": reasons.get(sid, []),
            }


# --------------------------------------------------------------------------- statistics


def filter_stats(filter_dir: str | Path) -> dict[str, Any]:
    """Acceptance counts of one dataset's filter output, by reason key.

    ``rejected_by_reason`` counts every reason of a row (a row may have
    several); ``rejected_by_first_reason`` counts one per row and sums to
    ``rejected``.
    """
    total = fast = accepted = rejected = 0
    by_reason: Counter[str] = Counter()
    by_first: Counter[str] = Counter()
    for row in iter_rows(filter_dir, columns=["think_mode", "filter_passed", "filter_reasons"]):
        total += 1
        if row["filter_passed"] is None:
            fast += 1
        elif row["filter_passed"]:
            accepted += 1
        else:
            rejected += 1
            keys = [reason_key(r) for r in row["filter_reasons"]]
            by_reason.update(set(keys))
            by_first[keys[0]] += 1
    slow = accepted + rejected
    return {
        "rows": total,
        "fast": fast,
        "slow": slow,
        "accepted": accepted,
        "rejected": rejected,
        "acceptance_rate": accepted / slow if slow else None,
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "rejected_by_first_reason": dict(sorted(by_first.items())),
    }


def write_filter_stats(filter_dir: str | Path) -> dict[str, Any]:
    """Compute :func:`filter_stats` and store it as ``filter_stats.json`` next to the manifest."""
    stats = filter_stats(filter_dir)
    atomic_write_bytes(as_path(filter_dir) / FILTER_STATS, json.dumps(stats, indent=1, sort_keys=True).encode())
    return stats
