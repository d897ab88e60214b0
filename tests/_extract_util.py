"""Helpers shared by the extract tests (not a test module)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import load_config
from pipelines.core.runner import RunSummary, run_stage
from pipelines.core.shards import list_shards, read_table
from pipelines.sources.base import ExtractConfig
from pipelines.stages.extract import ExtractStage

REPO = Path(__file__).resolve().parents[1]


def extract_config(
    dataset: str, input_path: Path | str, overrides: tuple[str, ...] = ()
) -> ExtractConfig:
    """The shipped config of ``dataset`` pointed at ``input_path``."""
    path = REPO / "configs" / "extract" / f"{dataset}.yaml"
    return load_config(ExtractConfig, path, [f"input={input_path}", *overrides])


def extract(
    dataset: str,
    input_path: Path | str,
    out: Path,
    overrides: tuple[str, ...] = (),
    engine: str = "local",
) -> tuple[RunSummary, list[dict[str, Any]]]:
    """Run the extract stage; return the summary and the written rows (canonical order)."""
    stage = ExtractStage(extract_config(dataset, input_path, overrides))
    summary = run_stage(stage, out, engine=engine, progress=False)
    rows = read_table(out).to_pylist() if list_shards(out) else []
    return summary, rows


def failures(summary: RunSummary) -> list[dict[str, Any]]:
    return [f for p in summary.partitions for f in p.failures]


def ground_truth(
    sample_data: Any, dataset: str
) -> tuple[dict[str, dict], dict[tuple[str, int], dict]]:
    """Ground-truth records by frame id and by (scene, timestamp)."""
    by_frame, by_time = {}, {}
    with open(sample_data.ground_truth) as fh:
        for line in fh:
            r = json.loads(line)
            if r["dataset"] == dataset:
                by_frame[r["frame"]] = r
                by_time[(r["scene"], r["timestamp_us"])] = r
    return by_frame, by_time


def gt_frame_key(row: dict[str, Any]) -> str:
    """The ground-truth ``frame`` of a row (WOD-E2E: context name; others: the frame token)."""
    frame = row["sample_id"].split("/")[-1]
    return f"{row['scene_id']}-{frame}" if row["dataset"] == "waymo_e2e" else frame


def to_ego(record: dict[str, Any], origin: np.ndarray) -> np.ndarray:
    """A ground-truth pose in the ego frame of the world pose ``origin``."""
    from pipelines.geometry import poses_to_local

    return poses_to_local(np.array([[record["x"], record["y"], record["yaw"]]]), origin)[0]


def assert_counts_add_up(summary: RunSummary) -> None:
    assert summary.seen == summary.written + sum(summary.dropped.values()) + sum(
        summary.failed.values()
    )
    assert summary.ok, [p.error for p in summary.crashed]
