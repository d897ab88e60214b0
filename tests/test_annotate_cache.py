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


class _Disk:
    """A segment file handle that writes at most ``step`` bytes per call, optionally failing once."""

    def __init__(self, fh, step: int, fail_after: int | None = None) -> None:
        self.fh, self.step, self.fail_after = fh, step, fail_after

    def write(self, data) -> int:
        if self.fail_after is not None:
            self.fh.write(bytes(data[: self.fail_after]))
            raise OSError(28, "No space left on device")
        return self.fh.write(bytes(data[: self.step]))

    def fileno(self) -> int:
        return self.fh.fileno()

    def close(self) -> None:
        self.fh.close()


def test_partial_and_failed_writes_lose_no_committed_record(tmp_path):
    c = ResultCache(tmp_path)
    c._fh = _Disk(c._open(), step=7)  # short writes: every byte must still land
    c.append("short", {"status": "ok", "text": "x" * 100})
    first = c.segment
    c._fh = _Disk(c._fh.fh, step=7, fail_after=20)  # a full disk mid-line
    try:
        c.append("lost", {"status": "ok"})
    except OSError:
        pass
    else:
        raise AssertionError("the failed write must raise: the record is not done")
    c.append("after", {"status": "ok"})  # must not be glued to the torn fragment
    c.close()
    assert c.segment != first
    got, stats = ResultCache(tmp_path).load()
    assert set(got) == {"short", "after"} and got["short"]["text"] == "x" * 100
    assert stats.torn == 1 and stats.corrupt == 0
