"""Optional second-pass LLM judge of reasoning quality (DESIGN.md section 7; off by default).

The judge is a text-only request through the annotator's async client
(:class:`annotators.client.VLMClient`: same retries, adaptive concurrency,
error classes): it reads the reasoning, the ego state in words and the
ground-truth meta-action, and answers ``{"verdict": "pass"|"fail", "reason": ...}``
(guided JSON where the server supports it). A failed request is never a
silent pass: it rejects the reasoning with ``judge_failed: <error class>``
unless ``on_error: keep``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from annotators.config import ClientConfig
from annotators.ego_text import describe_ego_state
from annotators.filters import FilterResult, objects_text
from annotators.parsing import ParseError

log = logging.getLogger(__name__)

JUDGE_VERSION = "1"

JUDGE_SYSTEM = (
    "You review driving-scene reasoning written for training an autonomous driving model. "
    "Judge only the text: is it coherent, specific to a driving scene, internally consistent, and does "
    "its intent justify the given final action? Reject generic filler, contradictions, hallucinated "
    "certainty about things it cannot know, and text that is not about driving. "
    'Answer with JSON: {"verdict": "pass" or "fail", "reason": "<one short sentence>"}.'
)

JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["pass", "fail"]}, "reason": {"type": "string"}},
    "required": ["verdict", "reason"],
    "additionalProperties": False,
}


@dataclass(frozen=True, slots=True)
class JudgeConfig:
    """``judge:`` section of ``configs/build.yaml``."""

    enabled: bool = False
    on_error: str = "reject"  # "reject" (reason judge_failed) or "keep"
    client: ClientConfig = field(default_factory=lambda: ClientConfig(max_tokens=256))

    def __post_init__(self) -> None:
        if self.on_error not in ("reject", "keep"):
            raise ValueError(f"judge.on_error must be 'reject' or 'keep', got {self.on_error!r}")


def judge_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The judge's chat messages for one annotated row (text only)."""
    user = (
        f"Ego state: {describe_ego_state(row)}\n"
        f'Ground-truth future action: lateral = "{row.get("meta_lateral")}"; '
        f'longitudinal = "{row.get("meta_longitudinal")}".\n\n'
        f"Scene: {str(row.get('reasoning_scene') or '').strip()}\n"
        f"Critical objects: {objects_text(row.get('reasoning_objects'))}\n"
        f"Intent: {str(row.get('reasoning_intent') or '').strip()}\n"
        f"Final action: {row.get('reasoning_action_lateral')}, {row.get('reasoning_action_longitudinal')}"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> FilterResult:
    """``True`` for a pass, ``(False, "judge: <reason>")`` for a fail; :class:`ParseError` otherwise."""
    s = text.strip()
    if "{" in s and "}" in s:
        s = s[s.index("{") : s.rindex("}") + 1]
    try:
        obj = json.loads(s)
    except ValueError:
        raise ParseError(f"judge answer is not JSON: {text[:80]!r}") from None
    verdict = str(obj.get("verdict", "")).strip().lower() if isinstance(obj, dict) else ""
    if verdict == "pass":
        return True
    if verdict == "fail":
        return False, f"judge: {' '.join(str(obj.get('reason') or 'no reason given').split())}"
    raise ParseError(f"judge verdict {verdict!r} is not 'pass' or 'fail'")


def build_judge_request(row: Mapping[str, Any], cfg: ClientConfig) -> Any:
    """A :class:`annotators.request.ChatRequest` for the judge (guided JSON as the client config says)."""
    from annotators.request import ChatRequest, schema_fields

    head: dict[str, Any] = {"model": cfg.model, "temperature": 0.0, "top_p": 1.0}
    head.update(schema_fields(cfg.guided, "reasoning_verdict", JUDGE_SCHEMA))
    messages = json.dumps(judge_messages(row), separators=(",", ":")).encode()
    key = hashlib.sha256(json.dumps([JUDGE_VERSION, head, messages.decode()], sort_keys=True).encode()).hexdigest()
    return ChatRequest(
        key=key, sample_id=str(row["sample_id"]), head_json=json.dumps(head, separators=(",", ":")).encode(),
        messages_json=messages, max_tokens=cfg.max_tokens,
    )  # fmt: skip


class Judge:
    """Judges batches of rows; one event loop and one client per :meth:`judge` call."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg

    def judge(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, FilterResult]:
        """``{sample_id: True | (False, reason)}`` for every row."""
        if not rows:
            return {}
        return asyncio.run(self._judge_all(rows))

    async def _judge_all(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, FilterResult]:
        from annotators.client import AnnotationError, VLMClient

        async with VLMClient(self.cfg.client) as client:
            if self.cfg.client.preflight:
                await client.preflight()  # no server serving the model: fail now, with instructions

            async def one(row: Mapping[str, Any]) -> tuple[str, FilterResult]:
                sid = str(row["sample_id"])
                try:
                    _, verdict = await client.complete(build_judge_request(row, self.cfg.client), parse_verdict)
                except AnnotationError as exc:
                    log.warning("judge: %s failed: %s", sid, exc)
                    if self.cfg.on_error == "keep":
                        return sid, True
                    return sid, (False, f"judge_failed: {exc.error_class}")
                return sid, verdict

            results = await asyncio.gather(*(one(r) for r in rows))
        return dict(results)

    def close(self) -> None:
        """Nothing is held between calls (kept for the stage's setup/teardown symmetry)."""
