"""Upload a built dataset (shards, card, plots) to the Hugging Face Hub (DESIGN.md section 8).

* The token comes from the caller or ``huggingface_hub``'s standard lookup
  (``HF_TOKEN``, then the token saved by ``hf auth login``), and is never logged.
* Repositories are private unless asked otherwise; a ``revision`` branch that
  does not exist yet is created (from the default branch, as the Hub does).
* The codebook (``codebook/codebook.safetensors`` + ``codebook/codebook.json``)
  travels with the dataset: without it the action tokens cannot be decoded.
  It must be the one the build was made with (its ``tensors_sha256`` is
  checked against the build's ``stats.json``).
* Resumable: the remote tree is listed first and files already there with the
  same content (LFS sha256, or git blob id for small files) are not sent
  again; the rest goes in ``create_commit`` calls of bounded size, so an
  interrupted push keeps every finished commit (``upload_folder`` makes one
  commit of everything and ``upload_large_folder`` neither orders the card
  last nor deletes stale shards, so neither fits here). ``manifest.json`` goes in the first commit,
  ``README.md`` (the card) in the last, so a complete card means a complete
  upload. The last commit also deletes remote shards and plots that this
  build does not have (a rebuilt dataset must not mix with old shards).
* Safe: a repository whose card or manifest states a different
  ``schema_version`` (or that holds files but neither) is not overwritten
  unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

TOKEN_ENV = "HF_TOKEN"
CARD, MANIFEST = "README.md", "manifest.json"
UPLOAD_GLOBS = ("manifest.json", "build_config.yaml", "stats.json", "shards/*.parquet", "plots/*.png", "README.md")
MANAGED_DIRS = ("shards/", "plots/")  # remote files here that the build lacks are deleted
CODEBOOK_REPO_DIR = "codebook"  # where the codebook files go in the repository
STATS = "stats.json"
DEFAULT_BATCH_FILES = 64
DEFAULT_BATCH_BYTES = 8 * 1024**3


class HubError(RuntimeError):
    """The push cannot go ahead (no token, nothing built, or a repository of another schema)."""


@dataclass
class PushResult:
    repo_id: str
    url: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already on the Hub with the same content
    deleted: list[str] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)  # commit ids, in order

    def format(self) -> str:
        return (
            f"pushed to {self.url}: {len(self.uploaded)} files uploaded, {len(self.skipped)} already there, "
            f"{len(self.deleted)} stale files deleted, {len(self.commits)} commits"
        )


def card_schema_version(text: str) -> str | None:
    """``drivevla.schema_version`` from a card's YAML front matter (None if absent)."""
    if not text.startswith("---"):
        return None
    try:
        header = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = (header.get("drivevla") or {}).get("schema_version") if isinstance(header, dict) else None
    return None if value is None else str(value)


def local_files(build_dir: Path) -> list[str]:
    """Repository paths to upload, in upload order (manifest first, card last)."""
    out: list[str] = []
    from pipelines.core.shards import list_shards

    for pattern in UPLOAD_GLOBS:
        if pattern == "shards/*.parquet":  # committed shards only: those a partition marker lists
            out += sorted(p.relative_to(build_dir).as_posix() for p in list_shards(build_dir))
            continue
        out += sorted(p.relative_to(build_dir).as_posix() for p in build_dir.glob(pattern) if p.is_file())
    if CARD not in out or not any(p.startswith("shards/") for p in out):
        raise HubError(f"{build_dir} has no dataset card or no shards; run `drivevla build` first")
    return out


def check_codebook(build_dir: Path, codebook_dir: Path) -> dict[str, Path]:
    """Repository path -> local file of the codebook that decodes this build's tokens (validated)."""
    from tokenizer.codebook import CodebookError, codebook_paths, load_codebook

    try:
        cb = load_codebook(codebook_dir)
    except CodebookError as exc:
        raise HubError(
            f"the codebook is needed to decode the action tokens and travels with the dataset: {exc} "
            "(pass --codebook DIR)"
        ) from None
    stats_path = build_dir / STATS
    built = None
    if stats_path.is_file():
        built = (json.loads(stats_path.read_text()).get("codebook") or {}).get("tensors_sha256")
    if built and built != cb.meta.tensors_sha256:
        raise HubError(
            f"{codebook_dir} (tensors_sha256 {cb.meta.tensors_sha256[:12]}...) is not the codebook {build_dir} "
            f"was built with ({STATS} says {built[:12]}...); pass the right one with --codebook"
        )
    return {f"{CODEBOOK_REPO_DIR}/{p.name}": p for p in codebook_paths(codebook_dir)}


def resolve_token(token: str | None) -> str:
    """The caller's token, else huggingface_hub's lookup (HF_TOKEN, then the saved `hf auth login` token)."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubError(
            f"no Hugging Face token: set {TOKEN_ENV} to a write token or run `hf auth login` "
            "(huggingface_hub's standard lookup)"
        )
    return token


def git_blob_id(path: Path) -> str:
    """The git blob sha1 of a file (the Hub's ``oid`` of a non-LFS file)."""
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_content(local: Path, remote: Any) -> bool:
    """Whether a remote ``RepoFile`` already holds ``local``'s bytes."""
    if remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == sha256_file(local)
    return remote.blob_id == git_blob_id(local)


def batches(
    paths: Sequence[str], sources: Mapping[str, Path], max_files: int, max_bytes: int
) -> Iterator[list[str]]:
    """Consecutive groups of at most ``max_files`` files and about ``max_bytes`` bytes."""
    batch: list[str] = []
    size = 0
    for p in paths:
        n = sources[p].stat().st_size
        if batch and (len(batch) >= max_files or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += n
    if batch:
        yield batch


def _remote_text(api: Any, repo_id: str, path: str, revision: str) -> str:
    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory() as tmp:  # never touch the user's Hub cache
        local = hf_hub_download(
            repo_id, path, repo_type="dataset", revision=revision, cache_dir=tmp,
            endpoint=api.endpoint, token=api.token,
        )  # fmt: skip
        return Path(local).read_text()


def check_remote_schema(api: Any, repo_id: str, remote: dict[str, Any], local_version: str, revision: str) -> None:
    """Raise :class:`HubError` unless the repository is empty or holds the same schema version."""
    if not remote:
        return
    if CARD in remote:
        version, where = card_schema_version(_remote_text(api, repo_id, CARD, revision)), CARD
    elif MANIFEST in remote:
        version, where = json.loads(_remote_text(api, repo_id, MANIFEST, revision)).get("schema_version"), MANIFEST
    else:
        raise HubError(
            f"{repo_id} holds {len(remote)} files but no {CARD} or {MANIFEST} from `drivevla push`; "
            "refusing to overwrite it (use --force to push anyway)"
        )
    if version != local_version:
        raise HubError(
            f"{repo_id}: its {where} says schema_version {version!r} but this build is {local_version!r}; "
            "refusing to overwrite (use --force, or push to a new repository)"
        )


def push_dataset(
    build_dir: str | Path,
    repo_id: str,
    *,
    codebook_dir: str | Path | None = None,
    private: bool = True,
    force: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    revision: str = "main",
    batch_files: int = DEFAULT_BATCH_FILES,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> PushResult:
    """Upload ``build_dir`` (shards, card, plots, stats, manifest) and its codebook to the dataset repo ``repo_id``.

    ``codebook_dir`` defaults to ``<build_dir>/../codebook`` (``<data>/codebook``).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    build = Path(build_dir)
    token = resolve_token(token)
    paths = local_files(build)
    local_version = card_schema_version((build / CARD).read_text())
    if local_version is None:
        raise HubError(f"{build / CARD} has no drivevla.schema_version in its front matter; rebuild the card")
    codebook = check_codebook(build, Path(codebook_dir) if codebook_dir is not None else build.parent / "codebook")
    sources = {p: build / p for p in paths}
    sources.update(codebook)
    order = [p for p in paths if p != CARD] + sorted(codebook) + [CARD]  # card last

    api = HfApi(endpoint=endpoint, token=token)
    url = str(api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True))
    if revision != "main":  # a new branch starts at the default branch's head, as on the Hub
        api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    remote = {
        f.path: f
        for f in api.list_repo_tree(repo_id, repo_type="dataset", recursive=True, revision=revision)
        if isinstance(f, RepoFile)
    }
    if not force:
        check_remote_schema(api, repo_id, remote, local_version, revision)

    result = PushResult(repo_id=repo_id, url=url)
    todo = []
    for p in order:
        if p in remote and same_content(sources[p], remote[p]):
            result.skipped.append(p)
        else:
            todo.append(p)
    stale = sorted(p for p in remote if p.startswith(MANAGED_DIRS) and p not in sources)
    card_changed = CARD in todo
    body = [p for p in todo if p != CARD]
    groups = list(batches(body, sources, batch_files, batch_bytes))
    if card_changed or stale:
        groups.append([CARD] if card_changed else [])
    log.info("push %s@%s: %d files to send, %d already there, %d stale, %d commits",
             repo_id, revision, len(todo), len(result.skipped), len(stale), len(groups))  # fmt: skip
    for i, group in enumerate(groups, 1):
        ops: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(sources[p])) for p in group]
        if i == len(groups):
            ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
        info = api.create_commit(
            repo_id, ops, repo_type="dataset", revision=revision,
            commit_message=f"drivevla push {i}/{len(groups)}: " + (", ".join(group[:3]) + (" ..." if len(group) > 3 else "") or "cleanup"),
        )  # fmt: skip
        result.commits.append(info.oid)
        result.uploaded += group
        log.info("push %s: commit %d/%d (%d files) done", repo_id, i, len(groups), len(group))
    result.deleted = stale
    return result
