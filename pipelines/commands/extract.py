"""``drivevla extract``: a dataset on disk -> unified sample shards under ``<out>/extract/<dataset>/``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipelines.commands.common import (
    add_engine_args,
    add_set_arg,
    as_path,
    exit_code,
    run_with_engine,
)
from pipelines.config import ConfigError, dump_config, load_config
from pipelines.io import fs
from pipelines.resources import config_path
from pipelines.sources import SOURCES, SourceError

log = logging.getLogger(__name__)

CONFIG_DIR = config_path("extract")  # the checkout's configs/ or the installed drivevla_configs


def default_config(dataset: str) -> Path:
    """The shipped config of ``dataset`` (found next to the package, not the working directory)."""
    return CONFIG_DIR / f"{dataset}.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract",
        help="extract a dataset (WOD-E2E, nuScenes, nuPlan/NAVSIM, Bench2Drive) into unified sample shards",
        description=(
            "Read a dataset in its own on-disk format and write unified, validated samples (camera clips "
            "resized once to the pixel budget, ego history/future in the current ego frame, velocity, "
            "acceleration, command, meta-action labels, objects / preference trajectories) as Parquet shards "
            "under OUT/extract/DATASET/. Finished partitions are skipped on a rerun; every sample is counted "
            "as written, dropped (with a reason) or failed (with the file and cause)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=sorted(SOURCES), help="which source to read")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="extraction YAML (default: configs/extract/DATASET.yaml shipped with the package)",
    )
    p.add_argument(
        "--out", type=as_path, required=True,
        help="data root (local path, s3://... or gs://...); output goes to OUT/extract/DATASET/"
    )
    p.add_argument(
        "--input",
        default=None,
        help="dataset root (local path, s3://... or gs://...), overriding the config's `input` (default "
        "there: data/sample/DATASET, as written by `drivevla generate --out data/sample`)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete OUT/extract/DATASET/ first instead of resuming",
    )
    p.add_argument("--shard-rows", type=int, default=256, help="maximum rows per Parquet shard")
    add_set_arg(p)
    add_engine_args(p, default="ray")


def run(args: argparse.Namespace) -> int:
    from pipelines.sources.base import ExtractConfig
    from pipelines.stages.extract import ExtractStage

    config = args.config or default_config(args.dataset)
    overrides = list(args.overrides)
    if args.input is not None:
        overrides.append(f"input={args.input}")
    try:
        cfg = load_config(ExtractConfig, config, overrides)
        if cfg.dataset != args.dataset:
            raise ConfigError(f"{config} is a config for {cfg.dataset!r}, not {args.dataset!r}")
        stage = ExtractStage(cfg)  # checks the input exists before any work
    except (ConfigError, SourceError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    out = fs.join(args.out, "extract", args.dataset)
    if args.overwrite:
        fs.remove_tree(out)
    fs.makedirs(out)
    dump_config(cfg, out / "config.yaml")
    summary = run_with_engine(stage, out, args, max_rows=args.shard_rows)
    return exit_code(summary)
