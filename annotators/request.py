"""A chat request ready to send, and its cache key.

The key is the sha256 of the canonical request: model and revision, sampling
parameters, guided-decoding mode and JSON schema, template version and the
messages with every image replaced by the sha256 of its raw JPEG bytes. Two
runs that would send the same request get the same key, whatever the machine.

The body is assembled from pre-serialised messages, so a retry with a larger
``max_tokens`` does not re-encode the images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from annotators.config import ClientConfig
from annotators.prompts import PromptRequest
from annotators.schema import answer_json_schema

KEY_VERSION = "1"  # bump when the key's ingredients change


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sampling_params(cfg: ClientConfig) -> dict[str, Any]:
    """The sampling parameters recorded in provenance and hashed into the key."""
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}


# How the answer schema is asked for (client.guided). Checked against the servers' own
# request models (tests/test_annotate_request_fields.py lists their field names):
# * "response_format" (default): the OpenAI field ``{type: json_schema, json_schema:
#   {name, schema, strict}}``. vLLM's ChatCompletionRequest
#   (vllm/entrypoints/openai/chat_completion/protocol.py) and SGLang's
#   (python/sglang/srt/entrypoints/openai/protocol.py) both declare and honour it.
# * "structured_outputs": vLLM's own field ``{"json": schema}`` (vLLM only; SGLang
#   drops unknown fields silently, so output would NOT be constrained there).
# * "guided_json": the field vLLM removed. Current vLLM lists it in
#   _REMOVED_GUIDED_FIELDS and logs "Request contains the removed guided-decoding
#   field(s) ['guided_json'], which are ignored; output will NOT be constrained";
#   only for old vLLM servers.
# * "both": guided_json and response_format (old and new vLLM alike); "none": nothing.
GUIDED_MODES = ("response_format", "structured_outputs", "guided_json", "both", "none")


def schema_fields(mode: str, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Top-level body fields asking the server to decode ``schema`` (see GUIDED_MODES)."""
    out: dict[str, Any] = {}
    if mode in ("guided_json", "both"):
        out["guided_json"] = schema
    if mode in ("response_format", "both"):
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        }
    if mode == "structured_outputs":
        out["structured_outputs"] = {"json": schema}
    return out


def guided_fields(cfg: ClientConfig) -> dict[str, Any]:
    """Body fields asking the server to decode the answer schema."""
    return schema_fields(cfg.guided, "driving_reasoning", answer_json_schema())


@dataclass(frozen=True)
class ChatRequest:
    """What the client sends for one sample; ``key`` identifies it in the cache and logs."""

    key: str
    sample_id: str
    head_json: bytes  # serialised object of everything but max_tokens and messages
    messages_json: bytes  # serialised messages, images inlined
    max_tokens: int

    def body(self, max_tokens: int | None = None) -> bytes:
        """The JSON body with ``max_tokens`` (default: the configured one); no re-serialisation."""
        n = int(max_tokens or self.max_tokens)
        return b"".join(
            (self.head_json[:-1], b',"max_tokens":%d,"messages":' % n, self.messages_json, b"}")
        )


def request_key(prompt: PromptRequest, cfg: ClientConfig) -> str:
    """sha256 of the canonical request (no image bytes needed beyond their hashes)."""
    ident = {
        "key_version": KEY_VERSION,
        "model": cfg.model,
        "revision": cfg.model_revision,
        "params": sampling_params(cfg),
        "guided": cfg.guided,
        "schema": answer_json_schema(),
        "template_version": prompt.template_version,
        "messages": prompt.keyed_messages(),
    }
    return hashlib.sha256(_canonical(ident)).hexdigest()


def build_chat_request(
    prompt: PromptRequest, cfg: ClientConfig, key: str | None = None
) -> ChatRequest:
    """Inline the images (base64) and serialise the messages once."""
    head = {
        "model": cfg.model,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        **guided_fields(cfg),
    }
    messages = json.dumps(prompt.openai_messages(), separators=(",", ":")).encode()
    return ChatRequest(
        key=key or request_key(prompt, cfg),
        sample_id=prompt.sample_id,
        head_json=json.dumps(head, separators=(",", ":")).encode(),
        messages_json=messages,
        max_tokens=cfg.max_tokens,
    )
