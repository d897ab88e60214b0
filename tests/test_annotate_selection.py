"""Slow/fast selection: reasons, deterministic fraction cutoff, threshold mode."""

from __future__ import annotations

import random

import numpy as np

from annotators.config import SelectionConfig
from annotators.selection import decide, fit_cutoff, score_complexity
from annotators.synthetic import make_rows


def _row(**kw):
    base = {
        "sample_id": "nuscenes/s/0", "command": "straight", "meta_lateral": "move forward",
        "meta_longitudinal": "constant speed", "future": [[5.0 * (i + 1), 0.0, 0.0] for i in range(10)],
        "velocity": [10.0, 0.0], "acceleration": [0.0, 0.0], "objects": [],
    }  # fmt: skip
    base.update(kw)
    return base


def test_trivial_sample_has_no_reasons():
    c = score_complexity(_row(), SelectionConfig())
    assert c.score == 0 and c.reasons == ()


def test_each_reason_kind():
    cfg = SelectionConfig()
    fut = np.array([[5.0 * (i + 1), 0.0, 0.0] for i in range(10)])
    fut[:, 2] = np.linspace(0.05, 0.8, 10)  # turning
    brake = [[min(5.0 * (i + 1), 12.0), 0.0, 0.0] for i in range(10)]  # 10 m/s to 0 within 1 s
    cases = {
        "lateral": _row(meta_lateral="turn left"),
        "longitudinal": _row(meta_longitudinal="quick deceleration"),
        "command": _row(command="right"),
        "curvature": _row(future=fut.tolist()),
        "braking": _row(future=brake),
        "close_object": _row(
            objects=[{"category": "pedestrian", "x": 4.0, "y": 3.0, "vx": 0.0, "vy": 0.0}]
        ),
        "conflict": _row(
            objects=[{"category": "cyclist", "x": 20.0, "y": -10.0, "vx": 0.0, "vy": 4.0}]
        ),
        "hard_scenario": _row(scenario_cluster="Construction"),
    }
    for kind, row in cases.items():
        reasons = score_complexity(row, cfg).reasons
        assert any(r.startswith(kind + ":") for r in reasons), (kind, reasons)


def test_fraction_cutoff_is_deterministic_and_order_free():
    cfg = SelectionConfig(mode="fraction", slow_fraction=0.3)
    rows = make_rows(40, width=16, height=12)
    scored = [(r["sample_id"], score_complexity(r, cfg).score) for r in rows]
    cut = fit_cutoff(scored, cfg)
    shuffled = scored[:]
    random.Random(1).shuffle(shuffled)
    assert fit_cutoff(shuffled, cfg) == cut
    modes = [decide(r, cfg, cut) for r in rows]
    slow = [m for m in modes if m[0] == "slow"]
    assert len(slow) == 12 and all(m[1] for m in slow)  # every slow sample says why
    assert min(m[2] for m in slow) >= max(m[2] for m in modes if m[0] == "fast")


def test_fraction_extremes_and_threshold_mode():
    rows = make_rows(8, width=16, height=12)
    scored = [(r["sample_id"], score_complexity(r, SelectionConfig()).score) for r in rows]
    none = fit_cutoff(scored, SelectionConfig(slow_fraction=0.0))
    assert all(decide(r, SelectionConfig(), none)[0] == "fast" for r in rows)
    every = fit_cutoff(scored, SelectionConfig(slow_fraction=1.0))
    assert all(decide(r, SelectionConfig(), every)[0] == "slow" for r in rows)
    cfg = SelectionConfig(mode="threshold", threshold=2.0)
    cut = fit_cutoff((), cfg)
    for r in rows:
        mode, _, score = decide(r, cfg, cut)
        assert (mode == "slow") == (score >= 2.0)
