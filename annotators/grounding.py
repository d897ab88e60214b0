"""Grounding facts from labelled objects: where each one is, in metres and in the images.

Shared by the prompt builder (facts given to the VLM) and the rules annotator
(facts it writes out), so both describe an object the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.geometry import distort_normalized, project_points

OBJECT_CENTRE_HEIGHT_M = 0.8  # labels are 2-D; project a point at typical box mid-height


@dataclass(frozen=True, slots=True)
class ObjectFact:
    category: str
    x: float  # m, ego frame
    y: float
    distance: float  # m
    speed: float  # m/s over ground
    vx: float
    vy: float
    camera: str | None  # camera whose image holds the centre, nearest the image centre
    image_part: str | None  # "left", "centre" or "right" third of that image
    track_id: str

    def where(self) -> str:
        """Position in words, e.g. ``12.0 m ahead, 3.1 m to the left``."""
        lon = f"{abs(self.x):.1f} m {'ahead' if self.x >= 0 else 'behind'}"
        if abs(self.y) < 0.5:
            return f"{lon}, in line with the ego vehicle"
        return f"{lon}, {abs(self.y):.1f} m to the {'left' if self.y > 0 else 'right'}"

    def image_location(self) -> str:
        if self.camera is None:
            return "not visible in the cameras shown"
        return f"{self.camera.replace('_', ' ')} camera, {self.image_part} part"

    def motion(self) -> str:
        if self.speed < 0.3:
            return "stationary"
        heading = math.degrees(math.atan2(self.vy, self.vx))
        if abs(heading) < 30:
            way = "moving in the ego direction"
        elif abs(heading) > 150:
            way = "moving towards the ego vehicle"
        else:
            way = f"moving to the {'left' if heading > 0 else 'right'} across the ego path"
        return f"{way} at {self.speed:.1f} m/s"


def _past_fold(cam_xyz: np.ndarray, model: str | None, coeffs: Any) -> bool:
    """True where the lens model no longer maps farther off-axis rays farther out.

    OpenCV's polynomial model is fitted inside the field of view; far outside it
    (strong barrel distortion) the distorted radius shrinks again and folds
    points behind the image edge back into the picture. Such a point is not in
    the image, whatever its pixel says.
    """
    if model is None or coeffs is None or len(coeffs) == 0:
        return False
    xy = cam_xyz[:2] / cam_xyz[2]
    r = float(np.hypot(*xy))
    if r == 0.0:
        return False
    d = distort_normalized(np.stack([xy, xy * 1.001]), model, np.asarray(coeffs, np.float64))
    # distorted radius along the ray's own direction: it turns negative past the fold too
    along = d @ (xy / r)
    return bool(along[0] <= 0.0 or along[1] <= along[0])


def project_to_cameras(
    x: float, y: float, cameras: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None
) -> tuple[str | None, str | None]:
    """The camera (among ``names``) showing ego-frame point (x, y), and its horizontal third.

    Pixels come from :func:`pipelines.geometry.project_points` with each camera's
    ``distortion_model`` / ``distortion``, so an object is placed where the
    (unrectified) image shows it; cameras without a model are pinhole.
    """
    best: tuple[float, str, str] | None = None
    point = np.array([[x, y, OBJECT_CENTRE_HEIGHT_M]])
    for cam in cameras:
        if names is not None and cam["name"] not in names:
            continue
        ext = np.asarray(cam["extrinsics"], dtype=np.float64).reshape(4, 4)
        model, coeffs = cam.get("distortion_model"), cam.get("distortion")
        uv, depth = project_points(point, cam["intrinsics"], ext, model, coeffs)
        if depth[0] <= 0.5:
            continue
        u, v = float(uv[0, 0]), float(uv[0, 1])
        w, h = float(cam["width"]), float(cam["height"])
        if not (0 <= u < w and 0 <= v < h):
            continue
        pc = (point[0] - ext[:3, 3]) @ ext[:3, :3]  # ego -> camera (OpenCV), as project_points
        if _past_fold(pc, model, coeffs):
            continue
        off = abs(u / w - 0.5)
        part = "left" if u < w / 3 else ("right" if u >= 2 * w / 3 else "centre")
        if best is None or off < best[0]:
            best = (off, cam["name"], part)
    return (None, None) if best is None else (best[1], best[2])


def object_facts(
    row: Mapping[str, Any], max_objects: int, camera_names: Sequence[str] | None = None
) -> list[ObjectFact]:
    """The ``max_objects`` nearest labelled objects of a row, nearest first (ties by track id)."""
    facts = []
    cams = row.get("cameras") or ()
    for obj in row.get("objects") or ():
        x, y = float(obj["x"]), float(obj["y"])
        vx, vy = float(obj.get("vx") or 0.0), float(obj.get("vy") or 0.0)
        cam, part = project_to_cameras(x, y, cams, camera_names)
        facts.append(
            ObjectFact(
                category=str(obj.get("category") or "object"),
                x=x,
                y=y,
                distance=math.hypot(x, y),
                speed=math.hypot(vx, vy),
                vx=vx,
                vy=vy,
                camera=cam,
                image_part=part,
                track_id=str(obj.get("track_id") or ""),
            )
        )
    facts.sort(key=lambda f: (round(f.distance, 3), f.track_id))
    return facts[:max_objects]


def describe_fact(f: ObjectFact) -> str:
    """One grounding line for the prompt."""
    return f"{f.category}: {f.where()}; {f.motion()}; image: {f.image_location()}."
