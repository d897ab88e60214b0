"""``drivevla generate``: write the embedded sample datasets (WOD-E2E, nuScenes, NAVSIM, Bench2Drive)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, e.g. 320x200, got {text!r}"
        ) from None
    return w, h


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand."""
    from pipelines.sample_data import DATASETS, SIZES

    p = subparsers.add_parser(
        "generate",
        help="write small sample datasets in the real on-disk formats from a simulated world",
        description=(
            "Simulate drives (roads with curves, intersections, lane changes, stops; other cars and "
            "pedestrians), render calibrated cameras and write them as WOD-E2E TFRecords, a nuScenes "
            "v1.0-mini database, NAVSIM logs + sensor blobs and Bench2Drive clips (10 Hz anno/*.json.gz in "
            "CARLA's left-handed frames + six JPEG cameras), plus ground_truth.jsonl with the "
            "world ego pose, velocity, acceleration and command of every frame. Same seed, same bytes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the world")
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="default",
        help="tiny: a few dozen frames per dataset at 64x40 px (tests); default: a few hundred at 320x200 (demo)",
    )
    p.add_argument(
        "--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="datasets to write"
    )
    p.add_argument(
        "--image-size",
        type=_image_size,
        default=None,
        metavar="WxH",
        help="camera resolution override",
    )


def run(args: argparse.Namespace) -> int:
    """Generate and print one JSON line: frames per dataset, bytes written, seconds."""
    from pipelines.sample_data import generate

    start = time.perf_counter()
    sd = generate(
        args.out, seed=args.seed, size=args.size, datasets=args.datasets, image_size=args.image_size
    )
    seconds = time.perf_counter() - start
    sizes = {}
    for name in sd.counts:
        root = getattr(sd, name)
        sizes[name] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(
        json.dumps(
            {"out": str(sd.root), "frames": sd.counts, "bytes": sizes, "seconds": round(seconds, 2)}
        )
    )
    return 0
