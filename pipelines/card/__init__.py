"""Dataset card and plots for a built dataset (DESIGN.md section 8).

:func:`write_card` reads the build shards (counts and distributions come from
the shards themselves), the filter statistics, the build manifest and the
codebook metadata, draws the figures into ``<build>/plots/`` and writes
``<build>/README.md`` plus ``<build>/stats.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.card.plots import future_on_camera, plot_distributions, plot_example
from pipelines.card.render import render_card
from pipelines.card.stats import dataset_stats, schema_table, stage_manifest
from pipelines.core.shards import atomic_write_bytes, list_shards, read_parquet
from pipelines.io.fs import as_path

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
STATS_NAME = "stats.json"
PLOTS_DIR = "plots"
MAX_CANDIDATES_PER_SHARD = 32

__all__ = ["write_card", "pick_examples", "CARD_NAME", "STATS_NAME"]


def _shows_future(row: dict[str, Any], min_points: int = 3) -> bool:
    """Whether at least ``min_points`` future poses land inside the front image (worth a figure)."""
    if row.get("future") is None or not any(c["name"] == "front" for c in row["cameras"]):
        return False
    return int(future_on_camera(row)["inside"].sum()) >= min_points


def pick_examples(build_dir: str | Path, n_slow: int = 3, n_fast: int = 1) -> list[dict[str, Any]]:
    """A few full rows for the card: slow samples from as many datasets as possible, then fast ones.

    Deterministic (shards in name order, rows in shard order); only rows whose
    future is visible in the front camera qualify (a sharp turn leaves the
    camera's field of view).
    """
    chosen: list[dict[str, Any]] = []
    for want_mode, n in (("slow", n_slow), ("fast", n_fast)):
        got = 0
        for pass_ in (0, 1):  # first pass: one per dataset; second: fill up
            for path in list_shards(build_dir):
                if got >= n:
                    break
                taken = {c["sample_id"] for c in chosen}
                have_ds = {c["dataset"] for c in chosen if c["think_mode"] == want_mode}
                thin = read_parquet(path, columns=["sample_id", "dataset", "think_mode"]).to_pylist()
                idx = [
                    i for i, r in enumerate(thin)
                    if r["think_mode"] == want_mode and r["sample_id"] not in taken
                    and (pass_ == 1 or r["dataset"] not in have_ds)
                ]  # fmt: skip
                if not idx:
                    continue
                table = read_parquet(path)
                for i in idx[:MAX_CANDIDATES_PER_SHARD]:
                    row = table.slice(i, 1).to_pylist()[0]
                    if _shows_future(row):
                        chosen.append(row)
                        got += 1
                        break
    return chosen


def write_card(
    build_dir: str | Path,
    filter_dirs: Mapping[str, str | Path],
    codebook_dir: str | Path | None,
    meta: Mapping[str, Any],
    n_examples: int = 4,
) -> Path:
    """Write README.md, stats.json and plots/ into ``build_dir``; return the card's path."""
    build = as_path(build_dir)  # local path or s3:// / gs:// URL
    stats = dataset_stats(build)
    fstats: dict[str, Any] = {}
    for ds, d in filter_dirs.items():
        p = as_path(d) / "filter_stats.json"
        if p.is_file():
            fstats[ds] = json.loads(p.read_text())
    manifest = stage_manifest(build) or {}
    codebook = None
    if codebook_dir is not None and (as_path(codebook_dir) / "codebook.json").is_file():
        codebook = json.loads((as_path(codebook_dir) / "codebook.json").read_text())

    plots: dict[str, list[str]] = {"distributions": [], "examples": []}
    if stats["datasets"]:
        plot_distributions(stats, build / PLOTS_DIR / "distributions.png")
        plots["distributions"].append(f"{PLOTS_DIR}/distributions.png")
    examples = pick_examples(build, n_slow=max(0, n_examples - 1), n_fast=1 if n_examples else 0)
    for i, row in enumerate(examples):
        name = f"{PLOTS_DIR}/example_{i}_{row['dataset']}_{row['think_mode']}.png"
        plot_example(row, build / name)
        plots["examples"].append(name)

    full_meta = dict(meta)
    full_meta.setdefault("num_action_tokens", codebook.get("k") if codebook else None)
    text = render_card(stats, fstats, manifest.get("totals", {}), codebook, schema_table(build), plots, full_meta)
    atomic_write_bytes(build / CARD_NAME, text.encode())
    record = {"stats": stats, "filter": fstats, "build_totals": manifest.get("totals", {}), "meta": full_meta,
              "plots": plots, "codebook": codebook}  # fmt: skip
    atomic_write_bytes(build / STATS_NAME, json.dumps(record, indent=1, sort_keys=True, default=str).encode())
    log.info("card: %s (%d example plots)", build / CARD_NAME, len(examples))
    return build / CARD_NAME
