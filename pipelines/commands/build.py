"""``drivevla build``: filter the reasoning, build the training shards, write the dataset card.

One command for DESIGN.md sections 7 and 8, in three resumable steps:

1. filter every annotated dataset (``<data>/annotate/<ds>`` -> ``<data>/filter/<ds>``,
   plus ``filter_stats.json``);
2. build the shards (``<data>/build/shards/{split}-{ds}-{k}-{j}.parquet``);
3. write ``<data>/build/README.md``, ``stats.json`` and ``plots/``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from annotators.filters import FilterConfig
from annotators.judge import JudgeConfig
from pipelines.commands.common import (
    add_engine_args,
    add_input_check_arg,
    add_set_arg,
    as_path,
    check_inputs,
    run_with_engine,
)
from pipelines.config import ConfigError, dump_config, load_config
from pipelines.core.runner import RunSummary, StageMismatchError
from pipelines.io import fs
from pipelines.resources import config_path
from pipelines.stages.build import (
    BuildConfig,
    BuildStage,
    DatasetInputs,
    read_num_action_tokens,
    shard_bytes,
)
from pipelines.stages.filter import FilterStage, FilterStageConfig, write_filter_stats

log = logging.getLogger(__name__)

DEFAULT_CONFIG = config_path("build.yaml")
ANNOTATE_DIR, FILTER_DIR, BUILD_DIR, CODEBOOK_DIR = "annotate", "filter", "build", "codebook"


@dataclass(frozen=True, slots=True)
class CardConfig:
    pretty_name: str = "DriveVLA training data"
    notes: str = ""  # shown at the top of the card (e.g. "synthetic sample data")
    examples: int = 4  # example plots (front camera + projected future + reasoning)


@dataclass(frozen=True, slots=True)
class BuildPipelineConfig:
    """``configs/build.yaml``: the filter, judge, build and card sections."""

    filter: FilterConfig = field(default_factory=FilterConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    card: CardConfig = field(default_factory=CardConfig)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build",
        help="filter reasoning, build training shards and the dataset card",
        description=(
            "Filter every annotated dataset's reasoning (structure, action consistency with the ground-truth "
            "meta-action, length, refusals, few-shot copying, exact/near duplicates, optional LLM judge) into "
            "<data>/filter/<dataset>; join samples, action tokens and accepted reasoning into training rows with "
            "rendered chat messages, split train/validation by scene, and write Parquet shards to "
            "<data>/build/shards; then write the dataset card <data>/build/README.md with stats.json and plots/. "
            "Every step is resumable: finished partitions are skipped on a rerun."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, type=as_path,
                   help="data root (local path, s3://... or gs://...) holding annotate/<dataset> and codebook/")
    add_input_check_arg(p)
    p.add_argument("--datasets", nargs="+", default=None, help="datasets to build (default: every annotated one)")
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None,
        help="config YAML (sections filter, build, card)",
    )  # fmt: skip
    p.add_argument(
        "--on-rejected", choices=("fast", "drop"), default=None,
        help="slow samples whose reasoning was rejected: keep as fast samples or drop them (config default: fast)",
    )  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=None, help="share of scenes in validation (config default 0.1)")
    p.add_argument("--judge", action="store_true", help="enable the LLM judge pass (judge.enabled=true)")
    p.add_argument("--skip-card", action="store_true", help="do not write the dataset card and plots")
    p.add_argument(
        "--overwrite", action="store_true",
        help="delete earlier filter/ and build/ outputs first (needed after changing the config or the inputs)",
    )  # fmt: skip
    add_set_arg(p)
    add_engine_args(p, default="local")


def config_from_args(args: argparse.Namespace) -> BuildPipelineConfig:
    """Config file, then ``--set`` overrides, then the explicit flags."""
    cfg = load_config(BuildPipelineConfig, args.config, args.overrides)
    b = cfg.build
    try:
        if args.on_rejected is not None:
            b = replace(b, on_rejected=args.on_rejected)
        if args.val_fraction is not None:
            b = replace(b, val_fraction=args.val_fraction)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    j = cfg.judge
    if getattr(args, "judge", False):
        j = replace(j, enabled=True)
    return replace(cfg, build=b, judge=j)


def annotated_datasets(data: Path, wanted: list[str] | None) -> list[str]:
    """Datasets with annotation output (all of them, or ``wanted``, which must exist)."""
    root = data / ANNOTATE_DIR
    have = sorted(p.name for p in root.iterdir() if (p / "shards").is_dir()) if root.is_dir() else []
    if wanted:
        missing = [d for d in wanted if d not in have]
        if missing:
            raise FileNotFoundError(f"no annotated data for {missing} under {root} (have {have}); run `drivevla annotate`")
        return list(wanted)
    if not have:
        raise FileNotFoundError(f"no annotated datasets under {root}; run `drivevla annotate` first")
    return have


def run_build(data: Path, datasets: list[str], cfg: BuildPipelineConfig, args: Any) -> dict[str, Any]:
    """Filter, build and card; returns the summaries and paths (used by ``drivevla demo`` too)."""
    out: dict[str, Any] = {"filter": {}, "filter_stats": {}}
    for ds in datasets:
        fdir = data / FILTER_DIR / ds
        summary = run_with_engine(FilterStage(data / ANNOTATE_DIR / ds, FilterStageConfig(cfg.filter, cfg.judge)), fdir, args)
        out["filter"][ds] = summary
        out["filter_stats"][ds] = write_filter_stats(fdir)
        if not summary.ok:
            return out
    k = read_num_action_tokens(data / CODEBOOK_DIR)
    inputs = [DatasetInputs(ds, str(data / ANNOTATE_DIR / ds), str(data / FILTER_DIR / ds)) for ds in datasets]
    build_dir = data / BUILD_DIR
    stage = BuildStage(inputs, cfg.build, k)
    out["build"] = run_with_engine(
        stage, build_dir, args, max_rows=cfg.build.shard_max_rows, max_bytes=shard_bytes(cfg.build)
    )
    dump_config(cfg, build_dir / "build_config.yaml")
    if out["build"].ok and not getattr(args, "skip_card", False):
        from annotators.training_prompt import PROMPT_VERSION
        from pipelines.card import write_card
        from pipelines.stages.build import BUILD_VERSION
        from schemas.sample import SCHEMA_VERSION

        meta = {
            "pretty_name": cfg.card.pretty_name,
            "notes": cfg.card.notes,
            "schema_version": SCHEMA_VERSION,
            "build_version": BUILD_VERSION,
            "prompt_version": PROMPT_VERSION,
            "num_action_tokens": k,
            "judge_enabled": cfg.judge.enabled,
        }
        out["card"] = write_card(
            build_dir, {ds: data / FILTER_DIR / ds for ds in datasets}, data / CODEBOOK_DIR, meta, cfg.card.examples
        )
    return out


def format_filter(ds: str, summary: RunSummary, stats: dict[str, Any]) -> str:
    rate = stats["acceptance_rate"]
    lines = [
        f"filter {ds}: {stats['rows']} rows, {stats['fast']} fast, {stats['slow']} slow: "
        f"{stats['accepted']} accepted, {stats['rejected']} rejected"
        + ("" if rate is None else f" ({100 * rate:.1f}% accepted)")
        + f" ({summary.seconds:.1f} s) -> {summary.out_dir}"
    ]
    lines += [f"  rejected {k:<32} {v}" for k, v in stats["rejected_by_reason"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    data: Path = args.data
    try:
        datasets = annotated_datasets(data, args.datasets)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 2
    if not check_inputs([data / ANNOTATE_DIR / ds for ds in datasets], args, what="annotated input"):
        return 2
    if args.overwrite:
        for d in [data / FILTER_DIR / ds for ds in datasets] + [data / BUILD_DIR]:
            fs.remove_tree(d)
    try:
        res = run_build(data, datasets, cfg, args)
    except (StageMismatchError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    for ds, summary in res["filter"].items():
        print(format_filter(ds, summary, res["filter_stats"][ds]))
        if not summary.ok:
            print(summary.format())
            return 1
    print(res["build"].format())
    if "card" in res:
        print(f"card: {res['card']}")
    return 0 if res["build"].ok else 1
