"""``drivevla codebook``: fit the action codebook on extracted data and write its report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipelines.commands.common import add_input_check_arg, as_path, check_inputs
from pipelines.config import ConfigError, load_config
from pipelines.resources import config_path
from tokenizer.fit import CodebookConfig, fit_codebook

log = logging.getLogger(__name__)

DEFAULT_CONFIG = config_path("codebook.yaml")
CODEBOOK_DIR = "codebook"  # <data>/codebook


def parse_mix(text: str) -> dict[str, float]:
    """``"waymo_e2e=1,nuscenes=0.5"`` -> ``{"waymo_e2e": 1.0, "nuscenes": 0.5}``."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix item {item!r} is not NAME=WEIGHT") from None
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "codebook",
        help="fit the action codebook (K-disk) on extracted futures",
        description=(
            "Fit the action codebook by K-disk clustering (DESIGN.md section 4) on the 0.5 s segments of the "
            "futures in <data>/extract/<dataset>/shards, write codebook.safetensors + codebook.json, and a "
            "report (coverage, held-out round-trip ADE/FDE per dataset, token usage, PNG plots) into --out. "
            "On small data with fewer distinct segments than K the fit stops early with a warning; the "
            "codebook then has fewer tokens."
        ),
    )
    p.add_argument(
        "--data", required=True, type=as_path,
        help="data root (local path, s3://... or gs://...) holding extract/<dataset>/shards"
    )
    p.add_argument(
        "--out", type=as_path, default=None, help="output directory (default: <data>/codebook)"
    )
    p.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None,
        help="config YAML with the keys of tokenizer.fit.CodebookConfig (default: configs/codebook.yaml "
        "of this checkout; built-in defaults, identical to it, when absent)",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="datasets to read (default: every extracted one)",
    )
    p.add_argument(
        "--mix", type=parse_mix, default=None, help="sampling weights, e.g. waymo_e2e=1,nuscenes=1"
    )
    p.add_argument("--k", type=int, default=None, help="number of tokens (config default 2048)")
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="K-disk radius in m, mean corner distance (default 0.05)",
    )
    p.add_argument(
        "--max-segments",
        type=int,
        default=None,
        help="segments sampled for the fit (default 2048000)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of sampling, held-out split and K-disk (default 0)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set heldout_fraction=0.1 (repeatable)",
    )
    add_input_check_arg(p)


def config_from_args(args: argparse.Namespace) -> CodebookConfig:
    """The config file, then ``--set`` overrides, then the explicit flags."""
    if args.config is None:
        log.info("no config file given or found; using the built-in CodebookConfig defaults")
    cfg = load_config(CodebookConfig, args.config, args.overrides)
    flags = {"k": args.k, "tol": args.tol, "max_segments": args.max_segments, "seed": args.seed}
    changes = {k: v for k, v in flags.items() if v is not None}
    if args.datasets:
        changes["datasets"] = list(args.datasets)
    if args.mix is not None:
        changes["mix"] = args.mix
    if not changes:
        return cfg
    from dataclasses import replace

    try:
        return replace(cfg, **changes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    from tokenizer.segments import dataset_dirs

    dirs = dataset_dirs(args.data, cfg.datasets)  # FileNotFoundError names what is missing
    if not check_inputs(dirs.values(), args, what="extracted input"):
        return 2
    out = args.out or args.data / CODEBOOK_DIR
    codebook, report = fit_codebook(args.data, cfg, out)
    overall = report["overall"]
    print(
        f"codebook: K={codebook.k} (requested {cfg.k}) from {codebook.meta.segment_count} segments, "
        f"coverage {codebook.meta.coverage:.4f}; held-out ADE "
        + (
            f"{overall['ade_m']:.3f} m over {overall['futures']} futures"
            if overall.get("futures")
            else "n/a"
        )
        + f" -> {out}"
    )
    return 0
