"""``report.md`` of an eval run: metric tables per benchmark and best/worst cases drawn on the front camera."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

OVERALL_KEYS = ("samples", "format_rate", "slow_share", "reasoning_chars_mean", "latency_s_mean",
                "action_token_acc", "meta_action_acc", "ade_1s", "ade_3s", "ade_5s", "fde_3s")


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def tables(metrics: Mapping[str, Any]) -> str:
    lines = [f"# Evaluation of `{metrics.get('source')}`", "", f"Data: `{metrics.get('data')}`", "",
             "## All rows", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(metrics['overall'].get(k))} |" for k in OVERALL_KEYS]
    nus = metrics.get("nuscenes")
    if nus:
        lines += ["", f"## nuScenes open-loop planning ({nus['n']} well-formed rows, "
                  f"{nus['n_collision']} with objects)", "",
                  "| convention | L2 1s (m) | L2 2s | L2 3s | L2 avg | Col. 1s (%) | Col. 2s | Col. 3s | Col. avg |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for conv, label in (("stp3", "ST-P3 (average up to t)"), ("uniad", "UniAD (at t)")):
            l2 = [_fmt(nus[f"l2_{h}s_{conv}"]) for h in (1, 2, 3)] + [_fmt(nus[f"l2_avg_{conv}"])]
            col = [nus[f"collision_{h}s_{conv}"] for h in (1, 2, 3)] + [nus[f"collision_avg_{conv}"]]
            col_s = [_fmt(None if c is None else 100 * c) for c in col]
            lines.append(f"| {label} | " + " | ".join(l2 + col_s) + " |")
    wod = metrics.get("waymo_e2e")
    if wod:
        lines += ["", f"## WOD-E2E ({wod['n']} well-formed rows, {wod['n_rfs']} with rater trajectories)", "",
                  "| RFS (0-10) | ADE 3s (m) | ADE 5s (m) |", "|---|---|---|",
                  f"| {_fmt(wod['rfs'])} | {_fmt(wod['ade_3s'])} | {_fmt(wod['ade_5s'])} |"]
    nav = metrics.get("navsim")
    if nav:
        lines += ["", "## NAVSIM", "", f"PDMS: {_fmt(nav.get('pdms'))} over {nav['n']} rows"
                  + (f" ({nav['note']})" if nav.get("note") else "")]
    return "\n".join(lines) + "\n"


def ranked(records: Sequence[Mapping[str, Any]], metas: Sequence[Mapping[str, Any]]) -> list[tuple[float, int]]:
    """(ADE over the 10 steps, index) of the well-formed predictions with a logged future, best first."""
    out = []
    for i, (r, m) in enumerate(zip(records, metas, strict=True)):
        if r["trajectory"] is None or m.get("future") is None:
            continue
        gt = np.asarray(m["future"], np.float64).reshape(-1, 3)[:, :2]
        out.append((float(np.linalg.norm(np.asarray(r["trajectory"])[:, :2] - gt, axis=1).mean()), i))
    return sorted(out)


def plot_case(row: Mapping[str, Any], record: Mapping[str, Any], title: str, path: Path) -> Path:
    """Front camera (last frame) with the logged future (cyan) and the prediction (red)."""
    from pipelines.card.plots import MIN_DEPTH_M, _plt, future_on_camera, project_ego_points

    plt = _plt()
    proj = future_on_camera(row)
    img = proj["image"]
    cam = next(c for c in row["cameras"] if c["name"] == "front")
    pred = np.asarray(record["trajectory"], np.float64)
    uv, depth = project_ego_points(np.column_stack([pred[:, 0], pred[:, 1], np.zeros(len(pred))]),
                                   cam["intrinsics"], cam["extrinsics"])
    uv = uv[depth > MIN_DEPTH_M]
    w, h = img.size
    fig, ax = plt.subplots(figsize=(6, 6 * h / w + 0.4))
    ax.imshow(np.asarray(img))
    if len(proj["uv"]):
        ax.plot(proj["uv"][:, 0], proj["uv"][:, 1], "-o", color="#00e5ff", ms=3, lw=2, label="logged")
    if len(uv):
        ax.plot(uv[:, 0], uv[:, 1], "-o", color="#ff3030", ms=3, lw=2, label="predicted")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    ax.set_title(title, fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(metrics: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                 metas: Sequence[Mapping[str, Any]], rows: Any, out: Path, n_plots: int = 2) -> Path:
    """``report.md`` (tables, then the ``n_plots`` best and worst cases by ADE) in ``out``."""
    text = tables(metrics)
    order = ranked(records, metas)
    if n_plots > 0 and order:
        picks = [("best", x) for x in order[:n_plots]] + [("worst", x) for x in order[::-1][:n_plots]]
        text += "\n## Best and worst cases (ADE over 5 s; cyan logged, red predicted)\n\n"
        by_id = {rows.raw_row(j).get("sample_id"): j for j in range(len(rows))} if picks else {}
        for kind, (ade, i) in picks:
            sid = records[i]["sample_id"]
            if sid not in by_id:
                continue
            name = f"{kind}_{i:05d}.png"
            try:
                plot_case(rows.raw_row(by_id[sid]), records[i], f"{kind}: {sid} ADE {ade:.2f} m",
                          out / "plots" / name)
            except (ValueError, KeyError) as exc:  # e.g. a row without a front camera
                log.warning("no plot for %s: %s", sid, exc)
                continue
            text += f"**{kind}** `{sid}` ADE {ade:.2f} m\n\n![{kind}](plots/{name})\n\n"
    (out / "report.md").write_text(text)
    return out / "report.md"
