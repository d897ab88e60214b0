"""Options shared by the stage commands: engine selection, overrides, input checks, summaries.

Path arguments use ``type=as_path`` (:func:`pipelines.io.fs.as_path`): local
paths stay :class:`pathlib.Path`, ``s3://`` / ``gs://`` URLs keep their scheme
(``Path("gs://b/x")`` would collapse it to ``gs:/b/x``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from pipelines.core.runner import (
    ENGINES,
    IncompleteInputError,
    RunSummary,
    check_complete,
    run_stage,
)
from pipelines.core.stage import Stage
from pipelines.io.fs import AnyPath, as_path

__all__ = ["as_path", "add_engine_args", "add_set_arg", "add_input_check_arg", "check_inputs", "exit_code"]

log = logging.getLogger(__name__)


def add_engine_args(parser: argparse.ArgumentParser, default: str = "ray") -> None:
    """``--engine``, ``--workers`` and ``--beam-options`` (which takes the rest of the line)."""
    g = parser.add_argument_group("execution")
    # "%(default).0s" prints nothing; it only stops ArgumentDefaultsHelpFormatter from
    # appending "(default: None)" where the help text already says what happens.
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default=default,
        help="where partitions run: local (this process), ray (local Ray, or the cluster in RAY_ADDRESS), "
        "beam (Apache Beam; DirectRunner unless --beam-options says otherwise). Default: %(default)s",
    )
    g.add_argument("--workers", type=int, default=None, help="parallel workers (Ray); default: all CPUs%(default).0s")
    g.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (e.g. ray://head:10001 or auto); default: $RAY_ADDRESS, else a local Ray%(default).0s",
    )
    g.add_argument(
        "--beam-options",
        nargs=argparse.REMAINDER,
        default=[],
        help="Beam pipeline options, e.g. --runner=DataflowRunner --project=P --region=R "
        "--temp_location=gs://... (must come last on the command line)%(default).0s",
    )


_CHECKOUT = Path(__file__).resolve().parents[2]


def help_formatter(base: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """``base`` with help texts that state each default once and show checkout paths relative.

    ``ArgumentDefaultsHelpFormatter`` appends "(default: X)" even where the help already
    says what the default is, and prints defaults like ``configs/x.yaml`` as absolute paths
    of wherever the code is installed.
    """

    class Formatter(base):  # type: ignore[misc, valid-type]
        def _get_help_string(self, action: argparse.Action) -> str | None:
            text = action.help or ""
            if "default" in text.lower() or action.default in (None, False, [], "", argparse.SUPPRESS):
                return text
            return super()._get_help_string(action)

        def _expand_help(self, action: argparse.Action) -> str:
            d = action.default
            if isinstance(d, Path) and d.is_absolute() and d.is_relative_to(_CHECKOUT):
                action = copy.copy(action)
                action.default = d.relative_to(_CHECKOUT)
            return super()._expand_help(action)

    Formatter.__name__ = f"Plain{base.__name__}"
    return Formatter


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set image.max_pixels=200704 (repeatable)",
    )


def add_input_check_arg(parser: argparse.ArgumentParser) -> None:
    """``--allow-incomplete``: accept an upstream stage whose manifest is not complete."""
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="use upstream stage outputs even when their manifest is missing or incomplete (missing "
        "partitions are then missing here too); by default such an input is refused with exit code 2",
    )


def check_inputs(dirs: Iterable[AnyPath], args: argparse.Namespace, what: str = "input") -> bool:
    """Check that every upstream stage directory is complete; logs the reason and returns False if not."""
    allow = bool(getattr(args, "allow_incomplete", False))
    for d in dirs:
        try:
            check_complete(d, allow_incomplete=allow, what=what)
        except IncompleteInputError as exc:
            log.error("%s", exc)
            return False
    return True


def run_with_engine(stage: Stage, out: Path, args: argparse.Namespace, **kwargs) -> RunSummary:
    """Run ``stage`` with the engine options of ``args`` and log the summary."""
    if getattr(args, "ray_address", None):
        os.environ["RAY_ADDRESS"] = args.ray_address  # read by pipelines.core.ray_engine.ensure_ray
    return run_stage(
        stage,
        out,
        engine=args.engine,
        num_workers=getattr(args, "workers", None),
        beam_options=list(getattr(args, "beam_options", []) or []),
        **kwargs,
    )


def exit_code(summary: RunSummary) -> int:
    """0 when every partition finished (failed samples are counted, not fatal); 1 if any crashed
    or finished without a completion marker the driver can see (``summary.missing``)."""
    print(summary.format())
    return 0 if summary.ok else 1
