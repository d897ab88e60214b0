"""Scale benchmark (issue 12): prints ONE JSON line.

* ``tokenize``: rows/s of the tokenize stage end to end (read the extracted
  shards' ``sample_id`` and ``future``, encode, write the token table) and of
  the encoder alone on the same futures, in the same run; ``ratio`` = end to
  end / encoder (goal >= 0.5). Also, same run: reading the extracted rows whole
  (every image column) alone and joined with their tokens as annotate does
  (``join_ratio`` = joined / plain: what the token table costs the next stage),
  and the pre-issue-12 row path (to_pylist, add the column, write every column).
* ``extract_two_node``: extract rows/s on a private two-node local Ray cluster
  (`ray start --head` + `ray start --address`, one CPU each) with 1 and with 2
  workers; ``ratio`` = 2 workers / 1 worker. Includes worker start-up, as a user sees it.
* ``peak_rss_mb``: peak RSS of one extract worker (a fresh process: stage
  setup + one partition) per source, on generated input at 1x and 10x size
  (10x: ten times the scenes / logs / segments; the worker runs the same
  first partition, one unit per partition); ``ratio`` = 10x / 1x (goal: within 1.10).
  Measured as the worker process's ``VmHWM``.

Usage: ``python bench/scale.py [--rows 16384] [--image-size 320x200] [--parts tokenize,rss,cluster]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

log = logging.getLogger("bench.scale")

SCALES = {  # SizeSpec overrides per dataset for 1x and 10x input (tiny images)
    "nuscenes": ({"nuscenes_train_scenes": 1, "nuscenes_val_scenes": 0},
                 {"nuscenes_train_scenes": 8, "nuscenes_val_scenes": 2}),  # 10 scenes: all of v1.0-mini
    "nuplan": ({"nuplan_logs": {"mini": 1}}, {"nuplan_logs": {"mini": 10}}),
    "waymo_e2e": ({"waymo_segments": {"training": 1}, "waymo_files": {"training": 1}},
                  {"waymo_segments": {"training": 10}, "waymo_files": {"training": 10}}),
}  # fmt: skip


def _generate(out: Path, dataset: str, overrides: dict, image_size: tuple[int, int] | None = None) -> Path:
    from pipelines.sample_data import common, generate

    name = f"bench_{dataset}_{abs(hash(json.dumps(overrides, sort_keys=True)))}"
    common.SIZES[name] = replace(common.SIZES["tiny"], **overrides)
    try:
        return getattr(generate(out, seed=0, size=name, datasets=[dataset], image_size=image_size), dataset)
    finally:
        del common.SIZES[name]


# --------------------------------------------------------------------------- tokenize


def bench_tokenize(work: Path, rows: int, image_size: tuple[int, int]) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.cli import main as cli
    from pipelines.core.runner import run_stage
    from pipelines.core.shards import read_parquet, read_table, write_table_atomic
    from pipelines.stages.tokenize import (
        TokenizeStage,
        encode_column,
        input_schema,
        input_shards,
        read_input,
    )
    from tokenizer import ActionTokenizer, load_codebook

    src = _generate(work / "src", "waymo_e2e", {}, image_size)
    root = work / "data"
    assert cli(["extract", "--dataset", "waymo_e2e", "--input", str(src), "--out", str(root), "--engine", "local"]) == 0
    assert cli(["codebook", "--data", str(root), "--k", "64", "--datasets", "waymo_e2e"]) == 0
    base = read_table(root / "extract" / "waymo_e2e")
    base = base.filter(base.column("future").is_valid())
    # tile the extracted rows to `rows` rows in shards of 512 (the default shard size), sample ids kept unique
    big = pa.concat_tables([base] * (rows // base.num_rows + 1)).slice(0, rows)
    ids = pa.array([f"{s}#{i}" for i, s in enumerate(big.column("sample_id").to_pylist())], pa.string())
    big = big.set_column(big.column_names.index("sample_id"), big.schema.field("sample_id"), ids)
    tiled = work / "tiled" / "shards"
    tiled.mkdir(parents=True)
    for k in range(0, rows, 512):
        pq.write_table(big.slice(k, 512), tiled / f"t{k // 512:04d}-00000.parquet", compression="zstd")
    stage = TokenizeStage(tiled.parent, root / "codebook")
    t0 = time.perf_counter()
    summary = run_stage(stage, work / "tok", engine="local", progress=False)
    e2e = time.perf_counter() - t0
    assert summary.ok and summary.written == rows, summary.format()
    fut = np.asarray(big.column("future").to_pylist(), dtype=np.float64)
    tok = ActionTokenizer(load_codebook(root / "codebook"), workers=1)
    t0 = time.perf_counter()
    tok.encode(fut)
    enc = time.perf_counter() - t0
    # What the next stage pays: the extracted rows read whole, alone and joined with the token table.
    units = input_shards(tiled.parent, work / "tok")
    plain_s, joined_s = [], []
    for _ in range(3):  # alternated, best of three (the first pass also warms the page cache)
        t0 = time.perf_counter()
        n_plain = sum(read_parquet(p).num_rows for p in sorted(tiled.glob("*.parquet")))
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_joined = sum(read_input(u).num_rows for u in units)
        joined_s.append(time.perf_counter() - t0)
    plain, joined = min(plain_s), min(joined_s)
    assert n_plain == n_joined == rows
    # For reference, the row path this stage used before issue 12 (to_pylist, add the column, from_pylist).
    t0 = time.perf_counter()
    for k, shard in enumerate(sorted(tiled.glob("*.parquet"))):
        table = pq.read_table(shard)
        tokens, _ = encode_column(tok, table.column("future"))
        rows_ = table.to_pylist()
        for row, t in zip(rows_, tokens, strict=True):
            row["action_tokens"] = t
        out_schema = input_schema(tiled.parent, work / "tok")
        write_table_atomic(pa.Table.from_pylist(rows_, schema=out_schema), work / "rowpath" / f"{k}.parquet")
    row_path = time.perf_counter() - t0
    return {
        "rows": rows,
        "image_size": f"{image_size[0]}x{image_size[1]}",
        "end_to_end_rows_per_s": round(rows / e2e, 1),
        "encoder_rows_per_s": round(rows / enc, 1),
        "row_path_rows_per_s": round(rows / row_path, 1),  # the pre-issue-12 to_pylist path, same run
        "ratio": round(enc / e2e, 3),
        "read_rows_per_s": round(rows / plain, 1),  # extracted rows, every column
        "read_joined_rows_per_s": round(rows / joined, 1),  # the same joined with the token table
        "join_ratio": round(plain / joined, 3),
    }


# --------------------------------------------------------------------------- extract on two nodes


def bench_two_node(work: Path) -> dict:
    from _ray_cluster import LocalCluster, cluster_env

    src = _generate(work / "src2", "waymo_e2e", {"waymo_segments": {"training": 16}, "waymo_files": {"training": 8}},
                    (320, 200))  # fmt: skip
    c = LocalCluster()
    out: dict = {}
    try:
        c.start_head(cpus=1)
        c.add_node(cpus=1)
        c.wait_nodes(2)
        for workers in (1, 2):
            cmd = [sys.executable, "-m", "pipelines.cli", "extract", "--dataset", "waymo_e2e", "--input", str(src),
                   "--out", str(work / f"two{workers}"), "--engine", "ray", "--workers", str(workers),
                   "--set", "splits=[train]", "--set", "units_per_partition=1"]  # fmt: skip
            r = subprocess.run(cmd, env=cluster_env({"RAY_ADDRESS": c.gcs_address}), cwd=REPO,
                               capture_output=True, text=True, timeout=900)  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(f"extract with {workers} workers failed:\n{r.stderr[-3000:]}")
            m = re.search(r"stage extract: \d+ samples in, (\d+) written.*?, ([\d.]+) s\)", r.stdout)
            nodes = re.search(r"(\d+) Ray workers on (\d+) nodes", r.stderr)
            assert m and nodes, r.stdout + r.stderr[-2000:]
            out[f"workers_{workers}"] = {"rows": int(m.group(1)), "seconds": float(m.group(2)),
                                         "rows_per_s": round(int(m.group(1)) / float(m.group(2)), 2),
                                         "nodes": int(nodes.group(2))}  # fmt: skip
    finally:
        c.stop()
    out["ratio"] = round(out["workers_2"]["rows_per_s"] / out["workers_1"]["rows_per_s"], 3)
    return out


# --------------------------------------------------------------------------- peak RSS per worker

WORKER = """
import json, sys
from pathlib import Path
from pipelines.config import load_config
from pipelines.core.runner import run_partition
from pipelines.core.stage import Partition
from pipelines.sources.base import ExtractConfig
from pipelines.stages.extract import ExtractStage
dataset, inp, part_file, out = sys.argv[1:5]
cfg = load_config(ExtractConfig, str(Path("configs/extract") / f"{dataset}.yaml"),
                  [f"input={inp}", "units_per_partition=1"])
stage = ExtractStage(cfg)
p = json.loads(Path(part_file).read_text())
stage.setup()
res = run_partition(stage, Partition(p["id"], p["payload"]), Path(out))
assert res.error is None, res.error
# VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's peak across exec)
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({"rss_mb": hwm / 1024, "rows": res.written}))
"""

DRIVER = """
import json, sys
from pathlib import Path
from pipelines.config import load_config
from pipelines.sources.base import ExtractConfig
from pipelines.stages.extract import ExtractStage
dataset, inp, part_file = sys.argv[1:4]
cfg = load_config(ExtractConfig, str(Path("configs/extract") / f"{dataset}.yaml"),
                  [f"input={inp}", "units_per_partition=1"])
parts = ExtractStage(cfg).partitions()
Path(part_file).write_text(json.dumps({"id": parts[0].id, "payload": dict(parts[0].payload), "n": len(parts)}))
"""


def _run_py(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DRIVEVLA_CACHE_DIR": "off"}
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return r.stdout


def bench_rss(work: Path) -> dict:
    out = {}
    for dataset, scales in SCALES.items():
        per = {}
        for label, overrides in zip(("1x", "10x"), scales, strict=True):
            src = _generate(work / f"rss_{dataset}_{label}", dataset, overrides)
            part_file = work / f"part_{dataset}_{label}.json"
            _run_py(DRIVER, dataset, str(src), str(part_file))
            d = json.loads(_run_py(WORKER, dataset, str(src), str(part_file), str(work / f"o_{dataset}_{label}"))
                           .strip().splitlines()[-1])  # fmt: skip
            per[label] = {"rss_mb": round(d["rss_mb"], 1), "rows": d["rows"],
                          "partitions": json.loads(part_file.read_text())["n"]}  # fmt: skip
        per["ratio"] = round(per["10x"]["rss_mb"] / per["1x"]["rss_mb"], 3)
        out[dataset] = per
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384,
                    help="tokenize rows (tiled from extracted WOD-E2E rows; two tokenize partitions at the default)")
    ap.add_argument("--image-size", default="320x200", help="camera resolution WxH for the tokenize rows")
    ap.add_argument("--parts", default="tokenize,rss,cluster",
                    help="comma-separated measurements to run: tokenize, rss, cluster (skipped ones print null)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    result: dict = {"bench": "scale", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="drivevla-scale-") as tmp:
        work = Path(tmp)
        parts = set(args.parts.split(","))
        result["tokenize"] = bench_tokenize(work, args.rows, (w, h)) if "tokenize" in parts else None
        result["peak_rss_mb"] = bench_rss(work) if "rss" in parts else None
        result["extract_two_node"] = bench_two_node(work) if "cluster" in parts else None
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
