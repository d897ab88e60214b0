"""Hub push against a fake Hub on 127.0.0.1: upload, resume after an interruption, schema-version refusal,
the codebook decoding from a fresh download, branches, the saved-login token.

The fake implements just what huggingface_hub calls for create_repo, create_branch,
list_repo_tree, preupload, the LFS batch API (basic transfer), commit, validate-yaml
and file download, per branch (a missing revision answers 404 with
``X-Error-Code: RevisionNotFound`` and a new branch starts at main's head, as the
Hub does); nothing leaves the machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from pipelines.hub import HubError, push_dataset
from tokenizer.codebook import Codebook, load_codebook

TOKEN = "hf_fake_token_for_tests"
LFS_SUFFIXES = (".parquet", ".png", ".safetensors")  # LFS by the Hub's default .gitattributes


class RevisionNotFound(KeyError):
    pass


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class FakeHub:
    """In-memory Hub: repos of files, an LFS object store, a log of requests and commits."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []  # {"repo", "files": [...], "deleted": [...]}
        self.lfs_puts: list[str] = []
        self.fail_commits_after = None  # fail every commit once this many succeeded
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code, obj=None, headers=None, body=None):
                data = (
                    body
                    if body is not None
                    else (json.dumps(obj).encode() if obj is not None else b"")
                )
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def do_HEAD(self):
                self._route("HEAD")

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

            def _route(self, method):
                path = urlparse(self.path).path
                with hub.lock:
                    hub.requests.append((method, path))
                if (
                    not path.startswith("/lfs-upload/")
                    and self.headers.get("Authorization") != f"Bearer {TOKEN}"
                ):
                    return self._send(401, {"error": "bad token"})
                try:
                    hub.handle(self, method, path)
                except RevisionNotFound as exc:
                    self._send(
                        404,
                        {"error": f"Invalid rev id: {exc}"},
                        headers={"X-Error-Code": "RevisionNotFound"},
                    )
                except KeyError as exc:
                    self._send(404, {"error": f"not found: {exc}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ routes

    def handle(self, h, method: str, path: str) -> None:
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(h._body())
            repo = f"{req['organization']}/{req['name']}"
            url = f"{self.url}/datasets/{repo}"
            if repo in self.repos:
                return h._send(409, {"error": "You already created this dataset repo", "url": url})
            self.repos[repo] = {"files": {}, "private": req.get("visibility") == "private" or req.get("private"),
                                "head": "0" * 40, "branches": {}}  # fmt: skip
            return h._send(200, {"url": url})
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/branch/([^/]+)", path)
        if m and method == "POST":
            repo = self.repos[m.group(1)]
            req = json.loads(h._body() or b"{}")
            branch = unquote(m.group(2))
            if branch == "main" or branch in repo["branches"]:
                return h._send(409, {"error": "Reference already exists"})
            start = self.files(m.group(1), req.get("startingPoint", "main"))
            repo["branches"][branch] = dict(start)
            return h._send(200, {})
        if method == "POST" and path == "/api/validate-yaml":
            h._body()
            return h._send(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if m and method == "GET":
            files = self.files(m.group(1), m.group(2))
            out = []
            for p, data in sorted(files.items()):
                entry = {"type": "file", "path": p, "size": len(data), "oid": _blob_id(data)}
                if p.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    }
                out.append(entry)
            return h._send(200, out)
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/preupload/([^/]+)", path)
        if m and method == "POST":
            self.files(m.group(1), m.group(2))  # 404 if the repo or revision is missing
            files = json.loads(h._body())["files"]
            return h._send(200, {"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                 "shouldIgnore": False} for f in files]})  # fmt: skip
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            objs = json.loads(h._body())["objects"]
            out = []
            for o in objs:
                entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] not in self.lfs:
                    entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}
                out.append(entry)
            return h._send(200, {"transfer": "basic", "objects": out})
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if m and method == "PUT":
            data = h._body()
            assert hashlib.sha256(data).hexdigest() == m.group(1)
            self.lfs[m.group(1)] = data
            self.lfs_puts.append(m.group(1))
            return h._send(200, {})
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/commit/([^/]+)", path)
        if m and method == "POST":
            return self._commit(h, m.group(1), m.group(2))
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("HEAD", "GET"):
            repo = self.repos[m.group(1)]
            data = self.files(m.group(1), m.group(2))[unquote(m.group(3))]
            headers = {"X-Repo-Commit": repo["head"], "ETag": f'"{_blob_id(data)}"'}
            if m.group(3).endswith(
                LFS_SUFFIXES
            ):  # LFS files: the Hub names the content by its sha256
                headers.update(
                    {
                        "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                        "X-Linked-Size": str(len(data)),
                    }
                )
            return h._send(200, body=data, headers=headers)
        h._send(404, {"error": f"fake hub has no route {method} {path}"})

    def files(self, repo_id: str, revision: str) -> dict:
        repo = self.repos[repo_id]
        rev = unquote(revision)
        if rev == "main":
            return repo["files"]
        if rev not in repo["branches"]:
            raise RevisionNotFound(rev)
        return repo["branches"][rev]

    def _commit(self, h, repo_id: str, revision: str) -> None:
        lines = [json.loads(x) for x in h._body().splitlines() if x.strip()]
        repo = self.repos[repo_id]
        files = self.files(repo_id, revision)
        if self.fail_commits_after is not None and len(self.commits) >= self.fail_commits_after:
            return h._send(500, {"error": "injected failure"})
        staged, deleted = {}, []
        for item in lines:
            v = item["value"]
            if item["key"] == "file":
                staged[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.lfs:
                    return h._send(400, {"error": f"LFS object {v['oid']} was never uploaded"})
                staged[v["path"]] = self.lfs[v["oid"]]
            elif item["key"] == "deletedFile":
                deleted.append(v["path"])
        files.update(staged)
        for p in deleted:
            files.pop(p, None)
        repo["head"] = hashlib.sha1(
            json.dumps(sorted(files)).encode() + repo["head"].encode()
        ).hexdigest()
        self.commits.append(
            {
                "repo": repo_id,
                "revision": unquote(revision),
                "files": sorted(staged),
                "deleted": deleted,
            }
        )
        h._send(200, {"commitUrl": f"{self.url}/datasets/{repo_id}/commit/{repo['head']}",
                      "commitOid": repo["head"], "pullRequestUrl": None})  # fmt: skip


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path_factory):
    from huggingface_hub import constants

    monkeypatch.setattr(
        constants, "HF_HUB_OFFLINE", False
    )  # the suite runs offline; this server is local
    monkeypatch.setattr(
        constants, "HF_HUB_DISABLE_XET", True
    )  # basic LFS transfer, which the fake implements
    # no saved login of whoever runs the tests: `hf auth login` writes HF_TOKEN_PATH
    monkeypatch.setattr(
        constants, "HF_TOKEN_PATH", str(tmp_path_factory.mktemp("hf_home") / "token")
    )
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = FakeHub()
    yield hub
    hub.close()


def make_codebook(root: Path, k: int = 32) -> Codebook:
    from tokenizer.codebook import CodebookMeta, save_codebook
    from tokenizer.kdisk import kdisk_fit
    from tokenizer.segments import future_segments
    from tokenizer.synthetic import simulate_futures

    res = kdisk_fit(future_segments(simulate_futures(200, seed=1)).reshape(-1, 3), k, 0.05, 0)
    meta = CodebookMeta(k=k, tol=0.05, vehicle_length=4.8, vehicle_width=2.0, dt=0.5, seed=0)
    save_codebook(Codebook.from_tokens(res.tokens, meta), root / "codebook")
    return load_codebook(root / "codebook")


def make_build(root: Path, n_shards: int = 5, version: str = "1.0.0", tag: str = "a") -> Path:
    cb = make_codebook(root)
    b = root / "build"
    (b / "shards").mkdir(parents=True, exist_ok=True)
    (b / "plots").mkdir(exist_ok=True)
    (b / "_done").mkdir(exist_ok=True)
    for k in range(n_shards):
        (b / "shards" / f"train-nuscenes-{k:05d}-00000.parquet").write_bytes(
            f"PAR1 {tag} {k}".encode() * 50
        )
    (b / "plots" / "distributions.png").write_bytes(b"\x89PNG fake " + tag.encode())
    shards = [f"train-nuscenes-{k:05d}-00000.parquet" for k in range(n_shards)]
    (b / "_done" / "x.json").write_text(json.dumps({"shards": shards}))  # runner markers are not uploaded
    (b / "manifest.json").write_text(json.dumps({"schema_version": version, "complete": True}))
    (b / "stats.json").write_text(json.dumps({"codebook": cb.meta.to_json()}))
    (b / "README.md").write_text(
        f"---\nlicense: other\ndrivevla:\n  schema_version: {version}\n---\n# card {tag}\n"
    )
    return b


def test_push_uploads_everything_once_and_resumes(tmp_path, fake_hub):
    build = make_build(tmp_path)
    fake_hub.fail_commits_after = 1  # the second commit fails: an interrupted push
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError, match="500"):
        push_dataset(build, "org/drive", endpoint=fake_hub.url, batch_files=2)
    first = fake_hub.commits[0]["files"]
    assert first == ["manifest.json", "stats.json"]  # manifest goes first
    assert "README.md" not in fake_hub.repos["org/drive"]["files"]  # card only with the last commit
    assert fake_hub.repos["org/drive"]["private"]

    fake_hub.fail_commits_after = None
    puts_before = len(fake_hub.lfs_puts)
    res = push_dataset(build, "org/drive", endpoint=fake_hub.url, batch_files=2)
    assert set(res.skipped) == set(first)  # committed files are not sent again
    resent = {p for c in fake_hub.commits[1:] for p in c["files"]}
    assert not resent & set(first)
    files = fake_hub.repos["org/drive"]["files"]
    expect = {
        p.relative_to(build).as_posix()
        for p in build.rglob("*")
        if p.is_file() and "_done" not in p.parts
    }
    assert set(files) == expect | {"codebook/codebook.safetensors", "codebook/codebook.json"}
    assert all(files[p] == (build / p).read_bytes() for p in expect)
    assert files["codebook/codebook.json"] == (tmp_path / "codebook" / "codebook.json").read_bytes()
    assert fake_hub.commits[-1]["files"] == ["README.md"]
    # LFS objects uploaded before the failed commit are not re-sent either
    assert len(fake_hub.lfs_puts) - puts_before == len(set(fake_hub.lfs_puts[puts_before:]))
    assert fake_hub.lfs_puts and len(set(fake_hub.lfs_puts)) == len(fake_hub.lfs_puts)

    # a third push with nothing changed sends nothing
    n_commits = len(fake_hub.commits)
    again = push_dataset(build, "org/drive", endpoint=fake_hub.url)
    assert again.uploaded == [] and len(fake_hub.commits) == n_commits


def test_rebuilt_dataset_replaces_stale_shards(tmp_path, fake_hub):
    push_dataset(make_build(tmp_path / "one", n_shards=3), "org/drive", endpoint=fake_hub.url)
    build2 = make_build(tmp_path / "two", n_shards=1, tag="b")
    res = push_dataset(build2, "org/drive", endpoint=fake_hub.url)
    files = fake_hub.repos["org/drive"]["files"]
    assert sorted(p for p in files if p.startswith("shards/")) == [
        "shards/train-nuscenes-00000-00000.parquet"
    ]
    assert len(res.deleted) == 2 and files["README.md"].endswith(b"# card b\n")


def test_schema_version_mismatch_is_refused_unless_forced(tmp_path, fake_hub):
    push_dataset(make_build(tmp_path / "old", version="0.9.0"), "org/drive", endpoint=fake_hub.url)
    new = make_build(tmp_path / "new", version="1.0.0", tag="n")
    with pytest.raises(HubError, match="schema_version '0.9.0'.*'1.0.0'"):
        push_dataset(new, "org/drive", endpoint=fake_hub.url)
    res = push_dataset(new, "org/drive", endpoint=fake_hub.url, force=True)
    assert (
        res.uploaded
        and b"schema_version: 1.0.0" in fake_hub.repos["org/drive"]["files"]["README.md"]
    )


def test_foreign_repo_and_missing_token_are_refused(tmp_path, fake_hub, monkeypatch):
    fake_hub.repos["org/other"] = {"files": {"data.csv": b"a,b\n"}, "private": False, "head": "0" * 40,
                                   "branches": {}}  # fmt: skip
    with pytest.raises(HubError, match="no README.md or manifest.json"):
        push_dataset(make_build(tmp_path), "org/other", endpoint=fake_hub.url)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="set HF_TOKEN .* or run `hf auth login`"):
        push_dataset(make_build(tmp_path), "org/drive", endpoint=fake_hub.url)


def test_push_command_never_prints_the_token(tmp_path, fake_hub, capsys):
    from pipelines.cli import main

    make_build(tmp_path)
    rc = main(["push", "--repo", "org/cli", "--data", str(tmp_path), "--endpoint", fake_hub.url])
    out = capsys.readouterr()
    assert rc == 0 and "pushed to" in out.out
    assert TOKEN not in out.out + out.err


# --------------------------------------------------------------------------- issue 14 items 13, 16


def test_codebook_travels_and_decodes_from_a_fresh_download(tmp_path, fake_hub):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import hf_hub_download

    from tokenizer.synthetic import simulate_futures
    from tokenizer.tokenizer import ActionTokenizer

    build = make_build(tmp_path, n_shards=0)
    cb = load_codebook(tmp_path / "codebook")
    fut = simulate_futures(20, seed=3)
    ids = ActionTokenizer(cb).encode(fut)
    table = pa.table(
        {"future": fut.tolist(), "action_tokens": pa.array(ids.tolist(), pa.list_(pa.int16(), 10))}
    )
    pq.write_table(table, build / "shards" / "train-nuscenes-00000-00000.parquet")
    (build / "_done" / "x.json").write_text(json.dumps({"shards": ["train-nuscenes-00000-00000.parquet"]}))
    push_dataset(build, "org/drive", endpoint=fake_hub.url)

    fresh = tmp_path / "fresh_cache"  # nothing local: everything comes from the Hub
    get = {
        name: hf_hub_download("org/drive", name, repo_type="dataset", cache_dir=fresh, endpoint=fake_hub.url)
        for name in ("codebook/codebook.safetensors", "codebook/codebook.json", "shards/train-nuscenes-00000-00000.parquet")
    }  # fmt: skip
    downloaded = load_codebook(
        Path(get["codebook/codebook.json"]).parent
    )  # validated, sha256 included
    assert downloaded.meta.tensors_sha256 == cb.meta.tensors_sha256
    row_tokens = np.array(
        pq.read_table(get["shards/train-nuscenes-00000-00000.parquet"])
        .column("action_tokens")
        .to_pylist()
    )
    decoded = ActionTokenizer(downloaded).decode(row_tokens)
    np.testing.assert_array_equal(decoded, ActionTokenizer(cb).decode(ids))  # the tokens' meaning survived


def test_missing_or_foreign_codebook_is_refused(tmp_path, fake_hub):
    import shutil

    build = make_build(tmp_path)
    make_codebook(tmp_path / "other", k=16)
    with pytest.raises(HubError, match="is not the codebook .* was built with"):
        push_dataset(
            build, "org/drive", endpoint=fake_hub.url, codebook_dir=tmp_path / "other" / "codebook"
        )
    shutil.rmtree(tmp_path / "codebook")
    with pytest.raises(HubError, match="needed to decode the action tokens.*does not exist"):
        push_dataset(build, "org/drive", endpoint=fake_hub.url)
    assert not fake_hub.commits


def test_revision_branch_is_created(tmp_path, fake_hub):
    push_dataset(make_build(tmp_path / "one", tag="main"), "org/drive", endpoint=fake_hub.url)
    build = make_build(tmp_path / "two", n_shards=2, tag="v2")
    res = push_dataset(build, "org/drive", endpoint=fake_hub.url, revision="v2-preview")
    repo = fake_hub.repos["org/drive"]
    branch = repo["branches"]["v2-preview"]
    assert branch["README.md"].endswith(b"# card v2\n") and repo["files"]["README.md"].endswith(
        b"# card main\n"
    )
    assert sorted(p for p in branch if p.startswith("shards/")) == [
        "shards/train-nuscenes-00000-00000.parquet", "shards/train-nuscenes-00001-00000.parquet"]  # fmt: skip
    assert (
        len(res.deleted) == 3
    )  # the branch started at main's head; main's extra shards go from the branch
    assert len([p for p in repo["files"] if p.startswith("shards/")]) == 5  # main untouched
    assert {c["revision"] for c in fake_hub.commits[-len(res.commits) :]} == {"v2-preview"}
    again = push_dataset(
        build, "org/drive", endpoint=fake_hub.url, revision="v2-preview"
    )  # exists now
    assert again.uploaded == []


def test_saved_login_token_is_used(tmp_path, fake_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN + "\n")  # what `hf auth login` saves
    res = push_dataset(make_build(tmp_path), "org/drive", endpoint=fake_hub.url)
    assert res.commits and "README.md" in fake_hub.repos["org/drive"]["files"]


# --------------------------------------------------------------------------- committed shards only


def test_only_committed_shards_are_pushed_and_incomplete_builds_refused(tmp_path, fake_hub, capsys, caplog):
    from pipelines.cli import main

    build = make_build(tmp_path, n_shards=2)
    # a leftover of a crashed attempt that no marker lists (the runner removes it on rerun)
    (build / "shards" / "train-nuscenes-00009-00000.parquet").write_bytes(b"PAR1 stray" * 50)
    push_dataset(build, "org/committed", endpoint=fake_hub.url)
    shards = sorted(p for p in fake_hub.repos["org/committed"]["files"] if p.startswith("shards/"))
    assert shards == [f"shards/train-nuscenes-{k:05d}-00000.parquet" for k in range(2)]

    manifest = {"schema_version": "1.0.0", "complete": False, "stage": "build", "missing_partitions": ["p7"]}
    (build / "manifest.json").write_text(json.dumps(manifest))
    rc = main(["push", "--repo", "org/partial", "--data", str(tmp_path), "--endpoint", fake_hub.url])
    assert rc == 2 and "org/partial" not in fake_hub.repos
    assert "p7" in caplog.text and "incomplete" in caplog.text
    capsys.readouterr()
    rc = main(["push", "--repo", "org/cli2", "--data", "s3://bucket/data", "--endpoint", fake_hub.url])
    assert rc == 2 and "local build directory" in capsys.readouterr().out
