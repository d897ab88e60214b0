"""Bad input is reported (file and reason), everything else is still extracted, counts add up."""

from __future__ import annotations

import math
import os
import pickle
import shutil
import struct

import pytest
from _extract_util import assert_counts_add_up, extract, extract_config, failures

from pipelines.config import ConfigError
from pipelines.io.safe_pickle import safe_load
from pipelines.sources import SourceError, get_source_class
from pipelines.stages.extract import ExtractStage


@pytest.fixture(scope="module")
def waymo_baseline(sample_data, tmp_path_factory):
    return extract("waymo_e2e", sample_data.waymo_e2e, tmp_path_factory.mktemp("wb"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_tfrecord(sample_data, waymo_baseline, tmp_path):
    data = _copy(sample_data.waymo_e2e, tmp_path / "waymo")
    victim = sorted(data.glob("training_*"))[0]
    os.truncate(victim, victim.stat().st_size - 100)
    summary, rows = extract("waymo_e2e", data, tmp_path / "out")
    assert_counts_add_up(summary)
    base, base_rows = waymo_baseline
    assert summary.seen == base.seen  # the cut record is counted as a failure
    assert summary.failed == {"TFRecordError": 1}
    (fail,) = failures(summary)
    assert (
        fail["file"] == victim.name
        and "truncated" in fail["message"]
        and victim.name in fail["message"]
    )
    assert 0 < len(base_rows) - len(rows) <= 3  # the lost frame and the clips that needed it
    assert {r["sample_id"] for r in rows} < {r["sample_id"] for r in base_rows}


def test_crc_mismatch_in_tfrecord(sample_data, waymo_baseline, tmp_path):
    data = _copy(sample_data.waymo_e2e, tmp_path / "waymo")
    victim = sorted(data.glob("validation_*"))[0]
    blob = bytearray(victim.read_bytes())
    (length,) = struct.unpack("<Q", blob[:8])
    blob[12 + length - 200] ^= 0xFF  # inside the first record's data (its images), not its name
    victim.write_bytes(bytes(blob))
    summary, rows = extract("waymo_e2e", data, tmp_path / "out")
    assert_counts_add_up(summary)
    base, base_rows = waymo_baseline
    assert summary.seen == base.seen
    fails = failures(summary)
    assert fails and set(summary.failed) == {"TFRecordError"}
    assert all(f["file"] == victim.name and "CRC mismatch" in f["message"] for f in fails)
    assert len(rows) + len(fails) == len(base_rows)  # exactly the samples that need the bad frame


def _nuplan_copy(sample_data, tmp_path):
    root = _copy(sample_data.nuplan, tmp_path / "nuplan")
    logs = sorted((root / "navsim_logs").glob("*/*.pkl"))
    return root, logs


def test_nuplan_missing_image_nan_pose_short_log_and_hostile_pickle(sample_data, tmp_path):
    root, logs = _nuplan_copy(sample_data, tmp_path)
    split_dir = logs[0].parent
    # 1) a missing camera image: frame 10 of log 0 is in the clips of current frames 10..13
    frames0 = safe_load(logs[0])
    rel = frames0[10]["cams"]["CAM_F0"]["data_path"]
    (root / "sensor_blobs" / split_dir.name / rel).unlink()
    # 2) a NaN pose at frame 20 of log 1: in the windows of current frames 10..19
    frames1 = safe_load(logs[1])
    frames1[20]["ego2global_translation"][0] = math.nan
    logs[1].write_bytes(pickle.dumps(frames1, protocol=4))
    # 3) a log too short for 4 + 1 + 10 frames
    (split_dir / "short_log.pkl").write_bytes(pickle.dumps(frames0[:10], protocol=4))

    # 4) a pickle that would run a command
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (split_dir / "evil_log.pkl").write_bytes(pickle.dumps([Evil()]))

    summary, rows = extract("nuplan", root, tmp_path / "out")
    assert_counts_add_up(summary)
    n0, n1 = len(frames0), len(frames1)
    assert summary.seen == n0 + n1 + 10 + 1
    assert summary.failed == {"ImageError": 4, "InvalidPose": 10, "UnpicklingError": 1}
    by_class = {}
    for f in failures(summary):
        by_class.setdefault(f["error_class"], []).append(f)
    img = by_class["ImageError"]
    assert all(rel in f["message"] and f["file"].endswith(rel) for f in img)
    assert all(
        logs[1].name in f["message"] and frames1[20]["token"] in f["message"]
        for f in by_class["InvalidPose"]
    )
    (evil,) = by_class["UnpicklingError"]
    assert (
        "evil_log.pkl" in evil["message"]
        and "system" in evil["message"]
        and evil["file"].endswith("evil_log.pkl")
    )
    # One outcome per frame (issue 14 item 9): the first num_history_frames - 1 = 4 frames of each log are
    # history only; the last num_future_frames = 10 frames (6 in the 10-frame log) have no full window.
    assert summary.dropped["before_first_window"] == 4 + 4 + 4
    assert summary.dropped["window_too_short"] == 10 + 10 + 6
    assert len(rows) == (n0 - 14 - 4) + (n1 - 14 - 10)


def test_nuscenes_scene_too_short_for_history_and_future(sample_data, tmp_path):
    summary, rows = extract(
        "nuscenes", sample_data.nuscenes, tmp_path / "out", ("history=12", "clip.frames=2")
    )
    assert_counts_add_up(summary)
    n = summary.seen // 2  # 2 scenes of n keyframes
    assert summary.dropped == {"insufficient_history": 2 * 12, "insufficient_future": 2 * 10}
    assert len(rows) == 2 * (n - 22)


def test_missing_input_and_bad_config_fail_before_work(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        ExtractStage(extract_config("nuplan", tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="unknown key"):
        extract_config("nuplan", tmp_path, ("clip.fps=3",))
    with pytest.raises(ConfigError, match="not valid YAML"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("dataset: [nuplan\n")
        from pipelines.config import load_config
        from pipelines.sources.base import ExtractConfig

        load_config(ExtractConfig, bad)
    with pytest.raises(KeyError, match="valid: \\['bench2drive', 'nuplan', 'nuscenes', 'waymo_e2e'\\]"):
        get_source_class("carla")


def test_cli_reports_bad_input_path(tmp_path):
    from pipelines.cli import main

    rc = main(
        [
            "extract",
            "--dataset",
            "waymo_e2e",
            "--input",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and not (tmp_path / "o" / "extract").exists()


def test_waymo_history_beyond_past_states_fails_before_work(sample_data):
    with pytest.raises(SourceError, match="history=8 .* at most 7"):
        ExtractStage(extract_config("waymo_e2e", sample_data.waymo_e2e, ("history=8",)))


def test_clip_frame_of_another_size_names_its_file():
    import numpy as np

    from pipelines.io.images import ImageError, StoredImage
    from pipelines.sources.base import make_clip

    frames = [(StoredImage(b"", 56, 28, 1600, 900), 0), (StoredImage(b"", 56, 28, 800, 450), 1)]
    with pytest.raises(ImageError, match=r"^samples/CAM_FRONT/b\.jpg: front image is 800x450"):
        make_clip(
            "front",
            frames,
            np.eye(3),
            (1600, 900),
            np.eye(4),
            ["samples/CAM_FRONT/a.jpg", "samples/CAM_FRONT/b.jpg"],
        )
