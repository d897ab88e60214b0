"""Pinhole rendering of the simulated world: sky, grass, road, lane lines and agent boxes.

Every image is produced by real projection with exactly the calibration the
writers store (intrinsics ``K`` and the camera-to-ego transform, OpenCV camera
axes: x right, y down, z forward), so a box drawn in an image lies where the
calibration says. Geometry is clipped against the near plane before
projection; faces are drawn far to near (painter's algorithm) with PIL.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image, ImageDraw

from pipelines.sample_data.world import (
    LANE_WIDTH,
    ROAD_LEFT,
    ROAD_RIGHT,
    Box,
    Route,
    Scene,
)

NEAR: Final = 0.3  # m, near clipping plane
DRAW_RANGE: Final = 80.0  # m: road pieces farther than this from the camera are not drawn
SKY: Final = (140, 185, 235)
GRASS: Final = (96, 136, 72)
ROAD: Final = (88, 88, 92)
WHITE: Final = (235, 235, 235)
YELLOW: Final = (230, 190, 40)
# Base colours per category; tests rely on cars being red-dominant.
OBJECT_COLOURS: Final = {"car": (205, 35, 35), "truck": (35, 70, 205), "pedestrian": (250, 150, 10)}
_SHADE = (0.85, 0.85, 0.7, 0.7, 1.0)  # front, back, left, right, top (order of _FACE_IDS)
# OpenCV camera axes expressed in a "forward-left-up" camera body frame.
_CV_FROM_FLU = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


@dataclass(frozen=True)
class PinholeCamera:
    """A calibrated camera: ``K`` (3,3) for ``width`` x ``height`` px; ``cam_to_ego`` (4,4), OpenCV axes."""

    name: str
    width: int
    height: int
    K: np.ndarray
    cam_to_ego: np.ndarray


def make_camera(
    name: str,
    width: int,
    height: int,
    hfov_deg: float,
    xyz: tuple[float, float, float],
    yaw_deg: float,
    pitch_deg: float = 0.0,
) -> PinholeCamera:
    """A distortion-free camera at ``xyz`` (ego frame) looking along ``yaw_deg`` (CCW from +x), tilted down by ``pitch_deg``."""
    f = (width / 2.0) / np.tan(np.radians(hfov_deg) / 2.0)
    K = np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    ry = np.array(
        [[np.cos(pitch), 0, np.sin(pitch)], [0, 1, 0], [-np.sin(pitch), 0, np.cos(pitch)]]
    )
    r_ego_flu = rz @ ry  # body frame (x forward, y left, z up) -> ego
    cam_to_ego = np.eye(4)
    cam_to_ego[:3, :3] = r_ego_flu @ _CV_FROM_FLU.T  # OpenCV camera -> ego
    cam_to_ego[:3, 3] = xyz
    return PinholeCamera(name, int(width), int(height), K, cam_to_ego)


def ego_to_world(pose: np.ndarray) -> np.ndarray:
    """4x4 transform of a flat-ground ego pose ``(x, y, yaw)``."""
    c, s = np.cos(pose[2]), np.sin(pose[2])
    m = np.eye(4)
    m[:2, :2] = [[c, -s], [s, c]]
    m[:2, 3] = pose[:2]
    return m


def project_points(camera: PinholeCamera, points_ego: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(N,2)`` and depths ``(N,)`` of ego-frame points ``(N,3)`` (depth <= 0: behind)."""
    pts = np.asarray(points_ego, dtype=np.float64).reshape(-1, 3)
    ego_to_cam = np.linalg.inv(camera.cam_to_ego)
    pc = pts @ ego_to_cam[:3, :3].T + ego_to_cam[:3, 3]
    z = pc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (pc @ camera.K.T)[:, :2] / z[:, None]
    return uv, z


@dataclass(frozen=True)
class RoadGeometry:
    """Static ground polygons (world, z = 0): ``polygons`` (P,4,3), a colour and a draw range each."""

    polygons: np.ndarray
    colours: tuple[tuple[int, int, int], ...]
    ranges: np.ndarray  # (P,) m: skip the polygon beyond this distance from the camera


def _strip(route: Route, s: np.ndarray, left: float, right: float) -> np.ndarray:
    """Quads between consecutive arc lengths ``s`` spanning offsets [right, left]."""
    pl, _ = route.point(s, np.full(len(s), left))
    pr, _ = route.point(s, np.full(len(s), right))
    quads = np.stack([pr[:-1], pr[1:], pl[1:], pl[:-1]], axis=1)
    return np.concatenate([quads, np.zeros(quads.shape[:2] + (1,))], axis=-1)


def road_geometry(route: Route) -> RoadGeometry:
    """Road surface, lane lines and intersection stubs of a route."""
    # Coarse steps on straights and fine ones in turns keep the polygon count low.
    s = [0.0]
    for s0, s1, _ in route.turns:
        s.extend(np.arange(s0, s1, 2.0).tolist() + [s1])
    for s0, s1 in route.straights:
        s.extend(np.arange(s0, s1, 12.0).tolist() + [s1])
    s_all = np.unique(np.round(s, 3))
    polys: list[np.ndarray] = []
    colours: list[tuple[int, int, int]] = []
    ranges: list[np.ndarray] = []

    def add(quads: np.ndarray, colour: tuple[int, int, int], rng: float) -> None:
        polys.append(quads)
        colours.extend([colour] * len(quads))
        ranges.append(np.full(len(quads), rng))

    add(_strip(route, s_all, ROAD_LEFT, ROAD_RIGHT), ROAD, DRAW_RANGE)
    for s0, s1, _ in route.turns:  # the crossing roads of each intersection, as straight stubs
        for s_at, direction in ((s0, 1.0), (s1, -1.0)):
            xy, h = route.centre(np.array([s_at]))
            fwd = direction * np.array([np.cos(h[0]), np.sin(h[0])])
            left = np.array([-np.sin(h[0]), np.cos(h[0])])
            a, b = xy[0], xy[0] + 30.0 * fwd
            quad = np.array(
                [
                    a + ROAD_RIGHT * left,
                    b + ROAD_RIGHT * left,
                    b + ROAD_LEFT * left,
                    a + ROAD_LEFT * left,
                ]
            )
            add(np.concatenate([quad, np.zeros((4, 1))], axis=1)[None], ROAD, DRAW_RANGE)
    w = 0.24  # m, line width (wider than real lines so they show at low resolution)
    for off, colour in (
        (-LANE_WIDTH / 2, WHITE),
        (ROAD_LEFT - 0.3, WHITE),
        (1.5 * LANE_WIDTH - 0.15, YELLOW),
        (1.5 * LANE_WIDTH + 0.15, YELLOW),
    ):
        add(_strip(route, s_all, off + w / 2, off - w / 2), colour, 60.0)
    dash_s = np.arange(0.0, route.length - 3.0, 9.0)  # 3 m dashes every 9 m between the two lanes
    for s0 in dash_s:
        add(
            _strip(route, np.array([s0, s0 + 3.0]), LANE_WIDTH / 2 + w / 2, LANE_WIDTH / 2 - w / 2),
            WHITE,
            40.0,
        )
    return RoadGeometry(np.concatenate(polys), tuple(colours), np.concatenate(ranges))


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a camera-frame polygon ``(n,3)`` to z >= NEAR."""
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        a_in, b_in = a[2] >= NEAR, b[2] >= NEAR
        if a_in:
            out.append(a)
        if a_in != b_in:
            out.append(a + (NEAR - a[2]) / (b[2] - a[2]) * (b - a))
    return np.asarray(out)


_BOX_CORNERS = (
    np.array(
        [
            [1, 1, -1],
            [1, -1, -1],
            [-1, -1, -1],
            [-1, 1, -1],
            [1, 1, 1],
            [1, -1, 1],
            [-1, -1, 1],
            [-1, 1, 1],
        ],
        dtype=np.float64,
    )
    / 2.0
)
_FACE_IDS = np.array([[0, 1, 5, 4], [2, 3, 7, 6], [3, 0, 4, 7], [1, 2, 6, 5], [4, 5, 6, 7]])
_FACE_NORMALS = np.array(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], dtype=np.float64
)
_FACE_COLOURS = {  # per category, the shaded colour of each face
    cat: [tuple(int(v) for v in np.clip(np.array(rgb) * f, 0, 255)) for f in _SHADE]
    for cat, rgb in OBJECT_COLOURS.items()
}


def box_corners_world(box: Box) -> np.ndarray:
    """The 8 corners ``(8,3)`` of a box in the world frame (order of ``_BOX_CORNERS``)."""
    c, s = np.cos(box.yaw), np.sin(box.yaw)
    local = _BOX_CORNERS * np.array([box.length, box.width, box.height])
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return local @ rot.T + np.array([box.x, box.y, box.z])


class Renderer:
    """Renders one scene's road and agents for any calibrated camera and ego pose."""

    def __init__(self, scene: Scene) -> None:
        self.road = road_geometry(scene.route)
        self._flat = self.road.polygons.reshape(-1, 3)
        self._centres = self.road.polygons[:, :, :2].mean(axis=1)

    def render(self, camera: PinholeCamera, ego_pose: np.ndarray, boxes: list[Box]) -> Image.Image:
        """The image of ``camera`` mounted on the ego at world pose ``(x, y, yaw)``."""
        cam_to_world = ego_to_world(ego_pose) @ camera.cam_to_ego
        r = cam_to_world[:3, :3].T  # rigid inverse: world -> camera
        t = -r @ cam_to_world[:3, 3]
        w, h = camera.width, camera.height
        img = Image.new("RGB", (w, h), SKY)
        draw = ImageDraw.Draw(img)
        self._draw_ground(draw, camera, cam_to_world)

        cam_xy = cam_to_world[:2, 3]
        idx = np.flatnonzero(np.hypot(*(self._centres - cam_xy).T) < self.road.ranges)
        pts = self.road.polygons[idx] @ r.T + t  # (P,4,3) camera frame
        for k, uv in _project_polygons(camera, pts, idx):
            draw.polygon(uv, fill=self.road.colours[k])

        order = sorted(boxes, key=lambda b: -float(np.hypot(b.x - cam_xy[0], b.y - cam_xy[1])))
        cam_pos = cam_to_world[:3, 3]
        for box in order:
            centre = r @ np.array([box.x, box.y, box.z]) + t
            if centre[2] < -0.5 * (box.length + box.width):  # entirely behind the camera
                continue
            corners = box_corners_world(box)
            cc = corners @ r.T + t
            if (cc[:, 2] < NEAR).all():
                continue
            c, s = np.cos(box.yaw), np.sin(box.yaw)
            normals = _FACE_NORMALS @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T
            to_cam = cam_pos - corners[_FACE_IDS].mean(axis=1)
            visible = np.flatnonzero((normals * to_cam).sum(axis=1) > 0)  # back faces culled
            colours = _FACE_COLOURS[box.category]
            for k, uv in _project_polygons(camera, cc[_FACE_IDS[visible]], visible):
                draw.polygon(uv, fill=colours[k])
        return img

    def _draw_ground(
        self, draw: ImageDraw.ImageDraw, camera: PinholeCamera, cam_to_world: np.ndarray
    ) -> None:
        """Grass below the horizon: the line through the vanishing points of two horizontal directions."""
        fwd = cam_to_world[:3, 2]
        yaw = np.arctan2(fwd[1], fwd[0])
        r_wc = cam_to_world[:3, :3]
        pts = []
        for d_ang in (-0.3, 0.3):
            d = (
                np.array([np.cos(yaw + d_ang), np.sin(yaw + d_ang), 0.0]) @ r_wc
            )  # world dir -> camera
            p = camera.K @ d
            pts.append(p[:2] / p[2])
        (u0, v0), (u1, v1) = pts
        slope = (v1 - v0) / (u1 - u0)
        w, h = camera.width, camera.height
        left_v = v0 + slope * (-w - u0)
        right_v = v0 + slope * (2 * w - u0)
        draw.polygon([(-w, left_v), (2 * w, right_v), (2 * w, 3 * h), (-w, 3 * h)], fill=GRASS)


def _project_polygons(
    camera: PinholeCamera, polys: np.ndarray, ids: np.ndarray
) -> list[tuple[int, list[tuple[float, float]]]]:
    """Project camera-frame polygons ``(P,n,3)``; return ``(id, pixel vertices)`` of those in view, in id order.

    Vectorised for the common cases (all in front, all behind); only polygons
    crossing the near plane are clipped one by one.
    """
    behind = polys[..., 2] < NEAR
    out: list[tuple[int, list[tuple[float, float]]]] = []
    full = ~behind.any(axis=1)
    f = np.array([camera.K[0, 0], camera.K[1, 1]])
    c = camera.K[:2, 2]
    if full.any():
        uv = polys[full][..., :2] / polys[full][..., 2:3] * f + c
        lo, hi = uv.min(axis=1), uv.max(axis=1)
        seen = (
            (hi[:, 0] >= 0)
            & (lo[:, 0] <= camera.width)
            & (hi[:, 1] >= 0)
            & (lo[:, 1] <= camera.height)
        )
        for k, p in zip(ids[full][seen].tolist(), uv[seen].tolist(), strict=True):
            out.append((k, [tuple(v) for v in p]))
    for j in np.flatnonzero(behind.any(axis=1) & ~behind.all(axis=1)):
        poly = _clip_near(polys[j])
        if len(poly) < 3:
            continue
        uv = poly[:, :2] / poly[:, 2:3] * f + c
        if (
            uv[:, 0].max() < 0
            or uv[:, 0].min() > camera.width
            or uv[:, 1].max() < 0
            or uv[:, 1].min() > camera.height
        ):
            continue
        out.append((int(ids[j]), [tuple(v) for v in uv.tolist()]))
    out.sort(key=lambda item: item[0])
    return out


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes with fixed settings (deterministic for the same pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, subsampling=0)
    return buf.getvalue()
