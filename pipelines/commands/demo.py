"""``drivevla demo``: the whole pipeline on the embedded sample data; no GPU, no network.

generate -> extract (4 datasets) -> codebook -> tokenize -> annotate (rules) ->
filter + build + card -> load back with ``datasets`` -> summary.

Each step is the same CLI command a user would type, run in this process.
Every stage is resumable, so a second ``make demo`` reuses finished
partitions; the sample data and the codebook are reused when present (their
own markers: ``sample/ground_truth.jsonl`` and ``codebook/codebook.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipelines.core.runner import ENGINES

log = logging.getLogger(__name__)

HF_CACHE_DIR = ".hf_cache"  # under the demo data root, never inside build/ (which is pushed)
DATASETS = ("waymo_e2e", "nuscenes", "nuplan", "bench2drive")
DEMO_NOTE = (
    "Built by `drivevla demo` from the embedded sample data: synthetic scenes rendered by the project's "
    "simulator in the real on-disk formats, annotated by the deterministic rules annotator (no VLM). "
    "It contains no real dataset content; the licence section applies to real builds."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on the embedded sample data (no GPU, no network)",
        description=(
            "Generate the sample data into OUT/sample, extract WOD-E2E, nuScenes, NAVSIM/nuPlan and Bench2Drive, fit a small "
            "action codebook (K=256, tol 0.05 m: the sample data has fewer distinct segments than 2048, so the "
            "fit stops early with a warning, which is expected here), tokenize the futures, annotate with the "
            "deterministic rules annotator (annotator=rules, chosen explicitly), filter the reasoning, build the "
            "training shards with the dataset card and plots, load them back with `datasets`, and print a "
            "summary. Rerunning reuses every finished step."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="data root for every output")
    p.add_argument("--size", choices=("tiny", "default"), default="default", help="sample data size")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample world")
    p.add_argument("--engine", choices=ENGINES, default="local", help="stage engine (local avoids Ray start-up)")
    p.add_argument("--k", type=int, default=256, help="codebook size for the demo")
    p.add_argument("--tol", type=float, default=0.05, help="K-disk radius in m")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="datasets to run")


def _cli(argv: list[str]) -> int:
    from pipelines.cli import build_parser

    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def _step(name: str, timings: dict[str, float], argv: list[str] | None = None, fn: Any = None) -> None:
    start = time.perf_counter()
    print(f"\n=== {name}: drivevla {' '.join(argv)}" if argv else f"\n=== {name}", flush=True)
    rc = _cli(argv) if argv is not None else fn()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    if rc:
        raise SystemExit(f"demo: step {name!r} failed with exit code {rc}; see the messages above")


def _totals(stage_dir: Path) -> dict[str, Any]:
    p = stage_dir / "manifest.json"
    if not p.is_file():
        return {}
    t = json.loads(p.read_text())["totals"]
    return {"seen": t["seen"], "written": t["written"], "dropped": t["dropped"], "failed": t["failed"]}


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    sample = out / "sample"
    eng = ["--engine", args.engine]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def generate() -> int:
        if (sample / "ground_truth.jsonl").is_file() and all((sample / ds).is_dir() for ds in args.datasets):
            print(f"sample data already in {sample} (delete it to regenerate)")
            return 0
        from pipelines.sample_data import generate as gen

        # Same seed, same bytes: regenerating (e.g. for a dataset added since) rewrites identical files.
        data = gen(sample, seed=args.seed, size=args.size)
        print(f"sample data: {data.counts} frames -> {sample}")
        return 0

    _step("generate", timings, fn=generate)
    for ds in args.datasets:
        _step(f"extract {ds}", timings, ["extract", "--dataset", ds, "--out", str(out), "--input", str(sample / ds), *eng])

    def codebook() -> int:
        meta = out / "codebook" / "codebook.json"
        if meta.is_file():
            m = json.loads(meta.read_text())
            if m.get("k_requested", m.get("k")) == args.k and abs(float(m.get("tol", -1)) - args.tol) < 1e-9:
                print(f"codebook already in {meta.parent} (K={m['k']}, tol {m['tol']})")
                return 0
        print(f"fitting K={args.k}, tol {args.tol} m: the sample data runs out of distinct segments before K; "
              "the warning below is expected and the codebook keeps the tokens found")  # fmt: skip
        return _cli(["codebook", "--data", str(out), "--k", str(args.k), "--tol", str(args.tol),
                     "--datasets", *args.datasets])  # fmt: skip

    _step("codebook", timings, fn=codebook)
    _step("tokenize", timings, ["tokenize", "--data", str(out), "--datasets", *args.datasets, *eng])
    for ds in args.datasets:
        _step(f"annotate {ds}", timings,
              ["annotate", "--dataset", ds, "--data", str(out), "--annotator", "rules", *eng])  # fmt: skip
    _step("filter + build + card", timings,
          ["build", "--data", str(out), "--datasets", *args.datasets, "--set", f'card.notes="{DEMO_NOTE}"', *eng])  # fmt: skip

    loaded: dict[str, int] = {}

    def load() -> int:
        import datasets

        shards = out / "build" / "shards"
        files = {s: str(shards / f"{s}-*.parquet") for s in ("train", "validation") if any(shards.glob(f"{s}-*.parquet"))}
        # the cache (tens of MB) stays outside build/, the folder `drivevla push` uploads
        ds = datasets.load_dataset("parquet", data_files=files, cache_dir=str(out / HF_CACHE_DIR))
        for split, d in ds.items():
            loaded[split] = len(d)
        row = ds["train"][0]
        img = next(c for c in row["cameras"] if c["name"] == "front")["frames"][-1]["image"]
        print(f"loaded {loaded} rows; first train row {row['sample_id']}: front image {type(img).__name__} "
              f"{img.size}, {len(row['messages'])} messages, think_mode {row['think_mode']}")  # fmt: skip
        return 0

    _step("load with datasets", timings, fn=load)
    total = time.perf_counter() - t0
    print(summary_text(out, args.datasets, timings, loaded, total))
    return 0


def summary_text(out: Path, datasets: list[str], timings: dict[str, float], loaded: dict[str, int], total: float) -> str:
    """The closing summary: counts per stage, timings and where everything is."""
    lines = ["", "=" * 78, f"drivevla demo finished in {total:.1f} s", "", "stage counts (seen / written / dropped / failed):"]
    for stage in ("extract", "tokenize", "annotate", "filter"):
        for ds in datasets:
            t = _totals(out / stage / ds)
            if t:
                lines.append(f"  {stage:<9} {ds:<10} {t['seen']:>6} / {t['written']:>6} / {t['dropped'] or '-'} / {t['failed'] or '-'}")
    b = _totals(out / "build")
    if b:
        lines.append(f"  build     all        {b['seen']:>6} / {b['written']:>6} / {b['dropped'] or '-'} / {b['failed'] or '-'}")
    stats_p = out / "build" / "stats.json"
    if stats_p.is_file():
        st = json.loads(stats_p.read_text())
        lines.append("")
        lines.append("training rows (train / validation):")
        for ds, c in st["stats"]["counts"].items():
            modes = st["stats"]["distributions"].get("think_mode", {}).get(ds, {})
            lines.append(f"  {ds:<10} {c['train']:>5} / {c['validation']:>4}   slow {modes.get('slow', 0)}, fast {modes.get('fast', 0)}")
        for ds, f in st["filter"].items():
            rate = "n/a" if f["acceptance_rate"] is None else f"{100 * f['acceptance_rate']:.0f}%"
            lines.append(f"  filter {ds:<10} {f['accepted']}/{f['slow']} reasoning accepted ({rate}); rejected: {f['rejected_by_reason'] or 'none'}")
        cb = st.get("codebook") or {}
        if cb:
            lines.append(f"  codebook   K={cb.get('k')} (requested {cb.get('k_requested')}), tol {cb.get('tol')} m, coverage {cb.get('coverage'):.4f}" if cb.get('coverage') is not None else f"  codebook   K={cb.get('k')}")
    lines.append(f"  loaded back with datasets: {loaded}")
    lines.append("")
    lines.append("timings:")
    lines += [f"  {k:<24} {v:7.1f} s" for k, v in timings.items()]
    lines.append("")
    lines.append("where things are:")
    for label, rel in (("sample data", "sample"), ("extracted shards", "extract"), ("codebook + report", "codebook"),
                       ("tokenized shards", "tokenize"), ("annotated shards", "annotate"), ("filter verdicts", "filter"),
                       ("training shards", "build/shards"), ("dataset card", "build/README.md"), ("plots", "build/plots")):  # fmt: skip
        lines.append(f"  {label:<18} {out / rel}")
    lines.append("")
    lines.append(f"next: make push REPO=org/name DATA={out}   (needs HF_TOKEN)")
    lines.append("=" * 78)
    return "\n".join(lines)
