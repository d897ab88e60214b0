"""Bench2Drive bad input: per-sample reasons naming the file, everything else extracted, counts add up."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile

import pytest
from _extract_util import assert_counts_add_up, extract, failures

from pipelines.config import ConfigError
from pipelines.sources import SourceError, get_source_class

A = "NonSignalizedJunctionLeftTurn/Town03_Route100_Weather0"
B = "ParkedObstacle/Town05_Route107_Weather3"


def _edit(path, **changes):
    anno = json.loads(gzip.decompress(path.read_bytes()))
    anno.update(changes)
    path.write_bytes(gzip.compress(json.dumps(anno).encode()))


def test_missing_frame_corrupt_gzip_none_speed_short_clip_bad_archive(sample_data, tmp_path):
    root = shutil.copytree(sample_data.bench2drive, tmp_path / "b2d")
    base, base_rows = extract("bench2drive", sample_data.bench2drive, tmp_path / "base")
    # 1) clip A: frame 75 missing -> the samples at 25 (25..75) and 30 (30..80) fail, 20 is written
    (root / A / "anno" / "00075.json.gz").unlink()
    # 2) clip B: frame 0 is not gzip -> the sample at 20 (0..70) fails
    (root / B / "anno" / "00000.json.gz").write_bytes(b"this is not gzip")
    # 3) clip B: speed and compass None at 25 -> still written, same values (pose from world2ego)
    _edit(root / B / "anno" / "00025.json.gz", speed=None, theta=None)
    # 4) clip B: speed None at 30 and its neighbour 31 gone -> no velocity at all for 30
    _edit(root / B / "anno" / "00030.json.gz", speed=None)
    (root / B / "anno" / "00031.json.gz").unlink()
    # 5) clip C (a copy of A): a back-camera frame of the sample at 20 is missing
    shutil.copytree(sample_data.bench2drive / A, root / "Accident" / "Town03_Route156_Weather0")
    (root / "Accident" / "Town03_Route156_Weather0" / "camera" / "rgb_back" / "00005.jpg").unlink()
    # 6) a clip of 30 frames (3 s): shorter than 2 s history + 5 s future
    short = root / "HardBreakRoute" / "Town01_Route30_Weather3"
    shutil.copytree(sample_data.bench2drive / A, short)
    for p in short.rglob("000[3-9]?.*"):
        p.unlink()
    # 7) a released archive cut short
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(sample_data.bench2drive / B, arcname="Broken_Town02_Route1_Weather1")
    (root / "Broken_Town02_Route1_Weather1.tar.gz").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    summary, rows = extract("bench2drive", root, tmp_path / "out")
    assert_counts_add_up(summary)
    assert summary.written == 4
    assert summary.dropped == {"clip_too_short": 1, "window_too_short": 30}
    assert summary.failed == {"ArchiveError": 1, "CorruptAnnotation": 1, "ImageError": 1, "MissingFrame": 2,
                              "NoKinematics": 1}  # fmt: skip
    assert summary.seen == base.seen + 13 + 1 + 1  # clip C's 13 candidates, the short clip, the archive
    by_class: dict[str, list[dict]] = {}
    for f in failures(summary):
        by_class.setdefault(f["error_class"], []).append(f)
    a, b = "NonSignalizedJunctionLeftTurn_Town03_Route100_Weather0", "ParkedObstacle_Town05_Route107_Weather3"
    assert sorted(f["sample_id"] for f in by_class["MissingFrame"]) == [f"bench2drive/{a}/00025", f"bench2drive/{a}/00030"]
    assert all(f"{A}/anno/00075.json.gz" in f["message"] and f["file"] == f"{A}/anno/00075.json.gz"
               for f in by_class["MissingFrame"])  # fmt: skip
    (bad,) = by_class["CorruptAnnotation"]
    assert bad["sample_id"] == f"bench2drive/{b}/00020" and "gzip" in bad["message"] and "00000" in bad["file"]
    (nokin,) = by_class["NoKinematics"]
    assert nokin["sample_id"] == f"bench2drive/{b}/00030"
    (img,) = by_class["ImageError"]
    assert img["sample_id"].endswith("Accident_Town03_Route156_Weather0/00020") and "rgb_back/00005.jpg" in img["file"]
    (arc,) = by_class["ArchiveError"]
    assert arc["sample_id"] is None and arc["file"] == "Broken_Town02_Route1_Weather1.tar.gz"
    written = {r["sample_id"]: r for r in rows}
    base_by_id = {r["sample_id"]: r for r in base_rows}
    assert set(written) == {f"bench2drive/{a}/00020", f"bench2drive/{b}/00025",
                            "bench2drive/Accident_Town03_Route156_Weather0/00025",
                            "bench2drive/Accident_Town03_Route156_Weather0/00030"}  # fmt: skip
    none_speed = written[f"bench2drive/{b}/00025"]
    assert none_speed["velocity"] == base_by_id[f"bench2drive/{b}/00025"]["velocity"]
    assert none_speed["future"] == base_by_id[f"bench2drive/{b}/00025"]["future"]


def test_bad_paths_and_options_fail_before_any_work(tmp_path):
    from _extract_util import extract_config

    cls = get_source_class("bench2drive")
    with pytest.raises(SourceError, match="does not exist"):
        cls(extract_config("bench2drive", tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="command_map"):
        cls(extract_config("bench2drive", tmp_path, ("options.command_map.LEFT=sideways",)))
    with pytest.raises(ConfigError, match="frame_rate_hz"):
        cls(extract_config("bench2drive", tmp_path, ("options.frame_rate_hz=7",)))
    with pytest.raises(SourceError, match="side_left"):
        cls(extract_config("bench2drive", tmp_path, ("cameras=[front,side_left]",)))


def test_split_file_assigns_clips_and_rejects_unknown_splits(sample_data, tmp_path):
    from _extract_util import extract_config

    root = shutil.copytree(sample_data.bench2drive, tmp_path / "b2d")
    split_file = root / "bench2drive_base_train_val_split.json"
    split_file.write_text(json.dumps({"train": [], "val": ["v1/ParkedObstacle_Town05_Route107_Weather3"]}))
    units = get_source_class("bench2drive")(extract_config("bench2drive", root)).work_units()
    assert {u.payload["clip"]: u.split for u in units} == {
        "NonSignalizedJunctionLeftTurn_Town03_Route100_Weather0": "train",  # not listed: default_split
        "ParkedObstacle_Town05_Route107_Weather3": "val",
    }
    only_val = get_source_class("bench2drive")(extract_config("bench2drive", root, ("splits=[val]",)))
    assert [u.split for u in only_val.work_units()] == ["val"]
    split_file.write_text(json.dumps({"holdout": ["x"]}))
    with pytest.raises(SourceError, match="holdout"):
        get_source_class("bench2drive")(extract_config("bench2drive", root)).work_units()
