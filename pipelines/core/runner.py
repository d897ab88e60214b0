"""Run a :class:`~pipelines.core.stage.Stage` locally, on Ray Data or on Apache Beam.

Resumable by construction (STYLE.md habit 4). Each partition:

1. removes leftovers of an earlier, unfinished attempt (shards with its prefix),
2. writes its rows to ``shards/<partition>-<k>.parquet`` (temp name, rename),
3. writes ``_done/<partition>.json`` last: counters, shard names, failures and
   the stage fingerprint. That marker is the completion record.

A rerun skips partitions with a marker, so a crash anywhere leaves either a
complete partition or one that is redone from scratch: rows are never lost or
duplicated. Markers are one file per partition, so workers on several machines
sharing a file system never write the same file. The manifest is rebuilt from
the markers at the end of every run, whatever the engine.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.core.shards import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ROWS,
    SHARD_DIR,
    ShardWriter,
    atomic_write_bytes,
)
from pipelines.core.stage import ARROW_BATCH, Drop, Fail, Partition, Stage
from schemas.sample import SCHEMA_VERSION

log = logging.getLogger(__name__)

DONE_DIR = "_done"
MANIFEST = "manifest.json"
MAX_FAILURES_KEPT = 200  # per partition; counters stay exact beyond it
ENGINES = ("local", "ray", "beam")


class StageMismatchError(RuntimeError):
    """The output directory holds results of a different stage config."""


@dataclass
class PartitionResult:
    partition: str
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False  # finished by an earlier run
    error: str | None = None  # the partition itself crashed (no marker written)

    @property
    def seen(self) -> int:
        return self.written + sum(self.dropped.values()) + sum(self.failed.values())

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("skipped",)}
        return d


@dataclass
class RunSummary:
    stage: str
    out_dir: Path
    partitions: list[PartitionResult]
    seconds: float

    @property
    def written(self) -> int:
        return sum(p.written for p in self.partitions)

    @property
    def dropped(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for p in self.partitions:
            c.update(p.dropped)
        return dict(sorted(c.items()))

    @property
    def failed(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for p in self.partitions:
            c.update(p.failed)
        return dict(sorted(c.items()))

    @property
    def seen(self) -> int:
        return sum(p.seen for p in self.partitions)

    @property
    def crashed(self) -> list[PartitionResult]:
        return [p for p in self.partitions if p.error is not None]

    @property
    def ok(self) -> bool:
        return not self.crashed

    def format(self) -> str:
        """A human-readable summary: counts by outcome and reason; they add up to ``seen``."""
        lines = [
            f"stage {self.stage}: {self.seen} samples in, {self.written} written, "
            f"{sum(self.dropped.values())} dropped, {sum(self.failed.values())} failed "
            f"({len(self.partitions)} partitions, {sum(p.skipped for p in self.partitions)} already done, "
            f"{self.seconds:.1f} s) -> {self.out_dir}"
        ]
        for reason, n in self.dropped.items():
            lines.append(f"  dropped  {reason:<32} {n}")
        for cls, n in self.failed.items():
            lines.append(f"  failed   {cls:<32} {n}")
        for p in self.crashed:
            lines.append(f"  CRASHED partition {p.partition}: {p.error}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- one partition


def _marker_path(out_dir: Path, pid: str) -> Path:
    return out_dir / DONE_DIR / f"{pid}.json"


def read_marker(out_dir: Path, pid: str) -> dict[str, Any] | None:
    p = _marker_path(out_dir, pid)
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def _clear_leftovers(out_dir: Path, pid: str) -> None:
    shard_dir = out_dir / SHARD_DIR
    if shard_dir.is_dir():
        for p in shard_dir.glob(f"{pid}-*.parquet"):
            p.unlink()
        for p in shard_dir.glob(f".{pid}-*.tmp"):
            p.unlink()


def run_partition(
    stage: Stage,
    partition: Partition,
    out_dir: Path,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> PartitionResult:
    """Run one partition unless its marker exists; never raises for errors inside the stage."""
    out_dir = Path(out_dir)
    fp = stage.fingerprint()
    marker = read_marker(out_dir, partition.id)
    if marker is not None:
        if marker.get("fingerprint") != fp:
            raise StageMismatchError(
                f"{out_dir}: partition {partition.id} was made by a different {stage.name} config "
                f"(fingerprint {marker.get('fingerprint')} != {fp}); use a new output directory or --overwrite"
            )
        fields_ = {k: marker[k] for k in ("written", "dropped", "failed", "shards", "failures", "seconds")}
        return PartitionResult(partition=partition.id, skipped=True, **fields_)

    start = time.perf_counter()
    _clear_leftovers(out_dir, partition.id)
    res = PartitionResult(partition=partition.id)
    writer = ShardWriter(out_dir / SHARD_DIR, partition.id, stage.output_schema, max_rows, max_bytes)
    dropped: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    try:
        for outcome in stage.process(partition):
            if isinstance(outcome, Drop):
                dropped[outcome.reason] += 1
            elif isinstance(outcome, Fail):
                failed[outcome.error_class] += 1
                if len(res.failures) < MAX_FAILURES_KEPT:
                    res.failures.append(
                        {
                            "sample_id": outcome.sample_id,
                            "error_class": outcome.error_class,
                            "message": outcome.message,
                            "file": outcome.file,
                        }
                    )
                log.warning(
                    "%s: %s failed (%s): %s [file %s]",
                    stage.name,
                    outcome.sample_id or "input",
                    outcome.error_class,
                    outcome.message,
                    outcome.file,
                )
            elif isinstance(outcome, ARROW_BATCH):  # a batch of written rows (Stage batch interface)
                writer.add_table(outcome)
                res.written += outcome.num_rows
            else:
                writer.add(outcome)
                res.written += 1
        writer.flush()
    except Exception as exc:  # the partition crashed: report it, write no marker, keep going
        _clear_leftovers(out_dir, partition.id)
        res.error = f"{type(exc).__name__}: {exc}"
        log.error("%s: partition %s crashed:\n%s", stage.name, partition.id, traceback.format_exc())
        res.written = 0
        res.seconds = time.perf_counter() - start
        return res
    res.dropped = dict(sorted(dropped.items()))
    res.failed = dict(sorted(failed.items()))
    res.shards = writer.written
    res.seconds = time.perf_counter() - start
    payload = {"fingerprint": fp, "stage": stage.name, **res.to_json()}
    payload.pop("error", None)
    atomic_write_bytes(_marker_path(out_dir, partition.id), json.dumps(payload, sort_keys=True).encode())
    return res


# --------------------------------------------------------------------------- engines


def run_stage(
    stage: Stage,
    out_dir: str | Path,
    *,
    engine: str = "local",
    max_rows: int = DEFAULT_MAX_ROWS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    num_workers: int | None = None,
    beam_options: list[str] | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run every unfinished partition of ``stage`` into ``out_dir`` and write the manifest."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = stage.partitions()
    ids = [p.id for p in parts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{stage.name}: partition ids are not unique")
    start = time.perf_counter()
    kwargs = {"max_rows": max_rows, "max_bytes": max_bytes}
    if engine == "local":
        results = _run_local(stage, parts, out, kwargs, progress)
    elif engine == "ray":
        from pipelines.core.ray_engine import run_on_ray

        results = run_on_ray(stage, parts, out, kwargs, num_workers)
    else:
        from pipelines.core.beam_engine import run_on_beam

        results = run_on_beam(stage, parts, out, kwargs, beam_options or [])
    summary = RunSummary(stage.name, out, sorted(results, key=lambda r: r.partition), time.perf_counter() - start)
    write_manifest(stage, out, summary)
    log.debug("%s", summary.format())  # the CLI prints it; library callers get the summary object
    return summary


def _run_local(
    stage: Stage, parts: list[Partition], out: Path, kwargs: dict[str, Any], progress: bool
) -> list[PartitionResult]:
    from tqdm.auto import tqdm

    results = []
    stage.setup()
    try:
        bar = tqdm(parts, desc=stage.name, unit="part", disable=not progress)
        for part in bar:
            r = run_partition(stage, part, out, **kwargs)
            results.append(r)
            bar.set_postfix(written=sum(x.written for x in results))
    finally:
        stage.teardown()
    return results


def write_manifest(stage: Stage, out: Path, summary: RunSummary) -> dict[str, Any]:
    """Rebuild ``manifest.json`` from the partition markers (engine-independent)."""
    parts: dict[str, Any] = {}
    for marker in sorted((out / DONE_DIR).glob("*.json")):
        m = json.loads(marker.read_text())
        parts[marker.stem] = {k: m[k] for k in ("written", "dropped", "failed", "shards")}
    manifest = {
        "stage": stage.name,
        "schema_version": SCHEMA_VERSION,
        "fingerprint": stage.fingerprint(),
        "config": stage.config_dict(),
        "complete": summary.ok and len(parts) == len(summary.partitions),
        "totals": {
            "seen": summary.seen,
            "written": summary.written,
            "dropped": summary.dropped,
            "failed": summary.failed,
            "crashed_partitions": [p.partition for p in summary.crashed],
        },
        "partitions": parts,
        "written_by_pid": os.getpid(),
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True, default=str).encode())
    return manifest


def results_from_markers(out: Path, ids: Iterable[str]) -> list[PartitionResult]:
    """Partition results read back from markers (engines whose workers cannot return values)."""
    results = []
    for pid in ids:
        m = read_marker(out, pid)
        if m is None:
            results.append(PartitionResult(partition=pid, error="no completion marker (see worker logs)"))
        else:
            results.append(
                PartitionResult(
                    partition=pid, **{k: m[k] for k in ("written", "dropped", "failed", "shards", "failures", "seconds")}
                )
            )
    return results
