"""The annotate stage and command end to end against the local test server.

Acceptance (GitHub issue 5): under a mix of faults every sample ends annotated
or failed with a reason, none twice; after SIGKILL mid-run a rerun sends no
request whose result was committed, and the output equals an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotators.cache import iter_records
from annotators.config import AnnotateConfig, ClientConfig, SelectionConfig
from annotators.schema import ANNOTATION_COLUMNS
from annotators.synthetic import make_rows
from annotators.testserver import FakeVLMServer, FaultConfig
from pipelines.commands.annotate import annotation_summary
from pipelines.core.runner import run_stage
from pipelines.core.shards import read_table
from pipelines.stages.annotate import AnnotateStage
from schemas.sample import SAMPLE_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
MODEL = "test-model"
COMPARE = ["sample_id", "think_mode", "think_reasons", "annotation_status", "annotation_error",
           "reasoning_scene", "reasoning_objects", "reasoning_intent", "reasoning_action_lateral",
           "reasoning_action_longitudinal"]  # fmt: skip


def write_extract(data: Path, n: int, per_shard: int, dataset: str = "nuscenes") -> Path:
    rows = make_rows(n, dataset=dataset, width=24, height=16)
    d = data / "extract" / dataset / "shards"
    d.mkdir(parents=True)
    for k in range(0, n, per_shard):
        pq.write_table(
            pa.Table.from_pylist(rows[k : k + per_shard], schema=SAMPLE_SCHEMA),
            d / f"p{k // per_shard:03d}-00000.parquet",
        )
    return d.parent


def vlm_config(url: str, **client) -> AnnotateConfig:
    c = dict(endpoints=(url,), model=MODEL, max_in_flight=16, backoff_base_s=0.01, backoff_max_s=0.05,
             timeout_base_s=0.4, timeout_per_token_s=0.0, max_attempts=4, latency_tolerance=0.0)  # fmt: skip
    c.update(client)
    return AnnotateConfig(selection=SelectionConfig(slow_fraction=1.0), client=ClientConfig(**c))


def test_fault_mix_every_sample_ends_once(tmp_path):
    in_dir = write_extract(tmp_path, 80, 20)
    faults = FaultConfig(model=MODEL, latency_s=0.01, p_500=0.06, p_503=0.04, p_hang=0.05,
                         p_malformed_content=0.02, p_malformed_body=0.01, p_429=0.05, retry_after_s=0.02)  # fmt: skip
    with FakeVLMServer(faults) as srv:
        stage = AnnotateStage(in_dir, vlm_config(srv.base_url), tmp_path / "out", progress=False)
        summary = run_stage(stage, tmp_path / "out", engine="local", progress=False)
        log = list(srv.log)
    assert summary.ok and summary.written == 80
    t = read_table(tmp_path / "out").to_pylist()
    assert len({r["sample_id"] for r in t}) == 80
    status = Counter(r["annotation_status"] for r in t)
    assert set(status) <= {"ok", "failed"} and status["ok"] >= 60
    for r in t:
        if r["annotation_status"] == "ok":
            assert r["reasoning_action_lateral"] == r["meta_lateral"] and r["reasoning_scene"]
            assert (
                r["annotation_provenance"]["attempts"] >= 1
                and r["annotation_provenance"]["model"] == MODEL
            )
        else:
            assert r["annotation_error"].split(":")[0] in {
                "ServerError",
                "Timeout",
                "MalformedAnswer",
                "RateLimited",
                "ConnectionError",
            }
    faults_seen = Counter(rec.fault for rec in log)
    assert {"500", "503", "hang", "429"} <= set(faults_seen)
    # no request for a key after its accepted answer
    done_at: dict[str, int] = {}
    for i, rec in enumerate(log):
        assert rec.key not in done_at, f"{rec.key} sent again after it was answered"
        if rec.status == 200 and rec.fault in ("ok", "slow"):
            done_at[rec.key] = i
    assert "status {'ok'" in annotation_summary(tmp_path / "out")


def test_rerun_resends_only_failures(tmp_path):
    in_dir = write_extract(tmp_path, 12, 6)
    rows = pq.read_table(next((in_dir / "shards").glob("p000*"))).to_pylist()
    with FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.01)) as srv:
        cfg = vlm_config(srv.base_url, max_attempts=2)
        stage = AnnotateStage(in_dir, cfg, tmp_path / "out", progress=False)
        keys = {}
        from annotators.prompts import build_prompt
        from annotators.request import request_key

        for r in rows:
            keys[r["sample_id"]] = request_key(build_prompt(r, cfg.prompt), cfg.client)
        bad = keys[rows[0]["sample_id"]]
        srv.set_faults(script={bad: ("500", "500")})
        run_stage(stage, tmp_path / "out", engine="local", progress=False)
        first = Counter(srv.keys())
        # a new output dir, same cache: only the failed key is sent again
        srv.set_faults(script={})
        cfg2 = AnnotateConfig(
            selection=cfg.selection, client=cfg.client, cache_dir=str(tmp_path / "out" / "_cache")
        )
        run_stage(
            AnnotateStage(in_dir, cfg2, tmp_path / "out2", progress=False),
            tmp_path / "out2",
            engine="local",
            progress=False,
        )
        second = Counter(srv.keys()) - first
    assert first[bad] == 2 and set(second) == {bad}
    t = {r["sample_id"]: r for r in read_table(tmp_path / "out2").to_pylist()}
    assert t[rows[0]["sample_id"]]["annotation_status"] == "ok"


def _cli(data: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "annotate", "--dataset", "nuscenes", "--data", str(data),
            "--endpoint", url, "--model", MODEL, "--slow-fraction", "1.0", "--engine", "local", "--no-progress",
            "--set", "client.backoff_base_s=0.01", *extra]  # fmt: skip


def test_sigkill_then_rerun_sends_no_completed_key(tmp_path):
    for name in ("a", "b"):
        write_extract(tmp_path / name, 48, 12)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.1)) as srv:
        proc = subprocess.Popen(_cli(tmp_path / "a", srv.base_url, "--max-in-flight", "3"), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        cache = tmp_path / "a" / "annotate" / "nuscenes" / "_cache"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(1 for d in cache.glob("*") for _ in iter_records(d)) >= 8:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        committed = {k for d in cache.glob("*") for k, v in iter_records(d) if v["status"] == "ok"}
        assert 8 <= len(committed) < 48, "kill came too late or too early to test resume"
        n_before = len(srv.log)
        rerun = subprocess.run(_cli(tmp_path / "a", srv.base_url, "--max-in-flight", "8"), cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        resent = set(srv.keys()[n_before:])
        assert not (resent & committed), "rerun re-sent requests whose results were committed"
        assert len(resent) == 48 - len(committed)
        clean = subprocess.run(_cli(tmp_path / "b", srv.base_url, "--max-in-flight", "8"), cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert clean.returncode == 0, clean.stderr[-2000:]
    a = read_table(tmp_path / "a" / "annotate" / "nuscenes", columns=COMPARE).sort_by("sample_id")
    b = read_table(tmp_path / "b" / "annotate" / "nuscenes", columns=COMPARE).sort_by("sample_id")
    assert a.num_rows == 48 and a.equals(b)


def test_cli_rules_annotator_and_dry_run(tmp_path, capsys):
    from pipelines.cli import main

    write_extract(tmp_path, 10, 5)
    assert main(["annotate", "--dataset", "nuscenes", "--data", str(tmp_path), "--dry-run", "--show", "2",
                 "--endpoint", "http://127.0.0.1:9/v1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert (
        out.count("--- user ---") == 2
        and "<image front t+0.0s 24x16" in out
        and "selection:" in out
    )
    assert not (tmp_path / "annotate").exists()  # a dry run writes nothing
    assert main(["annotate", "--dataset", "nuscenes", "--data", str(tmp_path), "--annotator", "rules",
                 "--slow-fraction", "0.5", "--no-progress"]) == 0  # fmt: skip
    t = read_table(tmp_path / "annotate" / "nuscenes")
    assert set(ANNOTATION_COLUMNS) <= set(t.column_names)
    rows = t.to_pylist()
    assert Counter(r["think_mode"] for r in rows) == {"slow": 5, "fast": 5}
    for r in rows:
        if r["think_mode"] == "slow":
            assert (
                r["annotation_status"] == "ok"
                and r["annotation_provenance"]["annotator"] == "rules"
            )
        else:
            assert r["annotation_status"] == "skipped_fast" and r["reasoning_scene"] is None


def test_cli_fails_fast_without_a_server(tmp_path, caplog):
    from pipelines.cli import main

    write_extract(tmp_path, 4, 4)
    rc = main(["annotate", "--dataset", "nuscenes", "--data", str(tmp_path), "--endpoint", "http://127.0.0.1:9/v1",
               "--set", "client.connect_timeout_s=0.5", "--no-progress"])  # fmt: skip
    assert rc == 2 and "vllm serve" in caplog.text and "--annotator rules" in caplog.text


@pytest.mark.parametrize("engine", ["ray"])
def test_ray_engine(tmp_path, ray_session, engine):
    in_dir = write_extract(tmp_path, 12, 4)
    with FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.01)) as srv:
        stage = AnnotateStage(in_dir, vlm_config(srv.base_url), tmp_path / "out", progress=False)
        summary = run_stage(stage, tmp_path / "out", engine=engine, num_workers=2, progress=False)
    assert summary.ok and summary.written == 12
    assert Counter(
        read_table(tmp_path / "out", columns=["annotation_status"]).column(0).to_pylist()
    ) == {"ok": 12}


def _keys_of(in_dir: Path, cfg: AnnotateConfig) -> dict[str, str]:
    from annotators.prompts import build_prompt
    from annotators.request import request_key

    rows = read_table(in_dir).to_pylist()
    return {r["sample_id"]: request_key(build_prompt(r, cfg.prompt), cfg.client) for r in rows}


def test_plain_rerun_resends_failures_in_finished_partitions(tmp_path, capsys):
    """Issue 13 item 3 (and 5: the summary counts failed annotations)."""
    from pipelines.cli import main

    in_dir = write_extract(tmp_path, 12, 4)  # 3 partitions
    out = tmp_path / "annotate" / "nuscenes"
    with FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.01)) as srv:
        keys = _keys_of(in_dir, vlm_config(srv.base_url))
        sids = sorted(keys)
        bad = {keys[sids[0]], keys[sids[5]]}  # in partitions p000 and p001
        srv.set_faults(script={k: ("500",) * 10 for k in bad})
        args = ["annotate", "--dataset", "nuscenes", "--data", str(tmp_path), "--endpoint", srv.base_url,
                "--model", MODEL, "--slow-fraction", "1.0", "--engine", "local", "--no-progress",
                "--set", "client.backoff_base_s=0.01", "--set", "client.max_attempts=2"]  # fmt: skip
        assert main(args) == 1  # work is missing: failed annotations
        printed = capsys.readouterr().out
        assert "annotations: 10 ok, 2 failed" in printed and "annotation failed  ServerError" in printed
        first = Counter(srv.keys())
        untouched = (out / "_done" / "p002-00000.json").stat().st_mtime_ns
        srv.set_faults(script={})
        assert main(args) == 0  # a plain rerun, no --overwrite
        second = Counter(srv.keys()) - first
        assert "annotations: 12 ok, 0 failed" in capsys.readouterr().out
    assert all(first[k] == 2 for k in bad) and len(first) == 12
    assert second == Counter({k: 1 for k in bad})  # exactly the failed requests, once each
    t = read_table(out).to_pylist()
    assert len(t) == 12 and {r["annotation_status"] for r in t} == {"ok"}
    assert len({r["sample_id"] for r in t}) == 12
    assert (out / "_done" / "p002-00000.json").stat().st_mtime_ns == untouched  # not rewritten


def test_two_processes_on_one_output(tmp_path):
    """Issue 13 item 2: two annotate runs at once on one output; one is refused clearly, the
    other does all the work, and no request is paid for twice."""
    write_extract(tmp_path, 24, 6)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.15)) as srv:
        cmd = _cli(tmp_path, srv.base_url, "--max-in-flight", "2")
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]  # fmt: skip
        res = [(p.wait(180), *p.communicate()) for p in procs]
        sent = Counter(srv.keys())
    codes = sorted(r[0] for r in res)
    assert codes == [0, 2], [r[2][-1500:] for r in res]
    refused = next(r for r in res if r[0] == 2)
    assert "another annotate run is writing to" in refused[2] and "pid" in refused[2]
    assert len(sent) == 24 and set(sent.values()) == {1}
    t = read_table(tmp_path / "annotate" / "nuscenes").to_pylist()
    assert len(t) == 24 and {r["annotation_status"] for r in t} == {"ok"}


@pytest.mark.parametrize(("guided", "want_ok"), [("response_format", True), ("guided_json", False)])
def test_server_ignoring_unknown_fields(tmp_path, guided, want_ok):
    """Issue 13 item 1: like vLLM and SGLang, the test server ignores unknown fields; only a
    schema request they honour constrains the answer, and unconstrained answers (objects
    without location/behaviour/why) must not pass as ok."""
    in_dir = write_extract(tmp_path, 8, 8)
    with FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.01)) as srv:
        stage = AnnotateStage(in_dir, vlm_config(srv.base_url, guided=guided), tmp_path / "out", progress=False)
        run_stage(stage, tmp_path / "out", engine="local", progress=False)
        log = list(srv.log)
    t = read_table(tmp_path / "out").to_pylist()
    status = Counter(r["annotation_status"] for r in t)
    if want_ok:
        assert status == {"ok": 8} and all(r.constrained and not r.ignored for r in log)
        assert all(o["location"] and o["behaviour"] and o["why"] for r in t for o in r["reasoning_objects"])
    else:
        assert status == {"failed": 8} and all(r.ignored == ("guided_json",) for r in log)
        assert {r["annotation_error"].split(":")[0] for r in t} == {"MalformedAnswer"}
        assert all("empty ['location', 'behaviour', 'why']" in r["annotation_error"] for r in t)


def test_tokenized_input_is_joined_and_a_cache_from_before_the_token_table_is_reused(tmp_path):
    """Annotate reads extracted rows joined with the token table; caches named `<shard>-00000` still count."""
    import shutil

    from pipelines.stages.tokenize import SOURCE_SHARD_FIELD

    in_dir = write_extract(tmp_path, 12, 6)  # shards p000-00000, p001-00000
    tok_dir = tmp_path / "tok"  # a token table as the tokenize stage writes it (by hand: no codebook needed)
    (tok_dir / "shards").mkdir(parents=True)
    schema = pa.schema([SOURCE_SHARD_FIELD, ("sample_id", pa.string()), ("action_tokens", pa.list_(pa.int16(), 10))])
    want = {}
    for k, shard in enumerate(sorted((in_dir / "shards").glob("*.parquet"))):
        ids = pq.read_table(shard, columns=["sample_id"]).column(0).to_pylist()[1:]  # first row: no future
        want.update({s: [k * 100 + i] * 10 for i, s in enumerate(ids)})
        pq.write_table(pa.table({"source_shard": [shard.stem] * len(ids), "sample_id": ids,
                                 "action_tokens": [want[s] for s in ids]}, schema=schema),
                       tok_dir / "shards" / f"{shard.stem}-00000.parquet")  # fmt: skip
    with FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.0)) as srv:
        cfg = vlm_config(srv.base_url)
        stage = AnnotateStage(in_dir, cfg, tmp_path / "out1", progress=False, tokens_dir=tok_dir)
        assert [p.id for p in stage.partitions()] == ["p000-00000", "p001-00000"]
        first = run_stage(stage, tmp_path / "out1", engine="local", progress=False)
        sent = len(srv.log)
        # the cache as an earlier version named it (after the tokenize output shards), in a new output
        for part in ("p000-00000", "p001-00000"):
            shutil.copytree(tmp_path / "out1" / "_cache" / part, tmp_path / "out2" / "_cache" / f"{part}-00000")
        stage2 = AnnotateStage(in_dir, cfg, tmp_path / "out2", progress=False, tokens_dir=tok_dir)
        second = run_stage(stage2, tmp_path / "out2", engine="local", progress=False)
        resent = len(srv.log) - sent
    assert first.ok and first.written == 10 and sent == 10
    assert second.ok and second.written == 10 and resent == 0
    out = read_table(tmp_path / "out1")
    assert dict(zip(out.column("sample_id").to_pylist(), out.column("action_tokens").to_pylist(), strict=True)) == want
    assert read_table(tmp_path / "out2").select(COMPARE).equals(out.select(COMPARE))
