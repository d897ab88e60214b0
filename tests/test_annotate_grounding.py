"""Grounding places objects in the images with each camera's lens model, not the pinhole model only."""

from __future__ import annotations

import numpy as np

from annotators.grounding import (
    OBJECT_CENTRE_HEIGHT_M,
    describe_fact,
    object_facts,
    project_to_cameras,
)
from pipelines.geometry import project_points

W, H, F = 1600, 900, 1000.0
# camera -> ego: OpenCV axes (x right, y down, z forward) onto ego (x forward, y left, z up),
# mounted at the height grounding projects objects at, so every object lies on the image's centre row
EXT = [[0, 0, 1, 1.5], [-1, 0, 0, 0], [0, -1, 0, OBJECT_CENTRE_HEIGHT_M], [0, 0, 0, 1]]


def camera(distortion: list[float] | None = None) -> dict:
    return {"name": "front", "width": W, "height": H, "extrinsics": EXT,
            "intrinsics": [[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]],
            "distortion_model": None if distortion is None else "opencv",
            "distortion": distortion}  # fmt: skip


def at(ratio: float, depth: float = 10.0) -> tuple[float, float]:
    """Ego (x, y) of a point ``ratio`` = x_cam / z_cam to the right of the optical axis."""
    return 1.5 + depth, -ratio * depth


def test_barrel_distortion_shows_an_object_the_pinhole_model_puts_outside():
    x, y = at(0.9)  # pinhole: u = 800 + 900 = 1700 > width
    assert project_to_cameras(x, y, [camera()]) == (None, None)
    assert project_to_cameras(x, y, [camera([-0.2, 0.01, 0.001, -0.001, 0.0])]) == ("front", "right")


def test_pincushion_distortion_moves_an_object_from_the_centre_third_to_the_right():
    x, y = at(0.26)  # pinhole: u = 1060 < 2/3 of the width
    coeffs = [0.5, 0.05, 0.0005, 0.001, 0.01]
    assert project_to_cameras(x, y, [camera()]) == ("front", "centre")
    assert project_to_cameras(x, y, [camera(coeffs)]) == ("front", "right")
    uv, _ = project_points(np.array([[x, y, OBJECT_CENTRE_HEIGHT_M]]), camera()["intrinsics"], EXT,
                           "opencv", np.array(coeffs))  # fmt: skip
    assert uv[0, 0] >= 2 * W / 3  # the same pixel as the geometry module's projection


def test_a_point_folded_back_by_the_lens_model_is_not_in_the_image():
    x, y = at(1.8)  # far outside the field of view; k1 = -0.4 folds it back to u ~ 267
    cam = camera([-0.4, 0.0, 0.0, 0.0])
    uv, depth = project_points(np.array([[x, y, OBJECT_CENTRE_HEIGHT_M]]), cam["intrinsics"], EXT,
                               "opencv", np.array(cam["distortion"]))  # fmt: skip
    assert depth[0] > 0 and 0 <= uv[0, 0] < W  # the raw polynomial says "in the image" ...
    assert project_to_cameras(x, y, [cam]) == (None, None)  # ... grounding does not believe it


def test_object_facts_of_a_row_use_its_cameras_lens_model():
    x, y = at(0.9)
    row = {"cameras": [camera([-0.2, 0.01, 0.001, -0.001, 0.0])],
           "objects": [{"x": x, "y": y, "vx": 0.0, "vy": 0.0, "category": "car", "track_id": "t1"}]}  # fmt: skip
    (fact,) = object_facts(row, 5)
    assert (fact.camera, fact.image_part) == ("front", "right")
    assert "image: front camera, right part" in describe_fact(fact)
    row["cameras"] = [camera()]
    (fact,) = object_facts(row, 5)
    assert "not visible in the cameras shown" in describe_fact(fact)
