"""Annotation settings as frozen dataclasses (loaded from ``configs/annotate.yaml``).

Every field has a default, so ``AnnotateConfig()`` is a working local setup:
the ``vlm`` annotator against a vLLM/SGLang server on ``127.0.0.1:8000``.
The ``rules`` annotator is only used when asked for (``annotator: rules``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ANNOTATORS = ("vlm", "rules")


@dataclass(frozen=True, slots=True)
class ClipConfig:
    """Which camera frames go into the prompt for one dataset."""

    cameras: tuple[str, ...] = ("front", "front_left", "front_right", "back")
    frames: int = 4  # frames per camera, the last at t0
    hz: float = 2.0  # spacing of the chosen frames

    def __post_init__(self) -> None:
        if self.frames < 1 or self.hz <= 0:
            raise ValueError(
                f"clip needs frames >= 1 and hz > 0, got frames={self.frames} hz={self.hz}"
            )


@dataclass(frozen=True, slots=True)
class SelectionConfig:
    """Slow/fast thinking selection (DESIGN.md section 6)."""

    # "fraction": the top slow_fraction by score; "threshold": score >= threshold
    mode: str = "fraction"
    slow_fraction: float = 0.3
    threshold: float = 2.0
    close_distance_m: float = 10.0  # objects nearer than this (centre distance) are "close"
    conflict_distance_m: float = 3.0  # constant-velocity object path within this of the ego future
    conflict_horizon_s: float = 5.0
    curvature_rad: float = 0.35  # |heading change| over the future above this is "high curvature"
    # mean deceleration over any 1 s of the future above this is "braking"
    braking_mps2: float = 2.0
    hard_scenarios: tuple[str, ...] = (
        "construction",
        "intersection",
        "pedestrians",
        "cyclists",
        "cut_ins",
        "foreign_object_debris",
        "special_vehicles",
        "multi_lane_maneuvers",
        "spotlight",
    )
    scenario_column: str = "scenario_cluster"  # WOD-E2E scenario label column, where extracted

    def __post_init__(self) -> None:
        if self.mode not in ("fraction", "threshold"):
            raise ValueError(f"selection.mode must be 'fraction' or 'threshold', got {self.mode!r}")
        if not 0.0 <= self.slow_fraction <= 1.0:
            raise ValueError(f"selection.slow_fraction must be in [0, 1], got {self.slow_fraction}")


@dataclass(frozen=True, slots=True)
class PromptConfig:
    template_version: str = "v1"
    clip: ClipConfig = field(default_factory=ClipConfig)
    # Per-dataset overrides of `clip` fields (plain mappings, as in YAML).
    # WOD-E2E ships 3 frames at 1 Hz per camera.
    dataset_clips: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"waymo_e2e": {"frames": 3, "hz": 1.0}}
    )
    max_objects: int = 8  # grounding facts listed, nearest first
    few_shot: bool = True

    def __post_init__(self) -> None:
        for name in self.dataset_clips:
            self.clip_for(name)  # validate now, not in a worker

    def clip_for(self, dataset: str) -> ClipConfig:
        """The clip settings of ``dataset`` (``clip`` with that dataset's overrides)."""
        over = self.dataset_clips.get(dataset)
        if not over:
            return self.clip
        unknown = set(over) - {"cameras", "frames", "hz"}
        if unknown:
            raise ValueError(f"prompt.dataset_clips.{dataset}: unknown key(s) {sorted(unknown)}")
        base = {"cameras": self.clip.cameras, "frames": self.clip.frames, "hz": self.clip.hz}
        base.update(over)
        return ClipConfig(
            cameras=tuple(base["cameras"]), frames=int(base["frames"]), hz=float(base["hz"])
        )


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """The OpenAI-compatible client (DESIGN.md section 6)."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:8000/v1",)
    model: str = "Qwen/Qwen2.5-VL-72B-Instruct"
    model_revision: str = ""  # recorded in the cache key when the server pins one
    api_key_env: str = "OPENAI_API_KEY"  # read from the environment, never logged or stored
    max_in_flight: int = 64  # upper bound, all endpoints together
    min_in_flight: int = 1
    initial_in_flight: int = 0  # 0: start at max_in_flight
    temperature: float = 0.2
    top_p: float = 0.9
    max_tokens: int = 1024
    length_retry_factor: float = 2.0  # finish_reason=length: retry once with max_tokens * this
    max_tokens_cap: int = 4096
    # How the answer schema is requested: "response_format" (json_schema; vLLM and SGLang
    # honour it), "structured_outputs" (vLLM only), "guided_json" (removed from current
    # vLLM: ignored there, output NOT constrained), "both" (guided_json + response_format)
    # or "none". See annotators/request.py.
    guided: str = "response_format"
    max_attempts: int = 6  # transient errors (429/5xx/timeout/connection) per request
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    timeout_base_s: float = 30.0  # read timeout = base + max_tokens * per_token
    timeout_per_token_s: float = 0.05
    # EWMA latency above this x the baseline shrinks the limit (0: off)
    latency_tolerance: float = 3.0
    preflight: bool = True
    # A dead endpoint (this many failed attempts in a row: 5xx, 429 without success,
    # timeouts, connection errors) leaves the rotation; one request probes it back after
    # endpoint_probe_s, doubling up to endpoint_probe_max_s while it stays dead.
    endpoint_down_after: int = 5
    endpoint_probe_s: float = 5.0
    endpoint_probe_max_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("client.endpoints must list at least one base URL")
        if self.max_in_flight < 1 or not 1 <= self.min_in_flight <= self.max_in_flight:
            raise ValueError("client needs 1 <= min_in_flight <= max_in_flight")
        modes = ("response_format", "structured_outputs", "guided_json", "both", "none")
        if self.guided not in modes:
            raise ValueError(f"client.guided must be one of {'|'.join(modes)}, got {self.guided!r}")
        if self.endpoint_down_after < 1 or self.endpoint_probe_s <= 0:
            raise ValueError("client needs endpoint_down_after >= 1 and endpoint_probe_s > 0")


@dataclass(frozen=True, slots=True)
class AnnotateConfig:
    annotator: str = "vlm"  # "vlm" or "rules" (rules only when asked for)
    annotate_fast: bool = False  # also send fast-thinking samples to the annotator
    retry_failed: bool = True  # a rerun resends requests whose cached result is a failure
    cache_dir: str = ""  # default: <out>/_cache
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    client: ClientConfig = field(default_factory=ClientConfig)

    def __post_init__(self) -> None:
        if self.annotator not in ANNOTATORS:
            raise ValueError(f"annotator must be one of {ANNOTATORS}, got {self.annotator!r}")
