"""Reading Bench2Drive clips with fsspec: clip directories or the released ``.tar.gz`` archives.

A *clip* is a directory holding ``anno/NNNNN.json.gz`` and
``camera/rgb_<camera>/NNNNN.jpg`` (Bench2Drive ``docs/anno.md``). It is found
either as a directory (``<root>/<Scenario>/<Town>_Route<N>_Weather<N>/``, or
the release's ``<root>/[v1/]<Scenario>_<Town>_Route<N>_Weather<N>/``) or as
one released archive per clip (``<Scenario>_<Town>_Route<N>_Weather<N>.tar.gz``,
see Bench2Drive ``docs/bench2drive_mini_10.json``). Archives are streamed
(``tarfile`` mode ``r|*``) through ``fsspec.open``, never unpacked to disk;
only the annotations and the RGB frames of the configured cameras are kept,
as compressed bytes, for the duration of one clip. Local paths and object
storage (``s3://``, ``gs://``, ``memory://``...) take the same code path.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, Final

from fsspec.implementations.local import LocalFileSystem

from pipelines.io.fs import url_to_fs
from pipelines.io.images import ImageError

ARCHIVE_SUFFIXES: Final = (".tar.gz", ".tgz", ".tar")
MAX_DEPTH: Final = 3  # clip directories are looked for at most this deep under the root
_ANNO = re.compile(r"(?:^|/)anno/(\d+)\.json\.gz$")
_IMAGE = re.compile(r"(?:^|/)camera/(rgb_[a-z_]+)/(\d+)\.jpg$")


class ArchiveError(OSError):
    """A clip archive cannot be read to its end (truncated, not a tar, bad compression)."""


def open_root(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and the protocol-less root path of ``url``."""
    fs, path = url_to_fs(url)  # the project's one filesystem layer (pipelines/io/fs.py)
    return fs, path.rstrip("/") or path


def clip_name(rel: str) -> str:
    """A clip's name from its path relative to the root: archive suffix dropped, ``/`` -> ``_``.

    ``Accident/Town03_Route156_Weather0`` (docs layout) and
    ``Accident_Town03_Route156_Weather0.tar.gz`` (release) name the same clip.
    """
    for suffix in ARCHIVE_SUFFIXES:
        if rel.endswith(suffix):
            rel = rel[: -len(suffix)]
            break
    parts = [p for p in rel.split("/") if p]
    if parts and parts[0] == "v1" and len(parts) > 1:  # Bench2DriveZoo keeps Base under v1/
        parts = parts[1:]
    return "_".join(parts) or "clip"


def find_clips(fs: Any, root: str) -> list[tuple[str, str]]:
    """``(kind, path relative to root)`` of every clip under ``root``: ``dir`` or ``tar``, sorted.

    ``root`` itself may be one clip directory or one archive.
    """
    if fs.isfile(root):
        if root.endswith(ARCHIVE_SUFFIXES):
            return [("tar", "")]
        return []
    found: list[tuple[str, str]] = []
    level = [root]
    for _ in range(MAX_DEPTH + 1):  # level by level: a clip directory is listed, never descended into
        nxt = []
        for d in level:
            entries = fs.ls(d, detail=True)
            names = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}
            if names.get("anno", {}).get("type") == "directory":
                found.append(("dir", _rel(root, d)))
                continue
            for e in entries:
                name = e["name"].rstrip("/")
                if e["type"] == "directory":
                    nxt.append(name)
                elif name.endswith(ARCHIVE_SUFFIXES):
                    found.append(("tar", _rel(root, name)))
        level = sorted(nxt)
    return sorted(found, key=lambda kp: kp[1])


def _rel(root: str, path: str) -> str:
    return path[len(root) :].strip("/") if path.startswith(root) else path


@dataclass
class ClipFiles:
    """The frame files of one clip: annotation and image bytes loaded on demand.

    ``anno_index`` lists the annotation frame indices present; ``anno(i)`` and
    ``image(dir, i)`` return bytes or raise ``FileNotFoundError`` / ``ImageError``.
    ``rel`` is the clip's path for messages.
    """

    fs: Any
    base: str  # clip directory (dir) or archive path (tar)
    rel: str
    kind: str
    anno_index: list[int]
    _annos: dict[int, bytes] | None = None
    _images: dict[tuple[str, int], bytes] | None = None

    @classmethod
    def open(cls, fs: Any, root: str, kind: str, rel: str, image_dirs: set[str]) -> ClipFiles:
        base = f"{root}/{rel}" if rel else root
        if kind == "dir":
            index = []
            for p in fs.glob(f"{base}/anno/*.json.gz"):
                m = _ANNO.search(p)
                if m:
                    index.append(int(m.group(1)))
            return cls(fs, base, rel or base.rsplit("/", 1)[-1], kind, sorted(index))
        annos, images = _read_archive(fs, base, image_dirs, rel or base)
        return cls(fs, base, rel or base.rsplit("/", 1)[-1], kind, sorted(annos), annos, images)

    def anno_path(self, i: int) -> str:
        """The annotation file of frame ``i`` as reported in messages (relative to the input root)."""
        name = f"anno/{i:05d}.json.gz"
        return f"{self.rel}!{name}" if self.kind == "tar" else f"{self.rel}/{name}"

    def image_path(self, image_dir: str, i: int) -> str:
        name = f"camera/{image_dir}/{i:05d}.jpg"
        return f"{self.rel}!{name}" if self.kind == "tar" else f"{self.rel}/{name}"

    def anno(self, i: int) -> bytes:
        if self._annos is not None:
            if i not in self._annos:
                raise FileNotFoundError(f"{self.anno_path(i)}: not in the archive")
            return self._annos[i]
        return self._read(f"{self.base}/anno/{i:05d}.json.gz")

    def _read(self, path: str) -> bytes:
        if isinstance(self.fs, LocalFileSystem):  # same bytes without fsspec's per-call path handling
            with open(path, "rb") as fh:
                return fh.read()
        return self.fs.cat_file(path)

    def image(self, image_dir: str, i: int) -> bytes:
        where = self.image_path(image_dir, i)
        if self._images is not None:
            data = self._images.get((image_dir, i))
            if data is None:
                raise ImageError(f"{where}: cannot read camera image (not in the archive)")
            return data
        try:
            return self._read(f"{self.base}/camera/{image_dir}/{i:05d}.jpg")
        except (OSError, ValueError) as exc:
            raise ImageError(f"{where}: cannot read camera image ({getattr(exc, 'strerror', None) or exc})") from None


def _read_archive(
    fs: Any, path: str, image_dirs: set[str], rel: str
) -> tuple[dict[int, bytes], dict[tuple[str, int], bytes]]:
    """One streaming pass over an archive: annotations and the wanted RGB frames, as bytes."""
    annos: dict[int, bytes] = {}
    images: dict[tuple[str, int], bytes] = {}
    try:
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                m = _ANNO.search(member.name)
                if m:
                    annos[int(m.group(1))] = _member_bytes(tar, member)
                    continue
                m = _IMAGE.search(member.name)
                if m and m.group(1) in image_dirs:
                    images[(m.group(1), int(m.group(2)))] = _member_bytes(tar, member)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ArchiveError(f"{rel}: cannot read the archive ({type(exc).__name__}: {exc})") from None
    return annos, images


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tar.extractfile(member)
    if fh is None:
        raise tarfile.ReadError(f"{member.name}: not a regular file")
    return fh.read()
