"""Run a :class:`~pipelines.core.stage.Stage` locally, on Ray Data or on Apache Beam.

Resumable by construction (STYLE.md habit 4), on local disks and on object
stores (``s3://``, ``gs://`` ... through :mod:`pipelines.io.fs`). Each partition:

1. writes its rows to ``shards/<partition>-<k>.parquet`` locally (temp name,
   atomic rename) or, on an object store where nothing renames atomically, to
   ``shards/<attempt>/<partition>-<k>.parquet``, a key unique to this attempt;
2. writes ``_done/<partition>.json`` last: counters, shard names, failures and
   the stage fingerprint. That marker is the commit record: readers
   (:func:`pipelines.core.shards.list_shards`) trust only objects it lists.

A rerun skips partitions with a marker and first deletes every object under
``shards/`` that no marker lists (leftovers of crashed attempts), so a crash
anywhere leaves either a complete partition or one that is redone from
scratch: rows are never lost or duplicated. Markers are one file per
partition, so workers on several machines never write the same file.

The manifest is rebuilt from the markers the driver can see at the end of
every run, whatever the engine. A partition whose marker the driver cannot
read (workers writing to their own local disks: no shared file system) makes
the run incomplete: :attr:`RunSummary.missing` names it, the manifest says
``complete: false`` and the CLI exits non-zero; downstream stages refuse such
an input (:func:`check_complete`) unless told ``--allow-incomplete``.
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
    DONE_DIR,
    ROW_GROUP_ROWS,
    SHARD_DIR,
    ShardWriter,
    atomic_write_bytes,
    new_attempt_id,
    stored_shards,
    uncommitted_shards,
)
from pipelines.core.stage import ARROW_BATCH, Drop, Fail, Note, Partition, Stage
from pipelines.io import fs
from pipelines.io.fs import AnyPath
from schemas.sample import SCHEMA_VERSION

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
NO_SHARED_FS_HINT = (
    "likely cause: the workers wrote their completion markers where this driver cannot read them "
    "(no shared file system between the machines); use an output directory every machine and "
    "the driver can reach, e.g. s3://bucket/prefix or gs://bucket/prefix, or a shared mount"
)
MAX_FAILURES_KEPT = 200  # per partition; counters stay exact beyond it
ENGINES = ("local", "ray", "beam")


class StageMismatchError(RuntimeError):
    """The output directory holds results of a different stage config."""


class IncompleteInputError(RuntimeError):
    """An upstream stage directory has no manifest or an incomplete one."""


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
    noted: dict[str, int] = field(default_factory=dict)  # Note counts (not samples: not in `seen`)

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
    missing: list[str] = field(default_factory=list)  # ran, but the driver sees no marker

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
    def noted(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for p in self.partitions:
            c.update(p.noted)
        return dict(sorted(c.items()))

    @property
    def seen(self) -> int:
        return sum(p.seen for p in self.partitions)

    @property
    def crashed(self) -> list[PartitionResult]:
        return [p for p in self.partitions if p.error is not None]

    @property
    def ok(self) -> bool:
        return not self.crashed and not self.missing

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
        for key, n in self.noted.items():  # data notes (e.g. objects without velocity), not samples
            lines.append(f"  noted    {key:<32} {n}")
        for p in self.crashed:
            lines.append(f"  CRASHED partition {p.partition}: {p.error}")
        if self.missing:
            lines.append(
                f"  INCOMPLETE: {len(self.missing)} partition(s) without a completion marker visible "
                f"to the driver: {_preview(self.missing)}; {NO_SHARED_FS_HINT}"
            )
        return "\n".join(lines)


def _preview(ids: list[str], n: int = 10) -> str:
    return ", ".join(ids[:n]) + (f" ... (+{len(ids) - n} more)" if len(ids) > n else "")


# --------------------------------------------------------------------------- one partition


def _marker_path(out_dir: AnyPath, pid: str) -> Path:
    return fs.join(out_dir, DONE_DIR, f"{pid}.json")


def read_marker(out_dir: AnyPath, pid: str) -> dict[str, Any] | None:
    p = _marker_path(out_dir, pid)
    try:
        return json.loads(fs.read_bytes(p))
    except FileNotFoundError:
        return None


def write_marker(out_dir: AnyPath, pid: str, payload: dict[str, Any]) -> None:
    """The commit record of a partition; written after every object it lists."""
    atomic_write_bytes(_marker_path(out_dir, pid), json.dumps(payload, sort_keys=True).encode())


def collect_garbage(out_dir: AnyPath) -> int:
    """Delete objects under ``shards/`` that no marker lists (crashed attempts); returns how many."""
    junk = uncommitted_shards(out_dir)
    for p in junk:
        fs.remove(p)
    if junk:
        log.info("%s: removed %d uncommitted object(s) of unfinished attempts", out_dir, len(junk))
    return len(junk)


def _remove_objects(out_dir: AnyPath, names: list[str]) -> None:
    for n in names:
        fs.remove(fs.join(out_dir, SHARD_DIR, n))


def run_partition(
    stage: Stage,
    partition: Partition,
    out_dir: Path,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> PartitionResult:
    """Run one partition unless its marker exists; never raises for errors inside the stage."""
    out_dir = fs.as_path(out_dir)
    fp = stage.fingerprint()
    marker = read_marker(out_dir, partition.id)
    if marker is not None:
        if marker.get("fingerprint") != fp:
            raise StageMismatchError(
                f"{out_dir}: partition {partition.id} was made by a different {stage.name} config "
                f"(fingerprint {marker.get('fingerprint')} != {fp}); use a new output directory or --overwrite"
            )
        fields_ = {k: marker[k] for k in ("written", "dropped", "failed", "shards", "failures", "seconds")}
        fields_["noted"] = marker.get("noted", {})
        return PartitionResult(partition=partition.id, skipped=True, **fields_)

    start = time.perf_counter()
    res = PartitionResult(partition=partition.id)
    # Unique object names per attempt where there is no atomic rename (object stores).
    attempt = new_attempt_id() if fs.is_url(out_dir) else None
    max_rows = stage.shard_rows or max_rows
    writer = ShardWriter(out_dir / SHARD_DIR, partition.id, stage.output_schema, max_rows, max_bytes, attempt,
                         row_group_rows=stage.row_group_rows or ROW_GROUP_ROWS)  # fmt: skip
    dropped: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    noted: Counter[str] = Counter()
    try:
        for outcome in stage.process(partition):
            if isinstance(outcome, Note):
                noted[outcome.key] += outcome.n
            elif isinstance(outcome, Drop):
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
        _remove_objects(out_dir, writer.written)
        res.error = f"{type(exc).__name__}: {exc}"
        log.error("%s: partition %s crashed:\n%s", stage.name, partition.id, traceback.format_exc())
        res.written = 0
        res.seconds = time.perf_counter() - start
        return res
    res.dropped = dict(sorted(dropped.items()))
    res.failed = dict(sorted(failed.items()))
    res.noted = dict(sorted(noted.items()))
    res.shards = writer.written
    res.seconds = time.perf_counter() - start
    payload = {"fingerprint": fp, "stage": stage.name, **res.to_json()}
    payload.pop("error", None)
    write_marker(out_dir, partition.id, payload)
    return res


# --------------------------------------------------------------------------- engines


def run_stage(
    stage: Stage,
    out_dir: AnyPath,
    *,
    engine: str = "local",
    max_rows: int = DEFAULT_MAX_ROWS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    num_workers: int | None = None,
    beam_options: list[str] | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run every unfinished partition of ``stage`` into ``out_dir`` (a path or URL) and write the manifest."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    out = fs.as_path(out_dir)
    fs.makedirs(out)
    parts = stage.partitions()
    ids = [p.id for p in parts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{stage.name}: partition ids are not unique")
    collect_garbage(out)
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
    manifest = write_manifest(stage, out, summary, expected=ids)
    summary.missing = [p for p in manifest["missing_partitions"] if p not in {c.partition for c in summary.crashed}]
    if summary.missing:
        log.error(
            "%s: %d partition(s) finished without a completion marker visible to the driver: %s; %s",
            stage.name,
            len(summary.missing),
            _preview(summary.missing),
            NO_SHARED_FS_HINT,
        )
    log.debug("%s", summary.format())  # the CLI prints it; library callers get the summary object
    return summary


def _run_local(
    stage: Stage, parts: list[Partition], out: AnyPath, kwargs: dict[str, Any], progress: bool
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


def write_manifest(
    stage: Stage, out: AnyPath, summary: RunSummary, expected: Iterable[str] | None = None
) -> dict[str, Any]:
    """Rebuild ``manifest.json`` from the partition markers the driver can read (engine-independent).

    ``complete`` is true only when every expected partition has a marker whose
    listed shards all exist and none crashed; ``missing_partitions`` names the rest.
    """
    out = fs.as_path(out)
    want = sorted(expected) if expected is not None else sorted(p.partition for p in summary.partitions)
    markers = [p for p in fs.glob(fs.join(out, DONE_DIR), "*.json") if not p.name.startswith(".")]
    present = set(stored_shards(out))
    parts: dict[str, Any] = {}
    broken: list[str] = []
    for marker, data in zip(markers, fs.cat_many(markers), strict=True):
        if data is None:
            continue
        m = json.loads(data)
        parts[marker.stem] = {k: m[k] for k in ("written", "dropped", "failed", "shards")}
        if any(n not in present for n in m["shards"]):
            broken.append(marker.stem)
    missing = sorted(set(want) - (set(parts) - set(broken)))
    manifest = {
        "stage": stage.name,
        "schema_version": SCHEMA_VERSION,
        "fingerprint": stage.fingerprint(),
        "config": stage.config_dict(),
        "complete": not summary.crashed and not missing,
        "missing_partitions": missing,
        "totals": {
            "seen": summary.seen,
            "written": summary.written,
            "dropped": summary.dropped,
            "failed": summary.failed,
            "noted": summary.noted,
            "crashed_partitions": [p.partition for p in summary.crashed],
        },
        "partitions": parts,
        "written_by_pid": os.getpid(),
    }
    if broken:
        log.error("%s: marker(s) of %s list shards that do not exist", out, _preview(broken))
    atomic_write_bytes(fs.join(out, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True, default=str).encode())
    return manifest


def check_complete(stage_dir: AnyPath, *, allow_incomplete: bool = False, what: str = "input") -> dict[str, Any]:
    """Refuse a stage directory whose manifest is missing or incomplete (unless ``allow_incomplete``).

    Returns the manifest (``{}`` when absent and allowed). The error names the
    missing partitions and the likely cause.
    """
    path = fs.join(stage_dir, MANIFEST)
    try:
        manifest = json.loads(fs.read_bytes(path))
    except FileNotFoundError:
        if not fs.is_dir(fs.join(stage_dir, DONE_DIR)):
            # Not written by this runner (shards made by hand or another tool): nothing to check against.
            log.warning("%s %s has no %s and no %s/: completeness cannot be checked", what, stage_dir, MANIFEST, DONE_DIR)
            return {}
        msg = (
            f"{what} {stage_dir} has no {MANIFEST} although partitions were committed: "
            "the stage that makes it was interrupted"
        )
        if not allow_incomplete:
            raise IncompleteInputError(msg + "; rerun it, or pass --allow-incomplete to use what is there") from None
        log.warning("%s (--allow-incomplete: using what is there)", msg)
        return {}
    if manifest.get("complete", False):
        return manifest
    missing = list(manifest.get("missing_partitions", []))
    crashed = list(manifest.get("totals", {}).get("crashed_partitions", []))
    msg = (
        f"{what} {stage_dir} is incomplete ({manifest.get('stage')} stage): "
        f"{len(missing)} partition(s) missing: {_preview(missing)}"
        + (f"; crashed: {_preview(crashed)}" if crashed else "")
        + (f"; {NO_SHARED_FS_HINT}" if set(missing) - set(crashed) else "")
    )
    if not allow_incomplete:
        raise IncompleteInputError(
            msg + ". Rerun that stage (finished partitions are kept), or pass --allow-incomplete"
        )
    log.warning("%s (--allow-incomplete: continuing with partial input)", msg)
    return manifest


def results_from_markers(out: AnyPath, ids: Iterable[str]) -> list[PartitionResult]:
    """Partition results read back from markers (engines whose workers cannot return values)."""
    results = []
    for pid in ids:
        m = read_marker(out, pid)
        if m is None:
            results.append(
                PartitionResult(
                    partition=pid,
                    error="no completion marker visible to the launcher: the worker crashed (see its logs) "
                    "or wrote where the launcher cannot read (no shared file system)",
                )
            )
        else:
            results.append(
                PartitionResult(
                    partition=pid,
                    noted=m.get("noted", {}),
                    **{k: m[k] for k in ("written", "dropped", "failed", "shards", "failures", "seconds")},
                )
            )
    return results
