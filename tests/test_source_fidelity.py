"""WOD-E2E and nuScenes fidelity and silent-loss checks (issue 14 items 3, 4, 6, 7, 8)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from _extract_util import assert_counts_add_up, extract, extract_config, gt_frame_key

from pipelines.io.tfrecord import iter_records, write_records
from pipelines.sources import SourceError, make_source
from pipelines.sources.base import WorkUnit
from pipelines.sources.nuscenes import central_difference
from pipelines.sources.waymo_e2e import FUTURE_STATES, PAST_STATES, _SegmentReader, track_headings
from pipelines.stages.extract import ExtractStage

DT = 0.25  # WOD-E2E states are 4 Hz
TIMES = np.arange(-(PAST_STATES - 1), FUTURE_STATES + 1) * DT  # -3.75 .. 5.0 s, t0 at PAST_STATES - 1


# --------------------------------------------------------------------------- WOD-E2E reversing (item 3)


def _reversing_arc(speed: float, yaw_rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A car reversing at ``speed`` while its body turns at ``yaw_rate``: positions, velocities, headings."""
    yaw = yaw_rate * TIMES
    if yaw_rate == 0.0:
        xy = np.column_stack([-speed * TIMES, np.zeros_like(TIMES)])
    else:
        r = speed / yaw_rate
        xy = -r * np.column_stack([np.sin(yaw), 1.0 - np.cos(yaw)])
    vel = -speed * np.column_stack([np.cos(yaw), np.sin(yaw)])
    return xy, vel, yaw


@pytest.mark.parametrize("yaw_rate", [0.0, 0.3, -0.2])
@pytest.mark.parametrize("use_velocity", [True, False])
def test_reversing_car_keeps_its_heading(yaw_rate, use_velocity):
    """A car reversing at 2 m/s with yaw 0 has heading 0, not pi (the direction of motion is h + pi)."""
    xy, vel, yaw = _reversing_arc(2.0, yaw_rate)
    heads = track_headings(xy, PAST_STATES - 1, 0.2, vel if use_velocity else None)
    err = np.angle(np.exp(1j * (heads - yaw)))
    assert np.abs(err).max() < (1e-9 if use_velocity else 0.02), err


def test_stop_and_go_from_reversing_to_forward():
    """Reversing in the past, forward in the future (a parking manoeuvre): the body never turns round."""
    accel = 1.0
    vel = np.column_stack([accel * TIMES, np.zeros_like(TIMES)])
    xy = np.column_stack([0.5 * accel * TIMES**2, np.zeros_like(TIMES)])  # x(t) = a t^2 / 2: v = a t
    for v in (vel, None):
        heads = track_headings(xy, PAST_STATES - 1, 0.2, v)
        assert np.abs(np.angle(np.exp(1j * heads))).max() < 1e-9


def _e2ed_frame(xy: np.ndarray, vel: np.ndarray, intent_raw: int | None = None) -> object:
    from waymo_open_dataset.protos import end_to_end_driving_data_pb2 as e2e_pb2

    frame = e2e_pb2.E2EDFrame()
    frame.frame.context.name = "seg-010"
    for states, sl in ((frame.past_states, slice(0, PAST_STATES)), (frame.future_states, slice(PAST_STATES, None))):
        states.pos_x.extend(xy[sl, 0])
        states.pos_y.extend(xy[sl, 1])
        states.vel_x.extend(vel[sl, 0])
        states.vel_y.extend(vel[sl, 1])
        states.accel_x.extend(np.zeros(len(xy[sl])))
        states.accel_y.extend(np.zeros(len(xy[sl])))
    if intent_raw is None:
        return frame
    number = frame.DESCRIPTOR.fields_by_name["intent"].number
    parsed = e2e_pb2.E2EDFrame()
    parsed.ParseFromString(frame.SerializeToString() + bytes([number << 3, intent_raw]))
    return parsed


@pytest.fixture(scope="module")
def waymo_reader(sample_data):
    src = make_source(extract_config("waymo_e2e", sample_data.waymo_e2e))
    return _SegmentReader(src, WorkUnit("train/seg", "train", {"segment": "seg", "frames": []}))


def test_waymo_source_reversing_frame_has_heading_zero(waymo_reader):
    xy, vel, _ = _reversing_arc(2.0, 0.0)
    out = waymo_reader._trajectories(_e2ed_frame(xy, vel), "waymo_e2e/seg/010", "f.tfrecord")
    assert isinstance(out, dict)
    np.testing.assert_allclose(out["history"][:, 2], 0.0, atol=1e-9)
    np.testing.assert_allclose(out["future"][:, 2], 0.0, atol=1e-9)
    assert out["future"][-1][0] < -9.0  # 5 s at 2 m/s backwards
    assert out["velocity_source"] == "dataset"


# --------------------------------------------------------------------------- WOD-E2E intent (item 8)


def test_waymo_intent_outside_the_enum_is_counted(sample_data, tmp_path, waymo_reader):
    xy, vel, _ = _reversing_arc(2.0, 0.0)
    assert waymo_reader._command(_e2ed_frame(xy, vel, intent_raw=9), "sid") == "unknown"
    assert waymo_reader.notes["intent_value_not_in_enum"] == 1
    # End to end: a validation file whose frames carry an intent value this proto does not know.
    root = tmp_path / "waymo"
    shutil.copytree(sample_data.waymo_e2e, root)
    (path,) = root.glob("validation_*")
    from waymo_open_dataset.protos import end_to_end_driving_data_pb2 as e2e_pb2

    number = e2e_pb2.E2EDFrame.DESCRIPTOR.fields_by_name["intent"].number
    records = []
    for _, data in iter_records(path):
        msg = e2e_pb2.E2EDFrame()
        msg.ParseFromString(data)
        msg.ClearField("intent")
        records.append(msg.SerializeToString() + bytes([number << 3, 9]))
    write_records(path, records)
    summary, rows = extract("waymo_e2e", root, tmp_path / "out", ("splits=[val]",))
    assert_counts_add_up(summary)
    assert rows and all(r["command"] == "unknown" for r in rows)
    assert summary.noted == {"intent_value_not_in_enum": len(rows)}
    assert "noted    intent_value_not_in_enum" in summary.format()


# --------------------------------------------------------------------------- input globs (item 6)


def test_cli_exits_nonzero_when_no_input_file_matches(sample_data, tmp_path, caplog):
    from pipelines.cli import main

    src = tmp_path / "wod"
    src.mkdir()
    for p in sample_data.waymo_e2e.glob("training_*"):  # renamed as a mirror might: train_ not training_
        shutil.copy(p, src / p.name.replace("training_", "train_"))
    with caplog.at_level(logging.ERROR):
        rc = main(["extract", "--dataset", "waymo_e2e", "--input", str(src), "--out", str(tmp_path / "o"), "--engine", "local"])
    assert rc != 0
    msg = caplog.text
    assert "training_*.tfrecord*" in msg and "validation_*.tfrecord*" in msg  # the globs tried
    assert "train_0000.tfrecord-00000-of-00002" in msg  # what the directory holds
    assert not (tmp_path / "o" / "extract").exists()
    # A split without files next to one with files still only warns.
    make_source(extract_config("waymo_e2e", sample_data.waymo_e2e, ("options.files.test=[nothing*]",)))


# --------------------------------------------------------------------------- nuScenes velocity (item 4)


def test_central_difference_is_exact_for_braking_and_unbiased_on_arcs():
    t = np.array([0.0, 0.5, 1.0])
    # braking from 10 m/s at 2 m/s^2: x = 10 t - t^2; the middle point's velocity is 9 m/s
    x = 10 * t - t**2
    vel, acc = central_difference(t, np.column_stack([x, np.zeros(3)]))
    np.testing.assert_allclose(vel, [9.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(acc, [-2.0, 0.0], atol=1e-12)
    backward = (x[1] - x[0]) / 0.5
    assert backward - 9.0 == pytest.approx(0.5)  # the lag of the former backward difference
    # unequal steps (a keyframe 50 ms late) stay exact for constant acceleration
    t2 = np.array([0.0, 0.55, 1.0])
    x2 = 10 * t2 - t2**2
    vel2, _ = central_difference(t2, np.column_stack([x2, np.zeros(3)]))
    assert vel2[0] == pytest.approx(10 - 2 * 0.55)
    # steady arc, 10 m/s on R = 30 m: no lateral bias at the middle point
    w = 10 / 30
    ang = w * t
    xy = 30 * np.column_stack([np.sin(ang), 1 - np.cos(ang)])
    vel3, _ = central_difference(t, xy)
    tangent = np.array([np.cos(ang[1]), np.sin(ang[1])])
    lateral = float(np.cross(tangent, vel3))
    assert abs(lateral) < 1e-9 and float(tangent @ vel3) == pytest.approx(10.0, rel=0.01)


def test_nuscenes_without_can_bus_uses_central_differences(sample_data, tmp_path):
    summary, rows = extract("nuscenes", sample_data.nuscenes, tmp_path / "out", ("options.velocity_source=poses",))
    assert_counts_add_up(summary)
    assert rows and all(r["velocity_source"] == "pose_central_difference" for r in rows)
    assert summary.noted["velocity_from_poses"] == len(rows)
    gt = {r["frame"]: r for r in sample_data.ground_truth_records() if r["dataset"] == "nuscenes"}
    errs = []
    for r in rows:
        g = gt[gt_frame_key(r)]
        c, s = np.cos(g["yaw"]), np.sin(g["yaw"])
        want = [c * g["vx"] + s * g["vy"], -s * g["vx"] + c * g["vy"]]
        errs.append(np.hypot(*(np.asarray(r["velocity"]) - want)))
    # The former backward difference gave mean 0.198 / max 0.655 m/s here (it lags half a step).
    assert np.mean(errs) < 0.1 and max(errs) < 0.35, (np.mean(errs), max(errs))
    _, can_rows = extract("nuscenes", sample_data.nuscenes, tmp_path / "can")
    assert can_rows and all(r["velocity_source"] == "can_bus" for r in can_rows)


# --------------------------------------------------------------------------- nuScenes objects (item 7)


def _single_annotation_copy(sample_data, tmp_path):
    """A dataroot copy where one mid-scene annotation is an object annotated only once."""
    root = tmp_path / "nusc"
    shutil.copytree(sample_data.nuscenes, root)
    tables = root / sample_data.nuscenes_version
    anns = json.loads((tables / "sample_annotation.json").read_text())
    insts = json.loads((tables / "instance.json").read_text())
    samples = json.loads((tables / "sample.json").read_text())
    by_tok = {a["token"]: a for a in anns}
    order = {}
    for s in samples:  # keyframe index within its scene
        k, prev = 0, s
        while prev["prev"]:
            prev = next(x for x in samples if x["token"] == prev["prev"])
            k += 1
        order[s["token"]] = k
    target = next(a for a in anns if a["prev"] and a["next"] and 6 <= order[a["sample_token"]] <= 10)
    by_tok[target["prev"]]["next"] = ""
    by_tok[target["next"]]["prev"] = ""
    old = next(i for i in insts if i["token"] == target["instance_token"])
    new_inst = dict(old, token="f" * 32, first_annotation_token=target["token"], last_annotation_token=target["token"], nbr_annotations=1)
    insts.append(new_inst)
    target.update(prev="", next="", instance_token=new_inst["token"])
    (tables / "sample_annotation.json").write_text(json.dumps(anns))
    (tables / "instance.json").write_text(json.dumps(insts))
    return root, target


def test_nuscenes_single_annotation_object_kept_with_unknown_velocity(sample_data, tmp_path):
    root, target = _single_annotation_copy(sample_data, tmp_path)
    summary, rows = extract("nuscenes", root, tmp_path / "out")
    assert_counts_add_up(summary)
    row = next(r for r in rows if r["sample_id"].endswith(target["sample_token"]))
    obj = next(o for o in row["objects"] if o["track_id"] == "f" * 32)
    assert obj["vx"] is None and obj["vy"] is None and obj["length"] > 0
    assert summary.noted["objects_velocity_unknown"] == 1
    assert "noted    objects_velocity_unknown" in summary.format()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["noted"]["objects_velocity_unknown"] == 1
    # The collision reward treats the unknown velocity as static rather than raising.
    from training.rewards.trajectory import object_boxes

    boxes = object_boxes([obj], np.array([0.0, 1.0]))
    np.testing.assert_allclose(boxes[0, 0], boxes[0, 1])


# --------------------------------------------------------------------------- nuScenes dataroot (item 8)


@pytest.mark.parametrize(
    ("remove", "named"),
    [("visibility.json", "visibility.json"), ("attribute.json", "attribute.json"), ("map", "maps/")],
)
def test_incomplete_nuscenes_dataroot_named_before_work(sample_data, tmp_path, remove, named):
    root = tmp_path / "nusc"
    shutil.copytree(sample_data.nuscenes, root, ignore=shutil.ignore_patterns("samples", "sweeps"))
    tables = root / sample_data.nuscenes_version
    if remove == "map":
        next((root / "maps").glob("*.png")).unlink()
    else:
        (tables / remove).unlink()
    with pytest.raises(SourceError, match=named):
        ExtractStage(extract_config("nuscenes", root))
