"""Statistics of a built dataset, read from the shards themselves (so the card cannot disagree with them)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from annotators.filters import reason_key
from pipelines.core.shards import list_shards, read_parquet
from pipelines.io.fs import as_path, parquet_file
from pipelines.stages.build import SPLITS, shard_split_and_dataset

STAT_COLUMNS = (
    "dataset",
    "scene_id",
    "command",
    "meta_lateral",
    "meta_longitudinal",
    "think_mode",
    "annotated_think_mode",
    "filter_reasons",
)


def _counter() -> Counter[str]:
    return Counter()


def dataset_stats(build_dir: str | Path) -> dict[str, Any]:
    """Counts per dataset and split, label distributions, think modes and demotions by reason."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in SPLITS})
    scenes: dict[str, dict[str, set[str]]] = defaultdict(lambda: {s: set() for s in SPLITS})
    dist: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(_counter))
    demoted: dict[str, Counter[str]] = defaultdict(_counter)
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    for path in list_shards(build_dir):
        split, ds = shard_split_and_dataset(path)
        files[split].append(f"shards/{path.name}")
        table = read_parquet(path, columns=list(STAT_COLUMNS))
        counts[ds][split] += table.num_rows
        for row in table.to_pylist():
            scenes[ds][split].add(row["scene_id"])
            for col in ("meta_lateral", "meta_longitudinal", "command", "think_mode"):
                dist[col][ds][str(row[col])] += 1
            if row["annotated_think_mode"] == "slow" and row["think_mode"] == "fast":
                demoted[ds][reason_key(row["filter_reasons"][0]) if row["filter_reasons"] else "unknown"] += 1
    datasets = sorted(counts)
    return {
        "datasets": datasets,
        "counts": {ds: dict(counts[ds], total=sum(counts[ds].values())) for ds in datasets},
        "total": {s: sum(counts[ds][s] for ds in datasets) for s in SPLITS},
        "scenes": {ds: {s: len(scenes[ds][s]) for s in SPLITS} for ds in datasets},
        "scene_overlap": {ds: sorted(scenes[ds]["train"] & scenes[ds]["validation"]) for ds in datasets},
        "distributions": {col: {ds: dict(sorted(c.items())) for ds, c in by_ds.items()} for col, by_ds in dist.items()},
        "demoted_to_fast": {ds: dict(sorted(c.items())) for ds, c in demoted.items()},
        "files": files,
    }


def stage_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    p = as_path(stage_dir) / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else None


def schema_table(build_dir: str | Path) -> list[tuple[str, str]]:
    """``(column, Arrow type)`` of the build shards (from the first shard's schema)."""
    shards = list_shards(build_dir)
    if not shards:
        return []
    schema = parquet_file(shards[0]).schema_arrow
    return [(f.name, str(f.type)) for f in schema]
