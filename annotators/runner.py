"""Annotate one partition of rows: select think modes, reuse cached results, send the rest.

The stage (``pipelines/stages/annotate.py``) calls :meth:`PartitionAnnotator.annotate`
once per input shard inside the worker's event loop; all of the shard's
missing requests run concurrently, bounded by the client's adaptive limit.
A result counts as done only once committed to the append-only cache, and
output rows are made from the merged cache, so a crash at any point loses at
most the requests in flight and a rerun sends only what is missing (or
failed, with ``retry_failed``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annotators.cache import ResultCache
from annotators.client import AnnotationError, VLMClient
from annotators.config import AnnotateConfig
from annotators.parsing import parse_answer
from annotators.prompts import PromptError, PromptRequest, build_prompt
from annotators.request import build_chat_request, request_key, sampling_params
from annotators.rules import RULES_VERSION, rules_reasoning
from annotators.schema import AnnotationStatus, empty_annotation
from annotators.selection import Cutoff, decide
from schemas.enums import ThinkMode

log = logging.getLogger(__name__)


@dataclass
class PartitionReport:
    """What happened to one partition's rows (logged, and summed by the CLI)."""

    status: Counter[str] = field(default_factory=Counter)  # AnnotationStatus -> rows
    errors: Counter[str] = field(default_factory=Counter)  # error class -> rows
    cached: int = 0  # answered from the cache
    sent: int = 0  # requests sent in this run


def _model_id(cfg: AnnotateConfig) -> str:
    c = cfg.client
    return f"{c.model}@{c.model_revision}" if c.model_revision else c.model


def _failed_value(
    error_class: str, message: str, attempts: int = 0, provenance: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "status": "failed",
        "error": f"{error_class}: {message}",
        "attempts": attempts,
        "provenance": provenance,
    }


class PartitionAnnotator:
    """Annotation of rows with a fixed config and slow/fast cutoff."""

    def __init__(self, cfg: AnnotateConfig, cutoff: Cutoff) -> None:
        self.cfg = cfg
        self.cutoff = cutoff
        self._params_json = json.dumps(sampling_params(cfg.client), sort_keys=True)

    def _provenance(self, prompt: PromptRequest, key: str, **usage: Any) -> dict[str, Any]:
        return {
            "annotator": "vlm",
            "model": _model_id(self.cfg),
            "server": usage.get("server"),
            "params_json": self._params_json,
            "request_key": key,
            "image_hashes": list(prompt.image_hashes),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "latency_s": usage.get("latency_s"),
            "finish_reason": usage.get("finish_reason"),
            "attempts": usage.get("attempts"),
            "template_version": prompt.template_version,
        }

    def plan(
        self, rows: Sequence[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[tuple[int, PromptRequest, str]]]:
        """Annotation dicts for every row, and the VLM jobs ``(row index, prompt, key)`` still to fill."""
        anns: list[dict[str, Any]] = []
        jobs: list[tuple[int, PromptRequest, str]] = []
        for i, row in enumerate(rows):
            ann = empty_annotation()
            mode, reasons, score = decide(row, self.cfg.selection, self.cutoff)
            ann.update(think_mode=mode, think_reasons=reasons, think_score=score)
            anns.append(ann)
            if mode == ThinkMode.FAST.value and not self.cfg.annotate_fast:
                ann["annotation_status"] = AnnotationStatus.SKIPPED_FAST.value
                continue
            try:
                if self.cfg.annotator == "rules":
                    ann.update(rules_reasoning(row, self.cfg.prompt).columns())
                    ann["annotation_status"] = AnnotationStatus.OK.value
                    ann["annotation_provenance"] = {
                        "annotator": "rules", "model": RULES_VERSION, "params_json": "{}", "attempts": 0,
                        "template_version": RULES_VERSION,
                    }  # fmt: skip
                    continue
                prompt = build_prompt(row, self.cfg.prompt)
            except PromptError as exc:
                ann["annotation_status"] = AnnotationStatus.FAILED.value
                ann["annotation_error"] = f"PromptError: {exc}"
                continue
            jobs.append((i, prompt, request_key(prompt, self.cfg.client)))
        return anns, jobs

    def fill(
        self,
        anns: list[dict[str, Any]],
        jobs: Sequence[tuple[int, PromptRequest, str]],
        results: Mapping[str, dict[str, Any]],
    ) -> None:
        """Copy cached results into the annotation dicts."""
        for i, _prompt, key in jobs:
            value = results.get(key)
            ann = anns[i]
            if value is None:  # cannot happen after a completed run; kept explicit
                ann["annotation_status"] = AnnotationStatus.FAILED.value
                ann["annotation_error"] = "NotAnnotated: no result was committed for this request"
                continue
            ann["annotation_provenance"] = value.get("provenance")
            if value["status"] == "ok":
                ann.update(value["reasoning"])
                ann["annotation_status"] = AnnotationStatus.OK.value
            else:
                ann["annotation_status"] = AnnotationStatus.FAILED.value
                ann["annotation_error"] = value["error"]

    async def annotate(
        self,
        rows: Sequence[Mapping[str, Any]],
        client: VLMClient | None,
        cache_dir: Path | None,
        progress: Any = None,
    ) -> tuple[list[dict[str, Any]], PartitionReport]:
        """Annotation columns for every row (same order), and a report."""
        report = PartitionReport()
        anns, jobs = self.plan(rows)
        if jobs:
            if client is None or cache_dir is None:
                raise RuntimeError("the vlm annotator needs a client and a cache directory")
            cache = ResultCache(cache_dir)
            try:
                results, _ = cache.load()
                todo = []
                for job in jobs:
                    got = results.get(job[2])
                    if got is not None and (got["status"] == "ok" or not self.cfg.retry_failed):
                        report.cached += 1
                    else:
                        todo.append(job)
                seen: set[str] = set()
                todo = [
                    j for j in todo if not (j[2] in seen or seen.add(j[2]))
                ]  # identical requests: send once
                report.sent = len(todo)
                if progress is not None:
                    progress.reset(total=len(todo))
                await self._run(todo, client, cache, results, progress)
            finally:
                cache.close()
            self.fill(anns, jobs, results)
        for ann in anns:
            report.status[ann["annotation_status"]] += 1
            if ann["annotation_error"]:
                report.errors[ann["annotation_error"].split(":", 1)[0]] += 1
        return anns, report

    async def _run(
        self,
        todo: Sequence[tuple[int, PromptRequest, str]],
        client: VLMClient,
        cache: ResultCache,
        results: dict[str, dict[str, Any]],
        progress: Any,
    ) -> None:
        # Bound how many requests hold base64 bodies at once (memory), above the in-flight limit.
        prepared = asyncio.Semaphore(2 * client.cfg.max_in_flight)
        start = time.perf_counter()
        errors: Counter[str] = Counter()

        async def one(prompt: PromptRequest, key: str) -> None:
            async with prepared:
                req = build_chat_request(prompt, client.cfg, key)
                try:
                    comp, parsed = await client.complete(req, parse_answer)
                except AnnotationError as exc:
                    value = _failed_value(
                        exc.error_class,
                        exc.message,
                        exc.attempts,
                        self._provenance(prompt, key, attempts=exc.attempts),
                    )
                    errors[exc.error_class] += 1
                else:
                    prov = self._provenance(
                        prompt, key, server=comp.server, prompt_tokens=comp.prompt_tokens,
                        completion_tokens=comp.completion_tokens, latency_s=comp.latency_s,
                        finish_reason=comp.finish_reason, attempts=comp.attempts,
                    )  # fmt: skip
                    value = {"status": "ok", "reasoning": parsed.columns(), "provenance": prov}
            await cache.commit(key, value)  # durable before it counts as done
            results[key] = value
            if progress is not None:
                elapsed = max(time.perf_counter() - start, 1e-9)
                progress.update(1)
                progress.set_postfix(
                    tok_s=f"{client.stats.completion_tokens / elapsed:.0f}",
                    limit=client.dispatcher.limit,
                    retries=client.stats.retries,
                    failed=sum(errors.values()),
                    refresh=False,
                )

        tasks = [asyncio.ensure_future(one(p, k)) for _, p, k in todo]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # e.g. the cache cannot be written: stop the other requests instead of leaving
            # them running in the worker's loop after their partition has failed.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
