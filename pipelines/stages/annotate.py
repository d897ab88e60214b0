"""Annotate stage: think-mode selection plus reasoning for every sample (DESIGN.md section 6).

Input: one dataset's extracted shards, joined with their action tokens where
tokenized (:func:`pipelines.stages.tokenize.read_input`), one partition per
extracted shard (that has tokenized rows, when tokenized). Output: the same rows with
the annotation columns of
:mod:`annotators.schema`. Every row is written: fast rows with status
``skipped_fast``, slow rows ``ok`` or ``failed`` with ``annotation_error``
(the filter and build stages decide what a failure means for training).

Parallelism: each worker (a process locally, a Ray actor with ``--engine
ray``) makes one event loop and one :class:`~annotators.client.VLMClient` in
:meth:`AnnotateStage.setup` and runs a partition's requests concurrently in
that loop. Resume: results are committed to an append-only cache per
partition (``<cache_dir>/<partition>/``) before they count, so a rerun after a
crash re-sends only what is missing; finished partitions are skipped by the
runner's completion markers, except those holding failed annotations:
:meth:`AnnotateStage.reopen_failed` (called by the command before a run, with
``retry_failed``) removes their markers, so the rerun resends exactly the
failed requests (the rest come from the cache) and rewrites those partitions.

With ``selection.mode: fraction`` the slow/fast cutoff is fitted once over the
label columns of every input shard (no images) when the stage is built, so
the decision is the same whatever the partitioning or engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from annotators.client import VLMClient
from annotators.config import AnnotateConfig
from annotators.runner import PartitionAnnotator
from annotators.schema import annotation_schema
from annotators.selection import SELECTION_COLUMNS, Cutoff, fit_cutoff, score_complexity
from pipelines.config import to_dict
from pipelines.core.shards import DONE_DIR, SHARD_DIR, list_shards
from pipelines.core.stage import Drop, Outcome, Partition, Stage
from pipelines.io import fs
from pipelines.io.fs import as_path, url_to_fs
from pipelines.stages.tokenize import InputShard, input_schema, input_shards, read_input

log = logging.getLogger(__name__)
CACHE_DIR = "_cache"


def fit_stage_cutoff(inputs: list[InputShard], names: set[str], cfg: AnnotateConfig) -> Cutoff:
    """The slow/fast cutoff over every input row (label columns only; ``names``: the input's columns)."""
    if cfg.selection.mode == "threshold":
        return fit_cutoff((), cfg.selection)
    cols = [c for c in (*SELECTION_COLUMNS, cfg.selection.scenario_column) if c in names]
    scored = []
    for unit in inputs:
        for row in read_input(unit, columns=cols).to_pylist():
            scored.append((row["sample_id"], score_complexity(row, cfg.selection).score))
    return fit_cutoff(scored, cfg.selection)


class AnnotateStage(Stage):
    """Select slow/fast thinking and annotate reasoning, one input shard per partition."""

    name = "annotate"

    def __init__(
        self,
        in_dir: str | Path,
        cfg: AnnotateConfig,
        out_dir: str | Path,
        progress: bool = True,
        limit: int | None = None,
        tokens_dir: str | Path | None = None,
    ) -> None:
        self.in_dir = as_path(in_dir)  # extracted shards: local path or s3:// / gs:// URL
        self.tokens_dir = (
            as_path(tokens_dir) if tokens_dir is not None else None
        )  # their token table
        self.cfg = cfg
        self.limit = (
            limit  # only the first `limit` rows (shard order); the rest are dropped "beyond_limit"
        )
        if not list_shards(self.in_dir):
            raise FileNotFoundError(
                f"no shards under {self.in_dir / 'shards'} to annotate; run `drivevla extract` first"
            )
        if self.tokens_dir is not None and not list_shards(self.tokens_dir) and not fs.is_dir(self.tokens_dir):
            raise FileNotFoundError(f"no token table under {self.tokens_dir}; run `drivevla tokenize` first")
        self.inputs = input_shards(self.in_dir, self.tokens_dir)
        if not self.inputs:
            raise FileNotFoundError(
                f"no tokenized rows under {self.tokens_dir} to annotate: tokenize dropped every row of "
                f"{self.in_dir} (no future: a test split?)"
            )
        schema = input_schema(self.in_dir, self.tokens_dir)
        self.output_schema = annotation_schema(schema)
        self.cache_root = as_path(cfg.cache_dir) if cfg.cache_dir else as_path(out_dir) / CACHE_DIR
        self.cutoff = fit_stage_cutoff(self.inputs, set(schema.names), cfg)
        self.progress = progress
        self.totals: Counter[str] = Counter()  # local engine only (workers elsewhere log their own)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: VLMClient | None = None

    def config_dict(self) -> dict[str, Any]:
        d = to_dict(self.cfg)
        # Where and how requests are sent does not change the output; the model and prompt do.
        client = {
            k: v
            for k, v in d["client"].items()
            if k in ("model", "model_revision", "temperature", "top_p", "max_tokens", "guided")
        }
        return {
            "in_dir": str(self.in_dir),
            "tokens_dir": str(self.tokens_dir) if self.tokens_dir is not None else None,
            "limit": self.limit,
            "annotator": d["annotator"],
            "annotate_fast": d["annotate_fast"],
            "selection": d["selection"],
            "cutoff": [self.cutoff.score, self.cutoff.tiebreak],
            "prompt": d["prompt"],
            "client": client if self.cfg.annotator == "vlm" else {},
        }

    def partitions(self) -> list[Partition]:
        parts = []
        left = self.limit
        for unit in self.inputs:
            take = unit.rows if left is None else max(0, min(unit.rows, left))
            if left is not None:
                left -= take
            parts.append(
                Partition(unit.id, {"shard": unit.shard, "tokens": unit.tokens, "take": take})
            )
        return parts

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        """Every input row (a dict, tokens joined), in partition order."""
        for unit in self.inputs:
            yield from read_input(unit).to_pylist()

    def reopen_failed(self, out_dir: str | Path) -> dict[str, int]:
        """Remove the completion markers of finished partitions whose rows hold failed VLM requests.

        Returns ``{partition: failed rows}`` of the reopened ones. The runner then redoes
        them: cached answers are reused and only the failed requests are sent again
        (``retry_failed``), and the partition's shards are rewritten. Markers of another
        stage config are left alone (the runner reports the mismatch).
        """
        if self.cfg.annotator != "vlm" or not self.cfg.retry_failed:
            return {}
        fsys, root = url_to_fs(out_dir)  # markers and shards through the project's filesystem layer
        root = root.rstrip("/")
        fp = self.fingerprint()
        reopened: dict[str, int] = {}
        for part in self.partitions():
            marker = f"{root}/{DONE_DIR}/{part.id}.json"
            try:
                m = json.loads(fsys.cat_file(marker))
            except FileNotFoundError:
                continue
            if m.get("fingerprint") != fp:
                continue
            failed = 0
            for name in m.get("shards", []):
                with fsys.open(f"{root}/{SHARD_DIR}/{name}", "rb") as fh:
                    cols = ["annotation_status", "annotation_provenance"]
                    for r in pq.read_table(fh, columns=cols).to_pylist():
                        prov = r["annotation_provenance"] or {}
                        # a failed request (not a prompt that cannot be built: that is not sent)
                        if r["annotation_status"] == "failed" and prov.get("request_key"):
                            failed += 1
            if failed:
                fsys.rm(marker)
                reopened[part.id] = failed
        return reopened

    def preflight(self) -> None:
        """Fail fast (PreflightError with instructions) unless every endpoint serves the model."""
        if self.cfg.annotator == "vlm" and self.cfg.client.preflight:

            async def check() -> None:
                async with VLMClient(self.cfg.client) as client:
                    await client.preflight()

            asyncio.run(check())

    def __getstate__(self) -> dict[str, Any]:  # shipped to workers without live resources
        state = dict(self.__dict__)
        state["_loop"] = state["_client"] = None
        return state

    def setup(self) -> None:
        if self.cfg.annotator != "vlm":
            return
        self._loop = asyncio.new_event_loop()
        self._client = VLMClient(self.cfg.client)
        if self.cfg.client.preflight:
            self._loop.run_until_complete(self._client.preflight())

    def teardown(self) -> None:
        if self._loop is not None:
            if self._client is not None:
                self._loop.run_until_complete(self._client.aclose())
            self._loop.close()
        self._loop = self._client = None

    def _cache_dir(self, partition_id: str) -> Path:
        """The partition's request cache; one written before the token-table layout is reused.

        Partitions of tokenized input were named after the tokenize output shards then
        (``<extracted shard>-00000``); their cached answers stay valid, so they are not paid twice.
        """
        path = fs.join(self.cache_root, partition_id)
        legacy = fs.join(self.cache_root, f"{partition_id}-00000")
        if self.tokens_dir is not None and not fs.exists(path) and fs.exists(legacy):
            log.info("annotate %s: reusing the request cache %s", partition_id, legacy)
            return legacy
        return path

    def process(self, partition: Partition) -> Iterator[Outcome]:
        shard = as_path(partition.payload["shard"])
        tokens = partition.payload.get("tokens")
        unit = InputShard(partition.id, str(shard), tuple(tokens) if tokens else None, -1)
        rows = read_input(unit).to_pylist()
        take = int(partition.payload.get("take", len(rows)))
        for row in rows[take:]:
            yield Drop(row["sample_id"], "beyond_limit", str(shard))
        rows = rows[:take]
        annotator = PartitionAnnotator(self.cfg, self.cutoff)
        bar = None
        if self.progress and self.cfg.annotator == "vlm":
            from tqdm.auto import tqdm

            bar = tqdm(total=0, desc=f"annotate {partition.id}", unit="req", leave=False)
        loop = self._loop or asyncio.new_event_loop()
        try:
            anns, report = loop.run_until_complete(
                annotator.annotate(rows, self._client, self._cache_dir(partition.id), bar)
            )
        finally:
            if bar is not None:
                bar.close()
            if loop is not self._loop:
                loop.close()
        self.totals.update(report.status)
        self.totals.update({f"error:{k}": v for k, v in report.errors.items()})
        log.info(
            "annotate %s: %s; %d from cache, %d sent; errors %s",
            partition.id, dict(report.status), report.cached, report.sent, dict(report.errors) or "none",
        )  # fmt: skip
        for row, ann in zip(rows, anns, strict=True):
            row.update(ann)
            yield row
