"""The extract stage: one dataset on disk -> unified, validated sample rows.

Partitions are groups of a source's work units (WOD-E2E segments, nuScenes
scenes, NAVSIM logs), ``units_per_partition`` at a time, so a partition is the
unit of parallelism and of resume. Partition ids are ``<k>-<hash>`` where the
hash covers the unit keys: the same input always gives the same ids and a
changed input never reuses an old marker for other content.

Every row is checked with :func:`~schemas.sample.validate_row` before it is
written; an invalid one becomes a ``Fail`` naming the field. A unit that
raises (an unreadable log, say) fails as a whole, with its file, and the
partition carries on with its other units.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

from pipelines.config import to_dict
from pipelines.core.stage import Drop, Fail, Note, Outcome, Partition, Stage
from pipelines.sources import make_source
from pipelines.sources.base import ExtractConfig, Source, WorkUnit
from schemas.sample import SAMPLE_SCHEMA, SchemaError, validate_row

log = logging.getLogger(__name__)


class ExtractStage(Stage):
    """Extract ``cfg.dataset`` from ``cfg.input`` into :data:`~schemas.sample.SAMPLE_SCHEMA` rows."""

    name = "extract"
    output_schema = SAMPLE_SCHEMA

    def __init__(self, cfg: ExtractConfig) -> None:
        self.cfg = cfg
        self._source: Source | None = make_source(cfg)  # checks the input path now, before any work

    @property
    def source(self) -> Source:
        if self._source is None:
            self._source = make_source(self.cfg)
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "_source": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    def partitions(self) -> list[Partition]:
        units = self.source.work_units()
        n = self.cfg.units_per_partition
        parts = []
        for k in range(0, len(units), n):
            group = units[k : k + n]
            digest = hashlib.sha256("\n".join(u.key for u in group).encode()).hexdigest()[:10]
            payload = {
                "units": [
                    {"key": u.key, "split": u.split, "payload": dict(u.payload)} for u in group
                ]
            }
            parts.append(Partition(f"{k // n:05d}-{digest}", payload))
        log.info("%s: %d units in %d partitions", self.cfg.dataset, len(units), len(parts))
        return parts

    def setup(self) -> None:
        self.source.open()
        # Everything alive now (modules, devkit tables) lives as long as the worker: freeze it so the
        # cyclic GC, triggered by the many small objects of each row, stops re-scanning it (~10% CPU).
        gc.freeze()

    def teardown(self) -> None:
        if self._source is not None:
            self._source.close()

    def process(self, partition: Partition) -> Iterator[Outcome]:
        for item in partition.payload["units"]:
            unit = WorkUnit(item["key"], item["split"], item["payload"])
            yield from self._unit(unit)

    def _unit(self, unit: WorkUnit) -> Iterator[Outcome]:
        try:
            for out in self.source.iter_unit(unit):
                if isinstance(out, (Drop, Fail, Note)):
                    yield out
                    continue
                row = out.to_record()
                try:
                    validate_row(row)
                except SchemaError as exc:
                    yield Fail(
                        out.sample_id, "SchemaError", str(exc), ",".join(out.source_files) or None
                    )
                    continue
                yield row
        except Exception as exc:  # noqa: BLE001 - one bad unit must not sink the partition
            files = getattr(exc, "filename", None) or unit.key
            log.exception("%s: unit %s failed", self.cfg.dataset, unit.key)
            yield Fail(None, type(exc).__name__, f"unit {unit.key}: {exc}", str(files))
