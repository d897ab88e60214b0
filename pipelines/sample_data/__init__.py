"""Embedded sample data: small but valid WOD-E2E, nuScenes, NAVSIM and Bench2Drive datasets from a simulated world.

Tests and ``make demo`` use it; nothing is downloaded. ``generate`` writes::

    <out>/waymo_e2e/{training,validation,test}_0000.tfrecord-NNNNN-of-MMMMM
    <out>/nuscenes/v1.0-mini/*.json, samples/, sweeps/, maps/, can_bus/
    <out>/nuplan/navsim_logs/<split>/<log>.pkl, sensor_blobs/<split>/<log>/CAM_*/<hex>.jpg
    <out>/bench2drive/<Scenario>/<Town>_Route<N>_Weather<N>/anno/NNNNN.json.gz, camera/rgb_*/NNNNN.jpg
    <out>/ground_truth.jsonl   one line per generated frame of every dataset

Output is a pure function of ``(seed, size, datasets, image_size)``: no wall
clock, fixed JPEG settings, sorted JSON keys.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipelines.sample_data.common import SIZES, SizeSpec, size_spec

log = logging.getLogger(__name__)

DATASETS = ("waymo_e2e", "nuscenes", "nuplan", "bench2drive")

__all__ = ["DATASETS", "SIZES", "SampleData", "SizeSpec", "generate"]


@dataclass(frozen=True)
class SampleData:
    """Where :func:`generate` put each dataset (None for datasets not generated)."""

    root: Path
    waymo_e2e: Path | None
    nuscenes: Path | None
    nuscenes_version: str
    nuplan: Path | None
    ground_truth: Path
    counts: dict[str, int]  # frames written per dataset
    bench2drive: Path | None = None

    def ground_truth_records(self) -> list[dict]:
        """The ground-truth lines as dicts."""
        with open(self.ground_truth) as f:
            return [json.loads(line) for line in f if line.strip()]


def generate(
    out_dir: Path | str,
    *,
    seed: int = 0,
    size: str = "tiny",
    datasets: Iterable[str] = DATASETS,
    image_size: tuple[int, int] | None = None,
) -> SampleData:
    """Write the sample datasets under ``out_dir`` and return their locations.

    ``size`` is ``"tiny"`` (tests: a few seconds) or ``"default"`` (demo);
    ``image_size`` (width, height) overrides the size's camera resolution.
    Existing files at the same paths are overwritten.
    """
    from pipelines.sample_data.bench2drive import write_bench2drive
    from pipelines.sample_data.nuplan import write_nuplan
    from pipelines.sample_data.nuscenes import VERSION, write_nuscenes
    from pipelines.sample_data.waymo import write_waymo

    datasets = tuple(datasets)
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; valid: {list(DATASETS)}")
    spec = size_spec(size, image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = {
        "waymo_e2e": write_waymo,
        "nuscenes": write_nuscenes,
        "nuplan": write_nuplan,
        "bench2drive": write_bench2drive,
    }
    records: list[dict] = []
    counts: dict[str, int] = {}
    for name in DATASETS:  # fixed order, whatever order the caller gave
        if name not in datasets:
            continue
        start = time.perf_counter()
        recs = writers[name](out / name, seed, spec)
        counts[name] = len(recs)
        records.extend(recs)
        log.info(
            "sample data: %s: %d frames in %.2f s", name, len(recs), time.perf_counter() - start
        )
    gt_path = out / "ground_truth.jsonl"
    gt_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return SampleData(
        root=out,
        waymo_e2e=out / "waymo_e2e" if "waymo_e2e" in datasets else None,
        nuscenes=out / "nuscenes" if "nuscenes" in datasets else None,
        nuscenes_version=VERSION,
        nuplan=out / "nuplan" if "nuplan" in datasets else None,
        ground_truth=gt_path,
        counts=counts,
        bench2drive=out / "bench2drive" if "bench2drive" in datasets else None,
    )
