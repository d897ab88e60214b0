"""The ego state in words: one wording shared by annotation prompts and training prompts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

_COMMAND_TEXT = {
    "left": "turn left at the next opportunity",
    "straight": "go straight",
    "right": "turn right at the next opportunity",
    "unknown": "no route command is given",
}


def describe_ego_state(row: Mapping[str, Any]) -> str:
    """Describe velocity, acceleration, recent motion and the command of a sample row.

    Uses only columns every dataset has (``velocity``, ``acceleration``,
    ``command``, ``history_meta_*``), so SFT, RFT, eval and annotation see the
    same text for the same sample.
    """
    v = np.asarray(row["velocity"], dtype=np.float64)
    a = np.asarray(row["acceleration"], dtype=np.float64)
    speed = float(np.hypot(v[0], v[1]))
    lon_acc = float(a[0])
    parts = [
        f"Speed {speed:.1f} m/s (forward {v[0]:.1f}, lateral {v[1]:.1f} m/s).",
        f"Acceleration forward {lon_acc:+.1f} m/s^2, lateral {a[1]:+.1f} m/s^2.",
    ]
    lat, lon = row.get("history_meta_lateral"), row.get("history_meta_longitudinal")
    if lon:
        motion = lon if lat in (None, "none") else f"{lat}, {lon}"
        parts.append(f"Over the last seconds the ego vehicle did: {motion}.")
    cmd = row.get("command") or "unknown"
    parts.append(f"Navigation command: {cmd} ({_COMMAND_TEXT.get(cmd, cmd)}).")
    return " ".join(parts)
