"""One writer per output: a lease that works on local, shared and object-store file systems.

Two ``annotate`` runs on one output would pay for most requests twice and
overwrite each other's partitions (the last writer wins, even with a failure
where the cache holds an answer). The command therefore holds a lease on the
output directory while it runs, and a second run is refused with a message
naming the holder.

The protocol needs no atomic rename, lock or conditional write, only what
every fsspec file system gives: write a whole small file, list a directory
(strongly consistent on local disks, NFS close-to-open and S3/GCS), delete.

1. A contender writes its own lease file ``<out>/_lease/<id>.json``
   (host, pid, start time, expiry).
2. It lists ``_lease/``. If it sees no other live lease it holds the lease
   and marks its file ``held``. Otherwise it deletes its file, and refuses at
   once if the other lease is ``held``; two contenders that saw each other
   both step back and retry after a random pause.

Two contenders cannot both win: whichever listed first did so before the other
wrote, so the other's listing sees the first one's file. A holder renews its
expiry from a background thread every ``ttl_s / 4``. A lease is stale (and
deleted by the next contender) when it has expired, or at once when it was
written on this machine by a process that no longer exists (a SIGKILLed run
can be resumed right away).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

log = logging.getLogger(__name__)
LEASE_DIR = "_lease"


class LeaseHeld(RuntimeError):
    """Another process holds (or is taking) the lease on this output."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The process start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _process_gone(info: dict[str, Any]) -> bool:
    """True when ``info`` was written on this machine (this boot) by a process that is gone."""
    if info.get("host") != socket.gethostname() or info.get("boot_id") != _boot_id():
        return False
    pid = int(info.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, someone else's
    start = info.get("pid_start") or ""
    return bool(start) and _pid_start(pid) not in ("", start)


@dataclass
class _Seen:
    path: str
    info: dict[str, Any] | None  # None: unreadable (being written)

    def describe(self) -> str:
        if self.info is None:
            return f"{self.path} (being written)"
        i = self.info
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(i.get("started", 0))))
        until = time.strftime("%H:%M:%S UTC", time.gmtime(float(i.get("expires", 0))))
        return f"host {i.get('host')} pid {i.get('pid')} since {since} (lease renewed until {until}; file {self.path})"


class OutputLease:
    """``with OutputLease(out_url): ...`` holds the lease on ``out_url`` or raises :class:`LeaseHeld`."""

    def __init__(
        self, url: str, ttl_s: float = 120.0, tries: int = 6, what: str = "annotate"
    ) -> None:
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.dir = f"{root.rstrip('/')}/{LEASE_DIR}"
        self.ttl_s = ttl_s
        self.tries = tries
        self.what = what
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
        self.id = f"{stamp}-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.path = f"{self.dir}/{self.id}.json"
        self._info: dict[str, Any] = {
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "boot_id": _boot_id(), "started": time.time(), "what": what, "held": False,
        }  # fmt: skip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # our file vanished while held (another run judged it stale)

    # ------------------------------------------------------------------ file ops

    def _write(self) -> None:
        self._info["expires"] = time.time() + self.ttl_s
        data = json.dumps(self._info).encode()
        try:
            self.fs.pipe_file(self.path, data)
        except FileNotFoundError:  # a finishing run removed the empty _lease/ meanwhile
            self.fs.makedirs(self.dir, exist_ok=True)
            self.fs.pipe_file(self.path, data)

    def _delete(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    def _others(self) -> list[_Seen]:
        """Live lease files other than ours; stale ones are deleted on the way."""
        self.fs.invalidate_cache(self.dir)
        try:
            names = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            names = []
        out = []
        now = time.time()
        for name in names:
            name = name.rstrip("/")
            if not name.endswith(".json") or name.split("/")[-1] == f"{self.id}.json":
                continue
            try:
                info = json.loads(self.fs.cat_file(name))
            except FileNotFoundError:
                continue  # deleted meanwhile
            except ValueError:
                info = None
            if info is None:
                try:  # a half-written file counts as a contender, unless it is old
                    mtime = self.fs.modified(name).timestamp()
                except (OSError, NotImplementedError, AttributeError):
                    mtime = now
                if now - mtime > self.ttl_s:
                    self._delete(name)
                    continue
            elif float(info.get("expires", 0)) < now or _process_gone(info):
                log.info("removing the stale lease %s of %s", name, _Seen(name, info).describe())
                self._delete(name)
                continue
            out.append(_Seen(name, info))
        return out

    # ------------------------------------------------------------------ protocol

    def acquire(self) -> OutputLease:
        self.fs.makedirs(self.dir, exist_ok=True)
        others: list[_Seen] = []
        for attempt in range(self.tries):
            self._write()
            others = self._others()
            if not others:
                self._info["held"] = True
                self._write()
                self._thread = threading.Thread(
                    target=self._renew, name=f"lease-{self.id}", daemon=True
                )
                self._thread.start()
                log.debug("lease %s taken on %s", self.id, self.url)
                return self
            self._delete(self.path)
            if any(o.info and o.info.get("held") for o in others):
                break
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))  # two contenders: both step back
        raise LeaseHeld(
            f"another {self.what} run is writing to {self.url}: "
            + "; ".join(o.describe() for o in others)
            + ". Two runs on one output would send requests twice and overwrite each other's "
            "partitions. Wait for that run to finish (this command then resumes where it stopped); "
            f"if its process died on another machine, its lease expires at the time shown "
            f"(or delete that file under {LEASE_DIR}/)."
        )

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.fs.invalidate_cache(self.dir)
                if not self.fs.exists(self.path):
                    self.lost = True
                    log.error(
                        "the lease %s on %s was removed by another run (it judged it stale); "
                        "check that only one run writes to this output",
                        self.path, self.url,
                    )  # fmt: skip
                self._write()
            except Exception as exc:  # keep renewing; one failed write is not fatal
                log.warning("could not renew the lease %s: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._delete(self.path)
        try:  # leave no empty _lease/ behind (object stores have no directories to remove)
            if not self.fs.ls(self.dir, detail=False):
                self.fs.rmdir(self.dir)
        except (OSError, NotImplementedError):
            pass  # another contender's file is there, or the directory is already gone

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
