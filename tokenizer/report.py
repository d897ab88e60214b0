"""The report written with every codebook fit: coverage, round-trip error, usage, plots.

``report.json`` + PNGs next to the codebook, and a summary through logging.
Round-trip ADE/FDE are measured on held-out futures (a seeded hash of the
sample id keeps them out of the fit), per dataset and overall.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.shards import atomic_write_bytes
from pipelines.io import fs
from tokenizer.nearest import TokenIndex
from tokenizer.tokenizer import ActionTokenizer

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"


def coverage(index: TokenIndex, segments: np.ndarray, tol: float) -> float:
    """Share of ``segments (N,3)`` whose end contour is within ``tol`` (mean corner distance) of a token."""
    if len(segments) == 0:
        return float("nan")
    # mean corner distance <= tol  <=>  summed <= 4 tol; an exact bounded query, no nearest search
    return float(np.mean(index.within(segments, 4.0 * tol)))


def roundtrip(
    tokenizer: ActionTokenizer, futures: np.ndarray
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Encode-then-decode errors of ``futures (B,10,3)``: metrics, ids ``(B,10)`` and decoded futures."""
    ids = tokenizer.encode(futures)
    dec = tokenizer.decode(ids)
    err = np.linalg.norm(
        dec[..., :2] - np.asarray(futures, np.float64)[..., :2], axis=-1
    )  # (B,10) m
    metrics = {
        "futures": int(len(futures)),
        "ade_m": float(err.mean()),
        "fde_m": float(err[:, -1].mean()),
        "ade_p95_m": float(np.percentile(err.mean(axis=1), 95)),
        "fde_p95_m": float(np.percentile(err[:, -1], 95)),
        "ade_max_m": float(err.mean(axis=1).max()),
    }
    return metrics, ids, dec


def usage(ids: np.ndarray, k: int) -> dict[str, Any]:
    """Token usage histogram, perplexity (exp of the usage entropy) and the share of tokens used."""
    counts = np.bincount(np.asarray(ids).ravel(), minlength=k)
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    return {
        "tokens_used": int((counts > 0).sum()),
        "perplexity": float(np.exp(-(p * np.log(p)).sum())) if total else float("nan"),
        "histogram": counts.tolist(),
    }


def write_report(
    out_dir: str | Path,
    tokenizer: ActionTokenizer,
    heldout: Mapping[str, np.ndarray],
    fit: Mapping[str, Any],
    examples: int = 6,
    in_sample: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Evaluate held-out (and in-sample) futures per dataset, draw the plots, write ``report.json``.

    Usage and the overall figures come from the held-out futures; in-sample
    round trips (futures the fit saw) are reported beside them, labelled, so a
    tiny data set without held-out rows still shows how the codebook does.
    """
    out = fs.as_path(out_dir)  # local path or s3:// / gs:// URL
    fs.makedirs(out)
    held = _evaluate(tokenizer, heldout, "held-out")
    report: dict[str, Any] = {
        "fit": dict(fit),
        "heldout": held.per_dataset,
        "overall": held.overall,
    }
    report["usage"] = usage(held.ids, tokenizer.k) if held.ids is not None else None
    plots = [_plot_tokens(out / "tokens.png", tokenizer)]
    shown, label = held, "held-out"
    if in_sample is not None:
        ins = _evaluate(tokenizer, in_sample, None)
        report["in_sample"] = {**ins.per_dataset, "overall": ins.overall}
        if held.ids is None:
            shown, label = ins, "in-sample (no held-out futures)"
    if shown.fut is not None and shown.dec is not None:
        plots.append(_plot_roundtrip(out / "roundtrip.png", shown.fut, shown.dec, examples, label))
    if report["usage"] is not None:
        plots.append(_plot_usage(out / "usage.png", np.asarray(report["usage"]["histogram"])))
    report["plots"] = [p.name for p in plots]
    atomic_write_bytes(out / REPORT_NAME, (json.dumps(report, indent=1) + "\n").encode())
    _log_summary(report, out)
    return report


@dataclass
class _Eval:
    per_dataset: dict[str, Any]
    overall: dict[str, Any]
    ids: np.ndarray | None
    fut: np.ndarray | None
    dec: np.ndarray | None


def _evaluate(
    tokenizer: ActionTokenizer, futures: Mapping[str, np.ndarray], warn: str | None
) -> _Eval:
    per_dataset: dict[str, Any] = {}
    ids_l, fut_l, dec_l = [], [], []
    for name in sorted(futures):
        fut = futures[name]
        if len(fut) == 0:
            per_dataset[name] = {"futures": 0}
            if warn:
                log.warning(
                    "report: no %s futures for %s; its round-trip error is not measured", warn, name
                )
            continue
        per_dataset[name], ids, dec = roundtrip(tokenizer, fut)
        ids_l.append(ids)
        fut_l.append(np.asarray(fut, np.float64))
        dec_l.append(dec)
    if not ids_l:
        return _Eval(per_dataset, {"futures": 0}, None, None, None)
    ids, fut, dec = np.concatenate(ids_l), np.concatenate(fut_l), np.concatenate(dec_l)
    err = np.linalg.norm(dec[..., :2] - fut[..., :2], axis=-1)
    overall = {
        "futures": int(len(fut)),
        "ade_m": float(err.mean()),
        "fde_m": float(err[:, -1].mean()),
    }
    return _Eval(per_dataset, overall, ids, fut, dec)


def _log_summary(report: Mapping[str, Any], out: Path) -> None:
    fit = report["fit"]
    log.info(
        "codebook: K=%s (requested %s), tol=%s m, %s segments, coverage %.4f",
        fit.get("k"),
        fit.get("k_requested"),
        fit.get("tol"),
        fit.get("segment_count"),
        fit.get("coverage", float("nan")),
    )
    for name, m in report["heldout"].items():
        if m.get("futures"):
            log.info(
                "  held-out %-10s %6d futures  ADE %.3f m  FDE %.3f m",
                name,
                m["futures"],
                m["ade_m"],
                m["fde_m"],
            )
    o = report["overall"]
    if o.get("futures"):
        u = report["usage"]
        log.info(
            "  overall %d futures  ADE %.3f m  FDE %.3f m  tokens used %d  perplexity %.1f",
            o["futures"],
            o["ade_m"],
            o["fde_m"],
            u["tokens_used"],
            u["perplexity"],
        )
    ins = report.get("in_sample", {}).get("overall", {})
    if ins.get("futures"):
        log.info(
            "  in-sample %d futures  ADE %.3f m  FDE %.3f m",
            ins["futures"],
            ins["ade_m"],
            ins["fde_m"],
        )
    log.info("  report: %s (plots %s)", out / REPORT_NAME, ", ".join(report["plots"]))


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    fs.write_bytes(path, buf.getvalue())


def _plot_tokens(path: Path, tokenizer: ActionTokenizer) -> Path:
    plt = _figure()
    tok = tokenizer.tokens
    fig, ax = plt.subplots(figsize=(7, 5))
    sc = ax.scatter(tok[:, 0], tok[:, 1], c=np.degrees(tok[:, 2]), s=4, cmap="coolwarm")
    fig.colorbar(sc, ax=ax, label="dtheta (deg)")
    ax.set_xlabel("dx (m)")
    ax.set_ylabel("dy (m)")
    ax.set_title(f"action tokens: end points of {len(tok)} segments (0.5 s)")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def _plot_roundtrip(path: Path, fut: np.ndarray, dec: np.ndarray, n: int, label: str) -> Path:
    plt = _figure()
    # spread the examples over the error range: best, median-ish and worst cases
    ade = np.linalg.norm(dec[..., :2] - fut[..., :2], axis=-1).mean(axis=1)
    order = np.argsort(ade)
    pick = order[np.linspace(0, len(order) - 1, min(n, len(order))).astype(int)]
    fig, axes = plt.subplots(1, len(pick), figsize=(3 * len(pick), 3.5), squeeze=False)
    for ax, i in zip(axes[0], pick, strict=True):
        ax.plot(np.r_[0, fut[i, :, 1]], np.r_[0, fut[i, :, 0]], "k.-", label="ground truth")
        ax.plot(np.r_[0, dec[i, :, 1]], np.r_[0, dec[i, :, 0]], "r.--", label="decoded tokens")
        ax.set_title(f"ADE {ade[i]:.2f} m", fontsize=9)
        ax.invert_xaxis()  # y is left: draw left on the left
        ax.set_aspect("equal", adjustable="datalim")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"round trip on {label} futures (x forward, y left)")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def _plot_usage(path: Path, counts: np.ndarray) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(np.arange(len(counts)), counts, width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel("token id")
    ax.set_ylabel("uses (held-out)")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path
