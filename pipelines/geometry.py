"""SE(2)/SE(3) helpers shared by sources, the simulator, the tokenizer and rewards.

One place for frame transforms (STYLE.md: no frame transform in three files).
Poses are ``(x, y, heading)`` arrays of shape ``(..., 3)``; headings are CCW
from +x and wrapped to [-pi, pi).
"""

from __future__ import annotations

import numpy as np

from schemas.sample import DISTORTION_MODELS

VEHICLE_LENGTH = 4.8  # m, contour used by the action codebook (DESIGN.md section 4)
VEHICLE_WIDTH = 2.0  # m


def wrap_angle(a: np.ndarray | float) -> np.ndarray:
    """Wrap angles to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2.0 * np.pi) - np.pi


def yaw_from_quaternion(q: np.ndarray) -> np.ndarray:
    """Yaw (rotation about +z) of quaternions ``(..., 4)`` given as (w, x, y, z)."""
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def pyquaternion_yaw(q: np.ndarray) -> np.ndarray:
    """Yaw of quaternions ``(..., 4)`` (w, x, y, z) as pyquaternion's ``Quaternion.yaw_pitch_roll[0]``.

    NAVSIM and OpenScene take headings this way (``navsim/common/dataloader``,
    ``DriveEngine/process_data``: ``Quaternion(q).yaw_pitch_roll[0]``):
    ``atan2(2 (w z - x y), 1 - 2 (y^2 + z^2))`` on the normalised quaternion
    (the z-y'-x'' intrinsic angles of pyquaternion's docstring). It equals
    :func:`yaw_from_quaternion` for pure yaw rotations and differs by
    centimetres at 40 m once the vehicle pitches a few degrees, so NAVSIM
    trajectories must use this one to match the dataset's scorer.
    """
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.arctan2(2.0 * (w * z - x * y), 1.0 - 2.0 * (y * y + z * z))


def quaternion_from_yaw(yaw: np.ndarray | float) -> np.ndarray:
    """Quaternion (w, x, y, z) of a rotation by ``yaw`` about +z."""
    yaw = np.asarray(yaw, dtype=np.float64)
    return np.stack([np.cos(yaw / 2), np.zeros_like(yaw), np.zeros_like(yaw), np.sin(yaw / 2)], axis=-1)


def rotation_from_quaternion(q: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix of a quaternion (w, x, y, z)."""
    w, x, y, z = (float(v) for v in np.asarray(q, dtype=np.float64) / np.linalg.norm(q))
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def quaternion_from_rotation(r: np.ndarray) -> np.ndarray:
    """Quaternion (w, x, y, z), w >= 0, of a 3x3 rotation matrix."""
    r = np.asarray(r, dtype=np.float64)
    t = np.trace(r)
    if t > 0:
        s = np.sqrt(t + 1.0) * 2
        qs = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2]) * 2
        qs = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
    elif r[1, 1] > r[2, 2]:
        s = np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2]) * 2
        qs = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
    else:
        s = np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1]) * 2
        qs = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
    q = np.asarray(qs)
    return q if q[0] >= 0 else -q


def transform_matrix(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """4x4 homogeneous transform from a 3x3 rotation (or quaternion w,x,y,z) and a translation."""
    rot = np.asarray(rotation, dtype=np.float64)
    if rot.shape == (4,):
        rot = rotation_from_quaternion(rot)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = np.asarray(translation, dtype=np.float64)[:3]
    return out


def poses_to_local(poses: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """World poses ``(N,3)`` expressed in the frame of one world pose ``origin`` (3,)."""
    poses = np.asarray(poses, dtype=np.float64)
    origin = np.asarray(origin, dtype=np.float64)
    dx = poses[:, 0] - origin[0]
    dy = poses[:, 1] - origin[1]
    c, s = np.cos(origin[2]), np.sin(origin[2])
    out = np.empty_like(poses)
    out[:, 0] = c * dx + s * dy
    out[:, 1] = -s * dx + c * dy
    out[:, 2] = wrap_angle(poses[:, 2] - origin[2])
    return out


def poses_to_world(local: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Inverse of :func:`poses_to_local`."""
    local = np.asarray(local, dtype=np.float64)
    origin = np.asarray(origin, dtype=np.float64)
    c, s = np.cos(origin[2]), np.sin(origin[2])
    out = np.empty_like(local)
    out[:, 0] = origin[0] + c * local[:, 0] - s * local[:, 1]
    out[:, 1] = origin[1] + s * local[:, 0] + c * local[:, 1]
    out[:, 2] = wrap_angle(local[:, 2] + origin[2])
    return out


def vectors_to_local(vectors: np.ndarray, heading: float) -> np.ndarray:
    """Rotate world-frame 2-vectors ``(..., 2)`` into a frame with the given heading."""
    v = np.asarray(vectors, dtype=np.float64)
    c, s = np.cos(heading), np.sin(heading)
    return np.stack([c * v[..., 0] + s * v[..., 1], -s * v[..., 0] + c * v[..., 1]], axis=-1)


def box_corners(poses: np.ndarray, length: float = VEHICLE_LENGTH, width: float = VEHICLE_WIDTH) -> np.ndarray:
    """Corners ``(..., 4, 2)`` of boxes centred on ``poses (..., 3)``: FL, FR, BR, BL."""
    poses = np.asarray(poses)
    hl, hw = length / 2.0, width / 2.0
    local = np.array([[hl, hw], [hl, -hw], [-hl, -hw], [-hl, hw]], dtype=poses.dtype)
    c, s = np.cos(poses[..., 2])[..., None], np.sin(poses[..., 2])[..., None]
    x = poses[..., 0:1] + c * local[:, 0] - s * local[:, 1]
    y = poses[..., 1:2] + s * local[:, 0] + c * local[:, 1]
    return np.stack([x, y], axis=-1)


def headings_from_positions(xy: np.ndarray, start_heading: float = 0.0, min_step: float = 0.2) -> np.ndarray:
    """Headings of a polyline ``(N,2)`` from its displacements, holding the previous one when static.

    Step ``i`` uses the displacement from point ``i-1`` (the origin for ``i=0``) to
    point ``i``; steps shorter than ``min_step`` metres keep the previous heading
    (``start_heading`` for the first).
    """
    xy = np.asarray(xy, dtype=np.float64)
    prev = np.vstack([np.zeros((1, 2)), xy[:-1]])
    d = xy - prev
    out = np.empty(len(xy))
    h = start_heading
    for i, (dx, dy) in enumerate(d):  # N <= 20: a loop is clearer than a scan here
        if dx * dx + dy * dy >= min_step * min_step:
            h = float(np.arctan2(dy, dx))
        out[i] = h
    return wrap_angle(out)


# --------------------------------------------------------------------------- lens distortion

# Camera models of the per-camera ``distortion_model`` field (schemas/sample.py).
# "opencv": OpenCV's pinhole model with coefficients (k1, k2, p1, p2[, k3[, k4, k5, k6]]), as nuPlan
# stores per camera (``distortion`` in OpenScene's ``cams`` entries, copied from the nuPlan DB by
# ``DriveEngine/process_data/helpers/nuplan_cameras_utils.py``) and as WOD's ``CameraCalibration.intrinsic``
# holds after f_u, f_v, c_u, c_v (k1, k2, p1, p2, k3).


def distort_normalized(xy: np.ndarray, model: str | None, coeffs: np.ndarray | None) -> np.ndarray:
    """Apply lens distortion to normalised image coordinates ``(N,2)`` (x/z, y/z); None = pinhole."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if model is None or coeffs is None or len(coeffs) == 0:
        return xy
    if model not in DISTORTION_MODELS:
        raise ValueError(f"unknown distortion model {model!r}; known: {DISTORTION_MODELS}")
    d = np.zeros(8)
    c = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if c.size not in (4, 5, 8):
        raise ValueError(f"opencv distortion needs 4, 5 or 8 coefficients, got {c.size}")
    d[: c.size] = c
    k1, k2, p1, p2, k3, k4, k5, k6 = d
    x, y = xy[:, 0], xy[:, 1]
    r2 = x * x + y * y
    radial = (1 + k1 * r2 + k2 * r2**2 + k3 * r2**3) / (1 + k4 * r2 + k5 * r2**2 + k6 * r2**3)
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([xd, yd], axis=1)


def project_points(
    points_ego: np.ndarray,
    intrinsics: np.ndarray,
    extrinsics: np.ndarray,
    distortion_model: str | None = None,
    distortion: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ego-frame points ``(N,3)`` -> pixels ``(N,2)`` and depth ``(N,)`` (depth <= 0: behind the camera).

    ``extrinsics`` map camera (OpenCV: x right, y down, z forward) to ego
    coordinates; the lens model, when given, is applied before the intrinsics,
    so pixels land where the (unrectified) image shows the point.
    """
    pts = np.asarray(points_ego, np.float64).reshape(-1, 3)
    k = np.asarray(intrinsics, np.float64).reshape(3, 3)
    cam_to_ego = np.asarray(extrinsics, np.float64).reshape(4, 4)
    rot = cam_to_ego[:3, :3]
    cam = (pts - cam_to_ego[:3, 3]) @ rot  # rigid inverse: R^T (p - t)
    depth = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        xy = distort_normalized(cam[:, :2] / cam[:, 2:3], distortion_model, distortion)
    uv = xy @ k[:2, :2].T + k[:2, 2]
    return uv, depth
