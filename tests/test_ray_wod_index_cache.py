"""Issue 12: the WOD-E2E header index is reused across runs (cache keyed by file path, size and times)."""

from __future__ import annotations

import shutil

import pytest

from pipelines.sources import waymo_e2e
from pipelines.sources.waymo_e2e import index_file, index_file_cached


@pytest.fixture()
def files(sample_data, tmp_path):
    src = tmp_path / "wod"
    shutil.copytree(sample_data.waymo_e2e, src)
    return sorted(src.glob("training_*"))


def test_second_index_comes_from_the_cache(files, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = [index_file_cached(f, cache) for f in files]
    assert [x.frames for x in first] == [index_file(f).frames for f in files] and first[0].frames
    assert len(list(cache.glob("*.json"))) == len(files)

    def no_scan(path):
        raise AssertionError(f"{path} was scanned again")

    monkeypatch.setattr(waymo_e2e, "index_file", no_scan)
    again = [index_file_cached(f, cache) for f in files]
    assert [(x.frames, x.unnamed, x.error) for x in again] == [(x.frames, x.unnamed, x.error) for x in first]


def test_changed_or_corrupt_file_is_reindexed(files, tmp_path):
    cache = tmp_path / "cache"
    victim = files[0]
    good = index_file_cached(victim, cache)
    assert good.error is None
    data = bytearray(victim.read_bytes())
    victim.write_bytes(bytes(data[: len(data) - 7]))  # truncated in place
    bad = index_file_cached(victim, cache)
    assert bad.error is not None and "truncated" in str(bad.error)
    # the error survives the cache round trip with file, offset and cause
    again = index_file_cached(victim, cache)
    assert str(again.error) == str(bad.error) and again.frames == bad.frames


def test_unreadable_entry_is_ignored_and_rewritten(files, tmp_path, caplog):
    cache = tmp_path / "cache"
    ref = index_file_cached(files[0], cache)
    (entry,) = cache.glob("*.json")
    entry.write_text("{not json")
    assert index_file_cached(files[0], cache).frames == ref.frames
    assert "unreadable index cache entry" in caplog.text
    assert index_file_cached(files[0], cache).frames == ref.frames  # rewritten


def test_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DRIVEVLA_CACHE_DIR", "off")
    assert waymo_e2e.index_cache_dir() is None
