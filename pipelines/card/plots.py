"""Card figures: label distributions and example samples with the future drawn on the front camera.

Projection: the future ``(x, y)`` poses lie on the ground, taken as the ego
frame's ``z = 0`` plane (the ego origin is the rear-axle centre on the road in
every source). A camera's extrinsics map camera (OpenCV: x right, y down,
z forward) coordinates to the ego frame, so points go ego -> camera through
the inverse, then through the camera's lens model (``distortion_model`` /
``distortion``: the stored images of nuPlan and WOD are not rectified) and
the intrinsics, so the drawn points sit where the image shows the road.
"""

from __future__ import annotations

import io
import logging
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.io import fs

log = logging.getLogger(__name__)

MIN_DEPTH_M = 0.5  # points closer to the camera plane than this are not drawn


def project_ego_points(
    points_ego: np.ndarray,
    intrinsics: np.ndarray,
    extrinsics: np.ndarray,
    distortion_model: str | None = None,
    distortion: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ego-frame points ``(N,3)`` -> pixel ``(N,2)`` and depth ``(N,)`` (depth <= 0: behind the camera)."""
    from pipelines.geometry import project_points

    coeffs = None if distortion is None else np.asarray(distortion, np.float64)
    return project_points(points_ego, intrinsics, extrinsics, distortion_model, coeffs)


def future_on_camera(row: Mapping[str, Any], camera: str = "front") -> dict[str, Any]:
    """The future of ``row`` projected into the last frame of ``camera``.

    Returns ``uv`` (visible points), ``image`` (RGB PIL image) and
    ``inside`` (mask of points inside the image, for all visible points).
    """
    from PIL import Image

    cam = next((c for c in row["cameras"] if c["name"] == camera), None)
    if cam is None:
        raise ValueError(f"sample {row.get('sample_id')!r} has no {camera!r} camera")
    frame = cam["frames"][-1]["image"]
    data = frame["bytes"] if isinstance(frame, Mapping) else None
    if data is not None:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    else:  # already decoded by `datasets`
        image = frame.convert("RGB")
    fut = np.asarray(row["future"], np.float64).reshape(-1, 3)
    pts = np.column_stack([fut[:, 0], fut[:, 1], np.zeros(len(fut))])
    uv, depth = project_ego_points(
        pts, cam["intrinsics"], cam["extrinsics"], cam.get("distortion_model"), cam.get("distortion")
    )
    visible = depth > MIN_DEPTH_M
    uv = uv[visible]
    w, h = image.size
    inside = (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    return {"uv": uv, "inside": inside, "image": image, "visible": visible}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_distributions(stats: Mapping[str, Any], path: Path) -> Path:
    """Bar charts of lateral / longitudinal meta-actions, commands and think modes, per dataset."""
    plt = _plt()
    cols = ("meta_lateral", "meta_longitudinal", "command", "think_mode")
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 4.2))
    datasets = stats["datasets"]
    for ax, col in zip(axes, cols, strict=True):
        by_ds = stats["distributions"].get(col, {})
        labels = sorted({k for c in by_ds.values() for k in c})
        x = np.arange(len(labels))
        width = 0.8 / max(1, len(datasets))
        for i, ds in enumerate(datasets):
            vals = [by_ds.get(ds, {}).get(lab, 0) for lab in labels]
            ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=ds)
        ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(col.replace("_", " "))
        ax.set_ylabel("samples")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()  # the build directory may be an object-store URL
    fig.savefig(buf, format="png", dpi=90)
    fs.write_bytes(path, buf.getvalue())
    plt.close(fig)
    return path


def example_caption(row: Mapping[str, Any]) -> str:
    """The text shown under an example: ids, labels, and the reasoning (or that it is fast)."""
    head = (
        f"{row['sample_id']}  |  command {row['command']}  |  meta-action "
        f"{row['meta_lateral']}, {row['meta_longitudinal']}  |  think {row['think_mode']}"
    )
    if row.get("think_mode") == "slow":
        from annotators.filters import objects_text

        body = (
            f"Scene: {row['reasoning_scene']}\nObjects: {objects_text(row['reasoning_objects'])}\n"
            f"Intent: {row['reasoning_intent']}\n"
            f"Action: {row['reasoning_action_lateral']}, {row['reasoning_action_longitudinal']}"
        )
    else:
        body = "Fast thinking: answer with action tokens only."
        if row.get("filter_reasons"):
            body += f" (reasoning rejected: {'; '.join(row['filter_reasons'])})"
    wrapped = "\n".join(textwrap.fill(line, 110) for line in body.splitlines())
    return head + "\n" + wrapped


def plot_example(row: Mapping[str, Any], path: Path) -> Path:
    """Front camera at t0 with the 10 future poses drawn on it, plus the sample's reasoning text."""
    plt = _plt()
    proj = future_on_camera(row)
    img = proj["image"]
    w, h = img.size
    caption = example_caption(row)
    n_lines = caption.count("\n") + 1
    fig_w = 9.0
    img_h = fig_w * h / w
    fig = plt.figure(figsize=(fig_w, img_h + 0.16 * n_lines + 0.3))
    ax = fig.add_axes((0, 1 - img_h / (img_h + 0.16 * n_lines + 0.3), 1, img_h / (img_h + 0.16 * n_lines + 0.3)))
    ax.imshow(np.asarray(img))
    uv = proj["uv"]
    if len(uv):
        ax.plot(uv[:, 0], uv[:, 1], "-", color="#00e5ff", linewidth=2)
        ax.scatter(uv[:, 0], uv[:, 1], c=np.linspace(0.5, 5.0, 10)[proj["visible"]], cmap="autumn", s=28, zorder=3)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    fig.text(0.01, 0.0, caption, fontsize=7, va="bottom", ha="left", family="monospace")
    buf = io.BytesIO()  # the build directory may be an object-store URL
    fig.savefig(buf, format="png", dpi=90)
    fs.write_bytes(path, buf.getvalue())
    plt.close(fig)
    return path
