"""``drivevla push``: upload the built shards and dataset card to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipelines.hub import DEFAULT_BATCH_FILES, TOKEN_ENV, HubError, push_dataset

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload <data>/build (shards, card, plots) to a Hugging Face dataset repository",
        description=(
            f"Upload the output of `drivevla build` (<data>/build: shards/*.parquet, README.md card, plots/, "
            f"stats.json, manifest.json) to a dataset repository on the Hugging Face Hub with huggingface_hub. "
            f"The token is read from the {TOKEN_ENV} environment variable only and never printed. The repository "
            "is private unless --public. Files already on the Hub with the same content are skipped, the rest is "
            "committed in batches, so rerunning an interrupted push resumes it. A repository whose card or "
            "manifest has a different schema_version is not overwritten unless --force."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--repo", required=True, help="dataset repository id, org/name")
    p.add_argument("--data", required=True, type=Path, help="data root holding build/ (from `drivevla build`)")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--force", action="store_true", help="push even if the remote schema_version differs")
    p.add_argument("--endpoint", default=None, help="Hub endpoint URL (default: huggingface_hub's, or HF_ENDPOINT)")
    p.add_argument("--revision", default="main", help="branch to commit to")
    p.add_argument("--batch-files", type=int, default=DEFAULT_BATCH_FILES, help="files per commit")


def run(args: argparse.Namespace) -> int:
    build = args.data / "build"
    if "/" not in args.repo:
        print(f"error: --repo must be org/name, got {args.repo!r}")
        return 2
    try:
        res = push_dataset(
            build, args.repo, private=not args.public, force=args.force, endpoint=args.endpoint,
            revision=args.revision, batch_files=args.batch_files,
        )  # fmt: skip
    except HubError as exc:
        print(f"error: {exc}")
        return 2
    print(res.format())
    return 0
