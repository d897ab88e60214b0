"""``drivevla push``: upload the built shards and dataset card to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipelines.commands.common import add_input_check_arg, check_inputs
from pipelines.hub import DEFAULT_BATCH_FILES, TOKEN_ENV, HubError, push_dataset

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload <data>/build (shards, card, plots) and the codebook to a Hugging Face dataset repository",
        description=(
            f"Upload the output of `drivevla build` (<data>/build: shards/*.parquet, README.md card, plots/, "
            f"stats.json, manifest.json) and the codebook that decodes its action tokens (<data>/codebook -> "
            f"codebook/codebook.safetensors + codebook/codebook.json) to a dataset repository on the Hugging Face "
            f"Hub with huggingface_hub. The token comes from huggingface_hub's standard lookup ({TOKEN_ENV}, "
            "then the token saved by `hf auth login`) and is never printed. The repository is private unless "
            "--public; a --revision branch that does not exist is created. Files already on the Hub with the same "
            "content are skipped, the rest is committed in batches (card last), so rerunning an interrupted push "
            "resumes it. A repository whose card or manifest has a different schema_version is not overwritten "
            "unless --force."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--repo", required=True, help="dataset repository id, org/name")
    p.add_argument("--data", required=True, type=str, help="local data root holding build/ (from `drivevla build`)")
    p.add_argument(
        "--codebook", type=Path, default=None,
        help="codebook directory the build was tokenized with (default: <data>/codebook)",
    )  # fmt: skip
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--force", action="store_true", help="push even if the remote schema_version differs")
    p.add_argument("--endpoint", default=None, help="Hub endpoint URL (default: huggingface_hub's, or HF_ENDPOINT)")
    p.add_argument("--revision", default="main", help="branch to commit to (created if missing)")
    p.add_argument("--batch-files", type=int, default=DEFAULT_BATCH_FILES, help="files per commit")
    add_input_check_arg(p)


def run(args: argparse.Namespace) -> int:
    if "/" not in args.repo:
        print(f"error: --repo must be org/name, got {args.repo!r}")
        return 2
    if "://" in args.data:  # huggingface_hub uploads local files; a Path would also collapse the URL
        print(f"error: push uploads a local build directory; copy {args.data}/build to local disk first")
        return 2
    data = Path(args.data)
    build = data / "build"
    if not check_inputs([build], args, what="build"):  # never publish a build with missing partitions
        return 2
    try:
        res = push_dataset(
            build, args.repo, codebook_dir=args.codebook or data / "codebook", private=not args.public, force=args.force, endpoint=args.endpoint,
            revision=args.revision, batch_files=args.batch_files,
        )  # fmt: skip
    except HubError as exc:
        print(f"error: {exc}")
        return 2
    print(res.format())
    return 0
