"""``drivevla`` command line: one entry point, one module per command.

Every ``make`` target is a thin wrapper over a subcommand here. Each command
module in ``pipelines/commands/`` exposes ``register(subparsers)`` and
``run(args) -> int``; modules are imported when the CLI starts so ``--help``
lists them all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipelines.commands.common import help_formatter

COMMANDS = ("generate", "extract", "codebook", "tokenize", "annotate", "build", "push", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drivevla",
        description=(
            "Driving VLA data pipeline: generate sample data, extract datasets to unified shards, "
            "fit the action codebook, annotate reasoning, filter and build training shards, push to the Hub."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pipelines.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pipelines.commands.{name}":
                raise
            continue  # command not part of this build
        before = set(sub.choices)
        module.register(sub)
        for added in set(sub.choices) - before:  # route each new subcommand to its module's run()
            if sub.choices[added].get_default("func") is None:
                sub.choices[added].set_defaults(func=module.run)
            # each default stated once, no absolute checkout paths (pipelines.commands.common)
            sub.choices[added].formatter_class = help_formatter(sub.choices[added].formatter_class)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
