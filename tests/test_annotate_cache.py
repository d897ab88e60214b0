"""Append-only result cache: crash leftovers ignored, several writers, first ok result wins."""

from __future__ import annotations

import asyncio
import json

from annotators.cache import ResultCache, encode_line


def test_append_load_and_precedence(tmp_path):
    a, b = ResultCache(tmp_path), ResultCache(tmp_path)  # two writers: two segments
    a.append("k1", {"status": "failed", "error": "ServerError: x"})
    b.append("k1", {"status": "ok", "n": 1})
    a.append("k1", {"status": "ok", "n": 2})
    b.append("k2", {"status": "failed", "error": "Timeout: y"})
    a.close(), b.close()
    assert a.segment != b.segment and len(list(tmp_path.glob("*.jsonl"))) == 2
    got, stats = ResultCache(tmp_path).load()
    assert got["k1"]["status"] == "ok" and got["k2"]["status"] == "failed"
    assert stats.duplicates == 1 and stats.corrupt == stats.torn == 0


def test_torn_and_corrupt_lines_are_ignored(tmp_path):
    c = ResultCache(tmp_path)
    c.append("good", {"status": "ok"})
    c.close()
    seg = next(tmp_path.glob("*.jsonl"))
    bad = json.loads(encode_line("evil", {"status": "ok"}))
    bad["v"]["status"] = "tampered"
    with open(seg, "ab") as fh:
        fh.write(json.dumps(bad).encode() + b"\n")
        fh.write(b"not json\n")
        fh.write(encode_line("torn", {"status": "ok"})[:-10])  # a crash mid-write
    got, stats = ResultCache(tmp_path).load()
    assert set(got) == {"good"} and stats.corrupt == 2 and stats.torn == 1


def test_async_group_commit(tmp_path):
    c = ResultCache(tmp_path)

    async def go():
        await asyncio.gather(*(c.commit(f"k{i}", {"status": "ok", "i": i}) for i in range(200)))

    asyncio.run(go())
    c.close()
    got, _ = ResultCache(tmp_path).load()
    assert len(got) == 200 and got["k7"]["i"] == 7


def test_missing_directory_loads_empty(tmp_path):
    got, stats = ResultCache(tmp_path / "nope").load()
    assert got == {} and stats.segments == 0
