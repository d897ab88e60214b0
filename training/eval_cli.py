"""The ``python -m training.eval`` run: decode (checkpoint or endpoint), write predictions, metrics, report.

Split from ``training/eval.py`` (decoding + overall metrics, also used in
training) to keep both modules short. See that module's docstring for the
command line and the outputs.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from annotators.training_prompt import (
    ROLE_SYSTEM,
    ROLE_USER,
    SYSTEM_PROMPT,
    build_user_content,
    clip_fps,
    clip_frames,
    request_video_fps,
    select_cameras,
)
from training import benchmarks
from training.data import BuiltRows, ShardIndex
from training.eval import codebook_decoder, make_record, predict_local, summarise

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("sample_id", "dataset", "text", "action_tokens", "trajectory", "reasoning", "think_mode",
                      "format_error", "latency_s")


def default_out(args: Any) -> Path:
    name = Path(args.checkpoint).name if args.checkpoint else "endpoint"
    return Path("out") / "eval" / name


def check_out_dir(out: Path, checkpoint: str | None) -> None:
    """Eval never writes into the checkpoint it evaluates (a checkpoint is read-only input)."""
    if checkpoint is None:
        return
    ck = Path(checkpoint).resolve()
    o = out.resolve()
    if o == ck or ck in o.parents:
        raise ValueError(f"--out {out} lies inside the checkpoint {checkpoint}: choose a directory outside it")


def run(args: Any) -> dict[str, Any]:
    out = Path(args.out) if args.out else default_out(args)
    check_out_dir(out, args.checkpoint)
    decode_fn = codebook_decoder(args.codebook)
    from training.model import read_num_action_tokens

    cb = Path(args.codebook)
    k = read_num_action_tokens(cb if (cb / "codebook.json").is_file() else cb / "codebook")
    cameras = tuple(c.strip() for c in args.cameras.split(",") if c.strip())
    index = ShardIndex.from_glob(args.data)
    if args.navsim_metric_cache:  # fail before decoding, naming what is missing
        from training.rewards.navsim_pdm import NavsimPDMReward

        NavsimPDMReward(metric_cache=args.navsim_metric_cache)
    check = not args.no_check_stored_messages
    if args.checkpoint:
        from training.loading import load_merged

        device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
        model, proc, ids = load_merged(args.checkpoint, k, min_pixels=args.min_pixels,
                                       max_pixels=args.max_pixels, device=device)
        rows = BuiltRows(index, proc, num_action_tokens=k, cameras=cameras, with_target=False,
                         check_stored_messages=check)
        pairs: Iterator[tuple[dict, dict]] = predict_local(
            model, proc, ids, rows, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            decode_fn=decode_fn, max_samples=args.max_samples)
    else:
        client = EndpointClient(args.endpoint, args.served_model, args.max_new_tokens)
        pairs = client.predict(index, k, cameras, decode_fn, args.max_samples)
    records, metas, raw = [], [], []
    t0 = time.perf_counter()
    for i, (rec, meta) in enumerate(pairs):
        records.append(rec)
        metas.append(meta)
        raw.append(i)
        if (i + 1) % 16 == 0:
            log.info("decoded %d rows (%.1f s)", i + 1, time.perf_counter() - t0)
    if not records:
        raise ValueError(f"no rows decoded from {args.data}")
    metrics = {"source": args.checkpoint or args.endpoint, "data": args.data, "overall": summarise(records, metas)}
    metrics.update(benchmark_metrics(records, metas, args.navsim_metric_cache))
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(records, out / "predictions.parquet")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    from training.eval_report import write_report

    rows_for_plots = BuiltRows(index, None, num_action_tokens=k, cameras=cameras, with_target=False)  # raw rows only
    write_report(metrics, records, metas, rows_for_plots, out, n_plots=args.plots)
    log.info("wrote %s (predictions.parquet, metrics.json, report.md)", out)
    return {"out": str(out), **{k2: v for k2, v in metrics["overall"].items() if k2 != "malformed_examples"}}


def benchmark_metrics(records: Sequence[dict], metas: Sequence[dict], navsim_cache: str | None) -> dict[str, Any]:
    """Per-benchmark metrics over the well-formed predictions of each dataset."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r, m in zip(records, metas, strict=True):
        if r["trajectory"] is None or m.get("future") is None:
            continue
        by.setdefault(m.get("dataset") or "", []).append(
            {"pred": np.asarray(r["trajectory"]), "future": np.asarray(m["future"], np.float64).reshape(-1, 3),
             "objects": m.get("objects"), "row": m})
    out: dict[str, Any] = {}
    if "nuscenes" in by:
        out["nuscenes"] = benchmarks.nuscenes_planning(by["nuscenes"])
    if "waymo_e2e" in by:
        out["waymo_e2e"] = benchmarks.wod_e2e(by["waymo_e2e"])
    if "nuplan" in by:
        if navsim_cache:
            out["navsim"] = benchmarks.navsim_pdms(by["nuplan"], navsim_cache)
        else:
            out["navsim"] = {"n": len(by["nuplan"]), "pdms": None,
                             "note": "not computed: pass --navsim-metric-cache (needs the navsim package)"}
    return out


def write_predictions(records: Sequence[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("sample_id", pa.string()), ("dataset", pa.string()), ("text", pa.string()),
        ("action_tokens", pa.list_(pa.int32())), ("trajectory", pa.list_(pa.list_(pa.float64()))),
        ("reasoning", pa.string()), ("think_mode", pa.string()), ("format_error", pa.string()),
        ("latency_s", pa.float64()),
    ])
    pq.write_table(pa.Table.from_pylist([{c: r[c] for c in PREDICTION_COLUMNS} for r in records], schema=schema),
                   path)


# --------------------------------------------------------------------------- OpenAI-compatible endpoint


def video_data_url(frames: Sequence[bytes]) -> str:
    """A clip as vLLM's ``data:video/jpeg;base64,<frame>,<frame>,...`` (comma-separated base64 JPEGs;
    vllm/multimodal/media/video.py ``VideoMediaIO.load_base64``)."""
    return "data:video/jpeg;base64," + ",".join(base64.b64encode(f).decode() for f in frames)


def chat_messages(row: dict[str, Any], cameras: Sequence[str]) -> list[dict[str, Any]]:
    """The training prompt as OpenAI chat content parts: text, and each camera clip as a ``video_url``."""
    cams = {c["name"]: c for c in select_cameras(row, cameras)}
    parts: list[dict[str, Any]] = []
    for p in build_user_content(row, cameras):
        if p["type"] == "video":
            parts.append({"type": "video_url", "video_url": {"url": video_data_url(clip_frames(cams[p["camera"]]))}})
        else:
            parts.append({"type": "text", "text": p["text"]})
    return [{"role": ROLE_SYSTEM, "content": SYSTEM_PROMPT}, {"role": ROLE_USER, "content": parts}]


class EndpointClient:
    """Greedy chat completions from an OpenAI-compatible server (e.g. ``vllm serve`` of an exported model)."""

    def __init__(self, base_url: str, model: str | None, max_new_tokens: int, timeout_s: float = 300.0) -> None:
        import httpx

        key = os.environ.get("DRIVEVLA_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.max_new_tokens = max_new_tokens
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        resp = self.http.get("/models")
        resp.raise_for_status()
        data = resp.json().get("data") or []
        if not data:
            raise ValueError(f"endpoint {self.http.base_url} lists no models; pass --served-model")
        return str(data[0]["id"])

    def complete(self, messages: list[dict[str, Any]], fps: float | None = None) -> str:
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "max_tokens": self.max_new_tokens, "temperature": 0.0,
            # vLLM sampling extras: keep the <action_i> special tokens in the text, no penalty
            "skip_special_tokens": False, "repetition_penalty": 1.0}
        if fps is not None:  # the clips' rate (vLLM: needs `vllm serve --trust-request-mm-kwargs`)
            body["media_io_kwargs"] = {"video": {"fps": fps}}
        resp = self.http.post("/chat/completions", json=body)
        if resp.status_code != 200:
            raise ValueError(f"endpoint {self.http.base_url}: HTTP {resp.status_code}: {resp.text[:300]}")
        return str(resp.json()["choices"][0]["message"]["content"] or "")

    def predict(self, index: ShardIndex, k: int, cameras: Sequence[str], decode_fn: Any,
                max_samples: int | None) -> Iterator[tuple[dict, dict]]:
        from training.data import META_COLUMNS

        rows = BuiltRows(index, None, num_action_tokens=k, cameras=cameras, with_target=False)
        n = len(index) if not max_samples else min(max_samples, len(index))
        for i in range(n):
            row = rows.raw_row(i)
            t0 = time.perf_counter()
            fps = request_video_fps([clip_fps(c) for c in select_cameras(row, cameras)], str(row.get("sample_id")))
            text = self.complete(chat_messages(row, cameras), fps)
            meta = {c: row.get(c) for c in META_COLUMNS}
            yield make_record(text, meta, k, decode_fn, time.perf_counter() - t0), meta
