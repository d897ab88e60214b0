"""Help texts (issue 13, "Also"): the --set example names a real key, each default is
stated once, and no absolute path of the checkout appears."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipelines.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _helps() -> dict[str, str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {name: p.format_help() for name, p in sub.choices.items()}


def test_set_example_names_a_real_config_key():
    helps = _helps()
    text = " ".join(helps["annotate"].split())
    m = re.search(r"--set ([a-z_]+\.[\w.]+)=", text)
    assert m and m.group(1) == "image.max_pixels"
    section, key = m.group(1).split(".")
    cfg = yaml.safe_load((ROOT / "configs" / "extract" / "nuscenes.yaml").read_text())
    assert key in cfg[section]


@pytest.mark.parametrize("command", ["extract", "annotate", "build", "push", "demo", "generate"])
def test_each_default_once_and_no_checkout_paths(command):
    helps = _helps()
    if command not in helps:
        pytest.skip(f"command {command} is not part of this build")
    text = helps[command]
    assert str(ROOT) not in text
    options = text.split("options:", 1)[-1]
    # one entry per option: a line starting with "  -" up to the next one
    for entry in re.split(r"\n(?=  -)", options):
        flat = " ".join(entry.split())
        assert flat.lower().count("default:") <= 1, flat
        assert "(default: None)" not in flat and "(default: False)" not in flat, flat
