"""Rewards: RFS on hand-made cases, collision, ADE, text terms, the runner's failure budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.geometry import box_corners
from training.rewards import (
    ADEReward,
    CollisionReward,
    Completion,
    CoTPenalty,
    MissingDependencyError,
    NavsimPDMReward,
    RaterFeedbackReward,
    RewardBudgetExceeded,
    RewardError,
    RewardRunner,
    RewardsConfig,
    RFSConfig,
    boxes_overlap,
    collides,
    rater_feedback_score,
    register_reward,
)
from training.rewards.rfs import prepare_raters, rater_axes, resample, speed_scale


def straight(speed: float, hz: float, n: int, lateral: float = 0.0) -> np.ndarray:
    t = np.arange(1, n + 1) / hz
    return np.stack([speed * t, np.full(n, lateral)], axis=-1)


def poses(xy: np.ndarray) -> np.ndarray:
    return np.concatenate([xy, np.zeros((len(xy), 1))], axis=-1)


def completion(traj: np.ndarray | None, *, slow: bool = False, reasoning: str = "", tokens: int = 12) -> Completion:
    return Completion(
        text="",
        think_mode="slow" if slow else "fast",
        reasoning=reasoning,
        action_ids=None if traj is None else tuple(range(10)),
        trajectory=traj,
        format_error=None if traj is not None else "no <answer>...</answer> block",
        num_tokens=tokens,
        truncated=False,
    )


def wod_row(speed: float = 10.0) -> dict:
    """Three raters at 4 Hz: keep lane at speed (9), change lane left (6), brake to a stop (2)."""
    keep = straight(speed, 4.0, 20)
    t = np.arange(1, 21) / 4.0
    lane = np.stack([speed * t, 3.5 / (1 + np.exp(-(t - 2.5) * 3))], axis=-1)
    stop = np.stack([np.minimum(speed * t - speed / 10 * t**2, 25.0), np.zeros(20)], axis=-1)
    return {
        "sample_id": "waymo_e2e/seg/001",
        "dataset": "waymo_e2e",
        "velocity": [speed, 0.0],
        "preference_trajectories": [keep.tolist(), lane.tolist(), stop.tolist()],
        "preference_scores": [9.0, 6.0, 2.0],
        "future": poses(straight(speed, 2.0, 10)).tolist(),
        "objects": None,
    }


# --------------------------------------------------------------------------- RFS


def test_rfs_prediction_equal_to_best_rated_scores_its_rating():
    row = wod_row()
    pred = poses(straight(10.0, 2.0, 10))  # the keep-lane rater at 2 Hz
    out = RaterFeedbackReward()([(row, completion(pred))])
    assert out[0] == pytest.approx(0.9)  # RFS 9 / 10


def test_rfs_far_outside_every_region_is_floored_at_4():
    row = wod_row()
    far = poses(np.stack([np.linspace(1, 10, 10), -np.linspace(3, 30, 10)], axis=-1))
    raters, scores = prepare_raters(row["preference_trajectories"], row["preference_scores"])
    pred = resample(far[:, :2], 0.5, 4.0, 5.0)
    score, inside = rater_feedback_score(pred[None], raters, scores, v0=10.0)
    assert not inside[0]
    assert score[0] == pytest.approx(4.0)


def test_rfs_speed_scaling_widens_the_regions():
    cfg = RFSConfig()
    assert speed_scale(0.0, cfg) == pytest.approx(0.5)
    assert speed_scale(20.0, cfg) == pytest.approx(1.0)
    assert speed_scale(6.2, cfg) == pytest.approx(0.75)
    raters = straight(10.0, 4.0, 20)[None]
    pred = straight(10.0, 4.0, 20, lateral=0.8)[None]  # 0.8 m to the left of the only rater
    fast, in_fast = rater_feedback_score(pred, raters, np.array([9.0]), v0=11.0)
    slow, in_slow = rater_feedback_score(pred, raters, np.array([9.0]), v0=1.4)
    assert in_fast[0] and fast[0] == pytest.approx(9.0)
    assert not in_slow[0]
    # slow: thresholds (0.5, 0.9) m; at 3 s norm 1.6 -> 9 * 0.1**0.6, at 5 s inside -> 9
    assert slow[0] == pytest.approx((9 * 0.1**0.6 + 9.0) / 2)


def test_rfs_longitudinal_threshold_is_four_times_lateral_and_follows_rater_heading():
    raters = np.stack([np.zeros(20), np.arange(1, 21) * 2.5], axis=-1)[None]  # driving along +y
    ahead = raters.copy()
    ahead[0, :, 1] += 3.9  # 3.9 m further along the rater's own direction: < 4 * 1.0
    score, inside = rater_feedback_score(ahead, raters, np.array([8.0]), v0=11.0)
    assert inside[0] and score[0] == pytest.approx(8.0)
    side = raters.copy()
    side[0, :, 0] += 1.2  # 1.2 m sideways: outside the 1.0 m lateral region at 3 s
    score, inside = rater_feedback_score(side, raters, np.array([8.0]), v0=11.0)
    assert not inside[0] and score[0] == pytest.approx((8 * 0.1**0.2 + 8.0) / 2)


def test_rfs_axes_hold_direction_when_stopped():
    traj = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])[None]
    lon, lat = rater_axes(traj)
    np.testing.assert_allclose(lon[0], [[1, 0], [1, 0], [0, 1], [0, 1]])
    np.testing.assert_allclose(lat[0], [[0, 1], [0, 1], [-1, 0], [-1, 0]])
    lon0, _ = rater_axes(np.zeros((1, 3, 2)))  # never moves: +x throughout
    np.testing.assert_allclose(lon0[0], [[1, 0]] * 3)


def test_rfs_not_applicable_and_invalid_raters():
    row = wod_row()
    row["preference_scores"] = [-1.0, -1.0, -1.0]
    nuscenes = {"sample_id": "nuscenes/s/1", "velocity": [1.0, 0.0], "preference_trajectories": None}
    pred = poses(straight(10.0, 2.0, 10))
    out = RaterFeedbackReward()([(row, completion(pred)), (nuscenes, completion(pred)), (wod_row(), completion(None))])
    assert np.isnan(out).all()
    # one valid rater is padded to three: same score as alone
    r, s = prepare_raters([straight(5, 4, 12)], [7.0])
    assert r.shape == (3, 20, 2) and s.tolist() == [7.0] * 3
    np.testing.assert_allclose(r[0, 12:], np.repeat(r[0, 11:12], 8, axis=0))  # padded with the last point


def test_rfs_scores_only_3s_and_5s_on_the_4hz_grid():
    raters = straight(10.0, 4.0, 20)[None]
    scores = np.array([9.0])
    off = np.ones(20, bool)
    off[[11, 19]] = False  # steps 11 and 19 are 3.0 s and 5.0 s (Waymo's indices)
    pred = raters.copy()
    pred[0, off, 1] += 5.0  # far off everywhere else
    score, inside = rater_feedback_score(pred, raters, scores, v0=11.0)
    assert inside[0] and score[0] == pytest.approx(9.0)
    at3 = raters.copy()
    at3[0, 11, 1] += 1.5  # 1.5 m lateral at 3 s only: norm 1.5 there
    score, inside = rater_feedback_score(at3, raters, scores, v0=11.0)
    assert not inside[0] and score[0] == pytest.approx(max((9 * 0.1**0.5 + 9) / 2, 4.0))


def test_rfs_floor_lifts_only_predictions_outside_every_region():
    row = wod_row()
    raters, scores = prepare_raters(row["preference_trajectories"], row["preference_scores"])
    stop = raters[2:3]  # exactly the brake-to-stop rater, rated 2
    score, inside = rater_feedback_score(stop, raters, scores, v0=10.0)
    assert inside[0] and score[0] == pytest.approx(2.0)  # inside a region: no floor (as Waymo)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"velocity": [float("nan"), 0.0]}, "velocity"),
        ({"preference_scores": [9.0, 12.0, 2.0]}, "score 1 is 12.0"),
        ({"preference_scores": [9.0, float("nan"), 2.0]}, "score 1 is nan"),
        ({"preference_scores": [9.0, 6.0]}, "3 preference trajectories but 2 scores"),
    ],
)
def test_rfs_bad_rows_fail_and_are_not_scored(change, match, caplog):
    row = dict(wod_row(), **change)
    pred = poses(straight(10.0, 2.0, 10))
    with pytest.raises(RewardError, match=match):
        RaterFeedbackReward()([(row, completion(pred))])
    cfg = RewardsConfig(weights={"rfs": 1.0, "ade": 1.0}, executor="inline")
    with RewardRunner(cfg) as runner:
        res = runner.score([row], [completion(pred)])
    assert res.failed[0] and np.isnan(res.total[0]) and res.failures["rfs"] == 1


def test_resample_2hz_to_4hz_is_exact_on_a_line():
    np.testing.assert_allclose(resample(straight(8.0, 2.0, 10), 0.5, 4.0, 5.0), straight(8.0, 4.0, 20))


# --------------------------------------------------------------------------- collision, ADE


def test_collision_detects_a_crossing_box_and_not_a_parallel_one():
    ego = poses(straight(8.0, 2.0, 10))  # 8 m/s along +x: x = 20 m at 2.5 s
    crossing = {"category": "vehicle", "x": 20.0, "y": -10.0, "heading": math.pi / 2,
                "length": 4.5, "width": 1.9, "vx": 0.0, "vy": 4.0}  # y = 0 at 2.5 s
    parallel = {"category": "vehicle", "x": 0.0, "y": 3.5, "heading": 0.0,
                "length": 4.5, "width": 1.9, "vx": 8.0, "vy": 0.0}  # next lane, same speed
    assert collides(ego, [crossing])
    assert not collides(ego, [parallel])
    assert not collides(ego, [])
    # the same crossing object, one second late, passes behind the ego
    late = dict(crossing, y=-14.0)
    assert not collides(ego, [late])


def test_collision_box_sits_ahead_of_the_rear_axle():
    stopped = np.zeros((10, 3))  # the ego waits at the origin (its rear axle)
    ahead = {"category": "vehicle", "x": 6.0, "y": 0.0, "heading": 0.0,
             "length": 4.0, "width": 1.9, "vx": 0.0, "vy": 0.0}  # rear bumper 4.0 m ahead of the axle
    behind = dict(ahead, x=-4.2)  # front bumper 2.2 m behind the axle
    # The car's front is 1.4 + 2.4 = 3.8 m ahead of the axle and its back 1.0 m behind it.
    assert not collides(stopped, [ahead]) and not collides(stopped, [behind])
    assert collides(stopped, [dict(ahead, x=5.7)])  # rear bumper at 3.7 m: touches the front
    assert collides(stopped, [behind], center_offset=0.0)  # a box centred on the axle reaches -2.4 m


def test_collision_refuses_a_nan_object_box():
    ego = poses(straight(8.0, 2.0, 10))
    bad = {"category": "vehicle", "track_id": "t7", "x": 50.0, "y": 9.0, "heading": 0.0,
           "length": float("nan"), "width": 1.9, "vx": 0.0, "vy": 0.0}  # far away, but NaN
    row = {"sample_id": "nuscenes/s/2", "objects": [bad]}
    with pytest.raises(RewardError, match="nuscenes/s/2.*t7"):
        CollisionReward()([(row, completion(ego))])


def test_boxes_overlap_oriented():
    a = box_corners(np.array([0.0, 0.0, 0.0]), 4.0, 2.0)
    b = box_corners(np.array([3.2, 0.0, math.pi / 4]), 2.0, 2.0)  # corner reaches x = 3.2 - 1.41 < 2
    c = box_corners(np.array([3.5, 0.0, math.pi / 4]), 2.0, 2.0)  # x_min = 2.09 > 2: apart
    d = box_corners(np.array([2.6, 2.2, math.pi / 4]), 2.0, 2.0)  # AABBs overlap, SAT separates
    assert boxes_overlap(a, b)
    assert not boxes_overlap(a, c)
    assert not boxes_overlap(a, d)


def test_ade_reward():
    row = wod_row()
    gt = np.asarray(row["future"])
    off = gt.copy()
    off[:, 1] += 2.0
    out = ADEReward(scale=2.0)([(row, completion(gt)), (row, completion(off)), ({"future": None}, completion(gt))])
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(math.exp(-1.0)) and np.isnan(out[2])
    lin = ADEReward(mode="linear", max_ade=4.0)([(row, completion(off))])
    assert lin[0] == pytest.approx(0.5)


# --------------------------------------------------------------------------- text terms


def test_cot_penalty_only_for_slow_thinking():
    pen = CoTPenalty()
    out = pen([({}, completion(None, slow=True, reasoning="x" * 400)), ({}, completion(None, reasoning="x" * 400)),
               ({}, completion(None, slow=True, reasoning="x" * 1400))])
    assert out[0] == pytest.approx(0.15) and out[1] == 0.0
    assert out[2] == pytest.approx(0.3 / (1 + math.exp(-2.0)))
    tok = CoTPenalty(unit="tokens", center=100.0)([({}, completion(None, slow=True, tokens=100))])
    assert tok[0] == pytest.approx(0.15)


# --------------------------------------------------------------------------- runner


def test_runner_total_combines_driving_format_and_cot():
    row = wod_row()
    gt = np.asarray(row["future"])
    cfg = RewardsConfig(weights={"rfs": 1.0, "ade": 1.0}, executor="inline")
    with RewardRunner(cfg) as runner:
        res = runner.score([row, row, row], [completion(gt), completion(gt, slow=True, reasoning="x" * 400),
                                             completion(None)])
    assert res.components["rfs"][0] == pytest.approx(0.9)
    assert res.components["driving"][0] == pytest.approx((0.9 + 1.0) / 2)
    assert res.total[1] == pytest.approx(0.95 - 0.15)
    assert res.total[2] == pytest.approx(0.0 - 1.0)  # no trajectory: invalid_driving 0 and the format penalty
    assert not res.failed.any()


def test_runner_reweights_over_applicable_rewards_and_gates():
    gt = poses(straight(8.0, 2.0, 10))
    crossing = {"category": "vehicle", "x": 20.0, "y": -10.0, "heading": 1.57, "length": 4.5, "width": 1.9,
                "vx": 0.0, "vy": 4.0}
    row = {"sample_id": "nuscenes/s/1", "velocity": [8.0, 0.0], "future": gt.tolist(), "objects": [crossing],
           "preference_trajectories": None, "preference_scores": None}
    cfg = RewardsConfig(weights={"rfs": 1.0, "ade": 1.0}, gates=("collision",), executor="thread")
    with RewardRunner(cfg) as runner:
        res = runner.score([row], [completion(gt)])
    assert np.isnan(res.components["rfs"][0])
    assert res.components["collision"][0] == 0.0
    assert res.total[0] == pytest.approx(0.0)  # ADE 1.0 gated by the collision


class Flaky:
    """Fails on rows whose sample id contains 'bad'."""

    name = "flaky"
    columns = ("sample_id",)

    def __call__(self, items):
        if any("bad" in r["sample_id"] for r, _ in items):
            raise RuntimeError("boom")
        return np.ones(len(items))


def test_failing_reward_is_counted_excluded_and_raises_after_budget(caplog):
    register_reward("flaky", lambda cfg: Flaky())
    cfg = RewardsConfig(weights={"flaky": 1.0}, executor="thread", max_failures=2, chunk_size=4)
    good = {"sample_id": "x/good/1"}
    bad = {"sample_id": "x/bad/1"}
    traj = poses(straight(8.0, 2.0, 10))
    with RewardRunner(cfg) as runner:
        res = runner.score([good, bad, good, good], [completion(traj)] * 4)
        assert res.failed.tolist() == [False, True, False, False]
        assert np.isnan(res.total[1]) and res.total[0] == pytest.approx(1.0)  # not scored as 0
        assert res.failures["flaky"] == 1 and "x/bad/1" in caplog.text and "boom" in caplog.text
        runner.score([bad], [completion(traj)])  # 2 failures: at the budget
        with pytest.raises(RewardBudgetExceeded, match="max_failures=2"):
            runner.score([bad], [completion(traj)])


def test_runner_process_pool():
    row = wod_row()
    cfg = RewardsConfig(weights={"rfs": 1.0}, executor="process", workers=1)
    with RewardRunner(cfg) as runner:
        res = runner.score([row] * 3, [completion(poses(straight(10.0, 2.0, 10)))] * 3)
    np.testing.assert_allclose(res.components["rfs"], 0.9)


def test_config_rejects_unknown_reward():
    with pytest.raises(ValueError, match="unknown reward"):
        RewardsConfig(weights={"rsf": 1.0})


def test_pdm_without_navsim_names_what_is_missing(tmp_path):
    with pytest.raises(MissingDependencyError, match="'navsim' package"):
        NavsimPDMReward(metric_cache=str(tmp_path))
    with pytest.raises(MissingDependencyError, match="metric cache"):
        NavsimPDMReward()
