"""The dataset card (README.md): YAML front matter for the Hub, then the facts of this build."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from pipelines.stages.build import SPLITS

LICENCES: dict[str, tuple[str, str]] = {
    "nuscenes": (
        "nuScenes (Motional)",
        "nuScenes is released under CC BY-NC-SA 4.0 together with the nuScenes Terms of Use "
        "(non-commercial use). Check the terms at https://www.nuscenes.org/terms-of-use before using or "
        "redistributing derived data.",
    ),
    "waymo_e2e": (
        "Waymo Open Dataset - End-to-End Driving (WOD-E2E)",
        "The Waymo Open Dataset is licensed under the Waymo Open Dataset License Agreement for "
        "Non-Commercial Use. Check the terms at https://waymo.com/open/terms before using or redistributing "
        "derived data.",
    ),
    "nuplan": (
        "nuPlan via NAVSIM / OpenScene",
        "nuPlan data is subject to the nuPlan dataset license (non-commercial); NAVSIM / OpenScene "
        "annotations are released under CC BY-NC-SA 4.0. Check the terms at https://www.nuplan.org and "
        "https://github.com/autonomousvision/navsim before using or redistributing derived data.",
    ),
    # Thinklab-SJTU/Bench2Drive README "License": "All assets and code are under the CC-BY-NC-ND unless
    # specified otherwise"; its LICENSE file is CC BY-NC-ND 4.0 (Attribution-NonCommercial-NoDerivatives).
    "bench2drive": (
        "Bench2Drive (Thinklab-SJTU, CARLA)",
        "Bench2Drive's assets and code are released under CC BY-NC-ND 4.0 (non-commercial, NO DERIVATIVES) "
        "unless specified otherwise. Training shards built from it are adapted material, which that licence does "
        "not permit sharing: do not push such a build to a public repository without the authors' permission. "
        "Check https://github.com/Thinklab-SJTU/Bench2Drive before using or redistributing derived data.",
    ),
}


# Hub task categories (the Hub's fixed list): camera clips + text prompt in, text (reasoning + action tokens) out.
TASK_CATEGORIES = ["robotics", "image-text-to-text"]


def front_matter(stats: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """YAML header for the Hub.

    ``configs``: ``default`` (every source, the first, so a plain
    ``load_dataset(repo)`` gets it) plus one config per source dataset (the
    sources have different licences: load only those whose terms you accept);
    each lists only the splits that have shards. ``task_categories``, and our
    versions under ``drivevla``.
    """
    splits = [s for s in SPLITS if stats["files"].get(s)]
    configs = [{"config_name": "default", "data_files": [{"split": s, "path": f"shards/{s}-*.parquet"} for s in splits]}]
    for ds in stats["datasets"]:
        have = [s for s in splits if stats["counts"].get(ds, {}).get(s)]
        if have:
            configs.append({"config_name": ds, "data_files": [{"split": s, "path": f"shards/{s}-{ds}-*.parquet"} for s in have]})
    header = {
        "license": "other",
        "license_name": "source-dataset-licences",
        "pretty_name": meta.get("pretty_name", "DriveVLA training data"),
        "task_categories": TASK_CATEGORIES,
        "tags": ["autonomous-driving", "vision-language-action", "trajectory-planning", "chain-of-thought"],
        "size_categories": [_size_category(sum(stats["total"].values()))],
        "configs": configs,
        "drivevla": {k: meta[k] for k in ("schema_version", "build_version", "prompt_version") if k in meta}
        | {"datasets": list(stats["datasets"]), "num_action_tokens": meta.get("num_action_tokens")},
    }
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _pct(n: int, d: int) -> str:
    return f"{n} ({100.0 * n / d:.1f}%)" if d else str(n)


# Whether each source's images are rectified (pinhole) or carry a lens model in `distortion_model`.
IMAGES_RECTIFIED = {
    "nuscenes": (True, "nuScenes images are undistorted and rectified (nuscenes-devkit issue #120)"),
    "nuplan": (False, "nuPlan/NAVSIM images are not rectified; OpenCV coefficients (k1, k2, p1, p2, k3) per camera"),
    "waymo_e2e": (False, "WOD images are not rectified (waymo-open-dataset issue #53); OpenCV coefficients per camera"),
    "bench2drive": (True, "CARLA renders ideal pinhole images"),
}


def _lens_text(datasets: Sequence[str]) -> str:
    """One line per dataset: rectified images, or the lens model to apply when projecting."""
    lines = [
        "Lens distortion: `cameras[].distortion_model` / `distortion` hold the lens model of images that are not "
        "rectified (null for rectified, pinhole images); project with it (e.g. `cv2.projectPoints`) or undistort "
        "first.\n"
    ]
    for ds in datasets:
        rectified, why = IMAGES_RECTIFIED.get(ds, (None, "not recorded for this source"))
        state = "rectified" if rectified else ("not rectified" if rectified is False else "unknown")
        lines.append(f"- `{ds}`: {state} ({why})")
    return "\n".join(lines) + "\n"


def render_card(
    stats: Mapping[str, Any],
    filter_stats: Mapping[str, Mapping[str, Any]],
    build_totals: Mapping[str, Any],
    codebook: Mapping[str, Any] | None,
    schema: Sequence[tuple[str, str]],
    plots: Mapping[str, Sequence[str]],
    meta: Mapping[str, Any],
) -> str:
    """The whole README.md as a string."""
    ds_list = list(stats["datasets"])
    s: list[str] = [front_matter(stats, meta), f"# {meta.get('pretty_name', 'DriveVLA training data')}\n"]
    s.append(
        "Training data for vision-language-action driving models in the AutoVLA style: multi-camera clips, "
        "ego state, a 5 s future as 10 discrete action tokens, and for *slow thinking* samples a filtered "
        "chain of thought (scene, critical objects, intent, meta-action). Each row also carries the rendered "
        "chat `messages` from the project's single prompt builder (`annotators/training_prompt.py`, "
        f"prompt version {meta.get('prompt_version')}).\n"
    )
    if meta.get("notes"):
        s.append(f"> **Note:** {meta['notes']}\n")

    s.append("## Sources and licences\n")
    s.append(
        "This dataset is derived data. You must respect the licence of every source it was built from. Each "
        "source is also its own config (`load_dataset(repo, \"<source>\")`), so you can load only the sources "
        "whose terms you accept:\n"
    )
    for ds in ds_list:
        title, text = LICENCES.get(ds, (ds, "Check the licence of this source before use."))
        s.append(f"- **{title}** (`{ds}`): {text}")
    s.append(
        "\nThe reasoning text was generated by the annotator recorded in `annotation_provenance` "
        "(a VLM's terms of use may apply as well). This card does not grant any rights.\n"
    )

    s.append("## Counts\n")
    rows = [[ds, stats["counts"][ds]["train"], stats["counts"][ds]["validation"], stats["counts"][ds]["total"]] for ds in ds_list]
    tot = stats["total"]
    rows.append(["**all**", tot["train"], tot["validation"], sum(tot.values())])
    s.append(_table(["dataset", "train", "validation", "total"], rows))
    s.append(
        "\nThe split is by scene: a scene's split is fixed by a hash of `dataset/scene_id`, so no scene is in "
        "both splits. Scenes per split: "
        + ", ".join(f"{ds} {v['train']}/{v['validation']}" for ds, v in stats["scenes"].items())
        + " (train/validation).\n"
    )
    dropped = build_totals.get("dropped") or {}
    failed = build_totals.get("failed") or {}
    if dropped or failed:
        s.append("Samples not in the shards (build stage):\n")
        s.append(_table(["outcome", "reason", "samples"], [["dropped", k, v] for k, v in dropped.items()] + [["failed", k, v] for k, v in failed.items()]))
        s.append("")

    s.append("## Thinking modes and reasoning quality\n")
    mode_rows = []
    for ds in ds_list:
        tm = stats["distributions"].get("think_mode", {}).get(ds, {})
        n = sum(tm.values())
        demoted = sum(stats["demoted_to_fast"].get(ds, {}).values())
        mode_rows.append([ds, _pct(tm.get("slow", 0), n), _pct(tm.get("fast", 0), n), demoted])
    s.append(_table(["dataset", "slow", "fast", "slow demoted to fast (rejected reasoning)"], mode_rows))
    s.append(
        "\nEvery slow-thinking reasoning was filtered: four parts present, final action equal to the "
        "ground-truth meta-action (after synonym normalisation), length bounds, no refusals, no copying of "
        "the annotator's few-shot examples, no exact or near duplicates (MinHash on word shingles)"
        + (", and a second-pass LLM judge" if meta.get("judge_enabled") else "; the optional LLM judge was off")
        + ". Rejected samples keep their reasons in `filter_reasons`.\n"
    )
    frows = []
    for ds in ds_list:
        f = filter_stats.get(ds)
        if not f:
            continue
        rate = "n/a" if f.get("acceptance_rate") is None else f"{100 * f['acceptance_rate']:.1f}%"
        reasons = ", ".join(f"{k} {v}" for k, v in f["rejected_by_reason"].items()) or "none"
        frows.append([ds, f["slow"], f["accepted"], f["rejected"], rate, reasons])
    if frows:
        s.append(_table(["dataset", "reasonings", "accepted", "rejected", "acceptance", "rejections by reason"], frows))
        s.append("\n(A rejected reasoning can have several reasons; counts are over all annotated samples of the dataset.)\n")

    s.append("## Meta-actions and commands\n")
    for col, title in (("meta_lateral", "Lateral meta-action"), ("meta_longitudinal", "Longitudinal meta-action"), ("command", "Driving command")):
        by_ds = stats["distributions"].get(col, {})
        labels = sorted({k for c in by_ds.values() for k in c})
        s.append(f"**{title}**\n")
        s.append(_table([col, *ds_list], [[lab, *(by_ds.get(ds, {}).get(lab, 0) for ds in ds_list)] for lab in labels]))
        s.append("")
    for p in plots.get("distributions", ()):
        s.append(f"![label distributions]({p})\n")

    s.append("## Action codebook\n")
    if codebook:
        keep = ("k", "k_requested", "tol", "vehicle_length", "vehicle_width", "dt", "seed", "datasets",
                "segment_count", "coverage", "created_at", "tensors_sha256")  # fmt: skip
        s.append(_table(["key", "value"], [[k, codebook.get(k)] for k in keep if codebook.get(k) is not None]))
        s.append(
            "\nActions are written as `<action_i>` tokens, i in [0, K). Token i is a K-disk cluster mean of "
            "(dx, dy, dtheta) 0.5 s segments; decode by rolling the tokens out from the current pose. The "
            "codebook files (`codebook/codebook.safetensors`, `codebook/codebook.json`, uploaded with the "
            "data by `drivevla push`) are needed to decode:\n\n"
            "```python\nfrom huggingface_hub import snapshot_download\nfrom tokenizer import ActionTokenizer, load_codebook\n\n"
            f'local = snapshot_download("{meta.get("repo_id", "<org>/<name>")}", repo_type="dataset", allow_patterns="codebook/*")\n'
            'tok = ActionTokenizer(load_codebook(f"{local}/codebook"))\n'
            'future = tok.decode([row["action_tokens"]])[0]  # (10, 3) x, y, heading at 2 Hz\n```\n'
        )
    else:
        s.append("No codebook metadata was found.\n")

    if plots.get("examples"):
        s.append("## Examples\n")
        s.append("Front camera at the current time with the ground-truth 5 s future projected onto the road (ego-frame z = 0).\n")
        for p in plots["examples"]:
            s.append(f"![example]({p})\n")

    s.append("## Loading\n")
    s.append(
        "```python\nfrom datasets import load_dataset\n\n"
        "# from a local copy of this folder\n"
        'ds = load_dataset("parquet", data_files={"train": "shards/train-*.parquet", '
        '"validation": "shards/validation-*.parquet"})\n'
        "# or from the Hub\n"
        f'ds = load_dataset("{meta.get("repo_id", "<org>/<name>")}")\n'
        'row = ds["train"][0]\n'
        'front = next(c for c in row["cameras"] if c["name"] == "front")\n'
        'front["frames"][-1]["image"]  # PIL.Image at the current time (also the top-level `thumbnail`)\n'
        'row["messages"]  # system / user / assistant chat with <action_i> tokens\n'
        "```\n\n"
        "Plain pyarrow works too (images are then `{bytes, path}` structs with JPEG bytes):\n\n"
        "```python\nimport pyarrow.dataset as pads\n"
        'table = pads.dataset("shards", format="parquet").to_table(columns=["sample_id", "action_tokens", "messages"])\n'
        "```\n\n"
        "The `datasets` features (camera frames as `Image`) are embedded in every shard's Parquet schema "
        "metadata under the `huggingface` key.\n"
    )

    s.append("## Schema\n")
    s.append(
        "Conventions: metres, seconds, radians; ego frame at the current time (x forward, y left, z up); "
        "`history` (H,3) and `future` (10,3) are (x, y, heading) at 2 Hz; camera extrinsics map camera "
        "(OpenCV) coordinates to the ego frame; intrinsics are for the stored image size.\n"
    )
    s.append(_lens_text(ds_list))
    s.append(_table(["column", "type"], [[f"`{n}`", f"`{t}`"] for n, t in schema]))
    s.append(
        "\n`thumbnail` is the front camera's image at the current time (the same JPEG as in `cameras`), "
        "at the top level so the Hub viewer shows it.\n"
    )
    s.append(
        f"\nschema version {meta.get('schema_version')}, build version {meta.get('build_version')}, "
        f"prompt version {meta.get('prompt_version')}.\n"
    )
    return "\n".join(s)
