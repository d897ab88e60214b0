"""``drivevla tokenize``: the ``action_tokens`` of extracted samples, with a fitted codebook, as a token table."""

from __future__ import annotations

import argparse
import logging

from pipelines.commands.common import (
    add_engine_args,
    add_input_check_arg,
    as_path,
    check_inputs,
    run_with_engine,
)
from pipelines.core.runner import StageMismatchError
from pipelines.io import fs
from pipelines.stages.tokenize import TokenizeStage
from tokenizer.segments import dataset_dirs

log = logging.getLogger(__name__)

TOKENIZE_DIR = "tokenize"  # <data>/tokenize/<dataset>


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help="encode every extracted future as action_tokens (codebook ids) in a token table",
        description=(
            "Encode every extracted sample's future with the action codebook (rollout-aware greedy) and "
            "write a token table to <out>/<dataset>/shards: one shard per group of extracted shards (about "
            "8,192 rows), with the columns source_shard, sample_id and action_tokens (int16 [10]), rows in "
            "the extracted order. The camera frames are "
            "neither read nor rewritten; annotate joins the tokens to the extracted rows by sample_id "
            "(and refuses tokens that no longer match them). Rows without a future (test split) are dropped "
            "with reason no_future (they cannot be tokenized). Resumable: finished groups are skipped "
            "on a rerun."
        ),
    )
    p.add_argument(
        "--data",
        required=True,
        type=as_path,
        help="data root (local path, s3://... or gs://...) holding extract/<dataset>/shards",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="datasets to tokenize (default: every extracted one)",
    )
    p.add_argument(
        "--codebook",
        type=as_path,
        default=None,
        help="codebook directory or file (default: <data>/codebook)",
    )
    p.add_argument(
        "--out", type=as_path, default=None, help=f"output root (default: <data>/{TOKENIZE_DIR})"
    )
    p.add_argument(
        "--overwrite", action="store_true",
        help="delete each dataset's token table first instead of resuming (after a codebook refit or a new extract)",
    )  # fmt: skip
    add_input_check_arg(p)
    add_engine_args(p, default="local")


def run(args: argparse.Namespace) -> int:
    codebook = args.codebook or args.data / "codebook"
    out_root = args.out or args.data / TOKENIZE_DIR
    rc = 0
    dirs = dataset_dirs(args.data, args.datasets)
    if not check_inputs(dirs.values(), args, what="extracted input"):
        return 2
    for name, in_dir in dirs.items():
        stage = TokenizeStage(in_dir, codebook)
        if args.overwrite:
            fs.remove_tree(out_root / name)
        try:
            summary = run_with_engine(stage, out_root / name, args)
        except StageMismatchError as exc:  # another codebook, extract dir or an older layout
            log.error("%s; to replace it: drivevla tokenize --data %s --datasets %s --overwrite",
                      exc, args.data, name)  # fmt: skip
            return 2
        print(summary.format())
        rc = rc or (0 if summary.ok else 1)
    return rc
