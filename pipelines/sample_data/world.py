"""A small deterministic driving world: a route with turns and lane changes, an ego, other agents.

The ego follows its route by arc length ``s(t)`` (a kinematic path follower:
the heading is the tangent of the driven path, the speed tracks phase
targets — cruise, accelerate, decelerate, stop and start — limited by the
curvature ahead). The lateral offset from the route's reference line moves
between the two same-direction lanes with smooth lane changes. Other cars
(a lead car, oncoming traffic, parked cars) and pedestrians move along the
same road. Everything is a pure function of the scene's random generator.

World frame: x east, y north, z up, ground at z = 0. The ego pose is the
rear-axle centre (the origin of the Waymo, nuScenes and nuPlan ego frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from pipelines.geometry import wrap_angle

SIM_DT: Final = 0.01  # s, integration step of the speed profile
ROUTE_DS: Final = 0.25  # m, arc-length step of the route polyline
LANE_WIDTH: Final = 3.5  # m
LANE_OFFSETS: Final = (
    0.0,
    LANE_WIDTH,
)  # right lane, left lane (same direction), from the reference line
ONCOMING_OFFSET: Final = 2 * LANE_WIDTH  # centre of the opposing lane
PARKING_OFFSET: Final = -3.0  # parked cars on the right shoulder
ROAD_RIGHT: Final = -4.25  # road surface edges (parking lane included)
ROAD_LEFT: Final = 2.5 * LANE_WIDTH
SIDEWALK_OFFSETS: Final = (-5.5, ROAD_LEFT + 1.5)
TURN_RADIUS: Final = {"left": 14.0, "right": 9.0}  # m, of the reference line
MAX_LAT_ACCEL: Final = 2.5  # m/s^2, sets the speed limit in curves
COMFORT_DECEL: Final = 2.0  # m/s^2, braking ahead of curves
COMMAND_LOOKAHEAD_S: Final = 4.0  # s: a turn this close (at current speed) is commanded
COMMAND_LOOKAHEAD_MIN: Final = 25.0  # m

# Object sizes (length, width, height) in metres.
SIZES: Final = {"car": (4.6, 1.9, 1.6), "truck": (8.0, 2.5, 3.2), "pedestrian": (0.6, 0.6, 1.75)}


@dataclass(frozen=True, slots=True)
class Box:
    """An agent at one instant, world frame; ``z`` is the box centre (ground at 0)."""

    track_id: str
    category: str  # car | truck | pedestrian
    x: float
    y: float
    z: float
    length: float
    width: float
    height: float
    yaw: float
    vx: float
    vy: float


class Route:
    """The reference line of a two-lane road (plus an opposing lane) with 90-degree turns."""

    def __init__(self, pieces: list[tuple[str, float]], start: tuple[float, float, float]) -> None:
        xs, ys, hs = [start[0]], [start[1]], [start[2]]
        self.turns: list[tuple[float, float, str]] = []  # (s_start, s_end, left|right)
        self.straights: list[tuple[float, float]] = []
        s = 0.0
        for kind, length in pieces:
            n = max(1, int(round(length / ROUTE_DS)))
            if kind == "straight":
                curv = 0.0
                self.straights.append((s, s + n * ROUTE_DS))
            else:
                radius = TURN_RADIUS[kind]
                n = int(round(0.5 * np.pi * radius / ROUTE_DS))
                curv = (1.0 if kind == "left" else -1.0) / radius
                self.turns.append((s, s + n * ROUTE_DS, kind))
            for _ in range(n):  # exact arcs/lines by integrating a constant curvature
                h0 = hs[-1]
                h1 = h0 + curv * ROUTE_DS
                hm = 0.5 * (h0 + h1)
                xs.append(xs[-1] + ROUTE_DS * np.cos(hm))
                ys.append(ys[-1] + ROUTE_DS * np.sin(hm))
                hs.append(h1)
            s += n * ROUTE_DS
        self.xy = np.stack([xs, ys], axis=1)
        self.heading = np.asarray(hs)
        self._heading_cont = np.unwrap(self.heading)  # continuous, for interpolation
        self.s = np.arange(len(xs)) * ROUTE_DS
        self.length = float(self.s[-1])
        self.lane_changes: list[tuple[float, float, float, float]] = []  # s0, s1, from, to
        self.initial_offset = 0.0  # lane the ego starts in (set by build_route)

    def centre(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reference-line points ``(N,2)`` and headings ``(N,)`` at arc lengths ``s``."""
        s = np.clip(np.asarray(s, dtype=np.float64), 0.0, self.length)
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        h = np.interp(s, self.s, self._heading_cont)
        return np.stack([x, y], axis=-1), h

    def offset(self, s: np.ndarray) -> np.ndarray:
        """The ego's lateral offset from the reference line (lane changes are smoothstep ramps)."""
        s = np.asarray(s, dtype=np.float64)
        out = np.full(s.shape, self.initial_offset)
        for s0, s1, a, b in self.lane_changes:
            u = np.clip((s - s0) / (s1 - s0), 0.0, 1.0)
            u = u * u * (3 - 2 * u)
            out = np.where(s >= s0, a + (b - a) * u, out)
        return out

    def point(self, s: np.ndarray, offset: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Points ``(N,2)`` at ``offset`` metres left of the reference line, and the line's heading."""
        xy, h = self.centre(s)
        off = np.asarray(offset, dtype=np.float64)
        normal = np.stack([-np.sin(h), np.cos(h)], axis=-1)
        return xy + normal * off[..., None], h

    def speed_limit(self) -> np.ndarray:
        """Allowed speed along the route: curve limits propagated backwards with comfortable braking."""
        v = np.full(len(self.s), np.inf)
        for s0, s1, kind in self.turns:
            inner = TURN_RADIUS[kind] - LANE_WIDTH
            v[(self.s >= s0) & (self.s <= s1)] = np.sqrt(MAX_LAT_ACCEL * inner)
        for i in range(len(v) - 2, -1, -1):  # backward pass: reachable by braking at COMFORT_DECEL
            v[i] = min(v[i], np.sqrt(v[i + 1] ** 2 + 2 * COMFORT_DECEL * ROUTE_DS))
        return v


def build_route(rng: np.random.Generator, min_length: float) -> Route:
    """Straights alternating with left/right turns, lane changes placed so turns start in the right lane."""
    pieces: list[tuple[str, float]] = []
    total = 0.0
    while total < min_length:
        length = float(rng.uniform(60.0, 120.0))
        pieces.append(("straight", length))
        total += length
        if total >= min_length:
            break
        turn = "left" if rng.random() < 0.5 else "right"
        pieces.append((turn, 0.5 * np.pi * TURN_RADIUS[turn]))
        total += pieces[-1][1]
    pieces.append(("straight", 60.0))  # room for agents and the last future
    route = Route(
        pieces,
        (
            float(rng.uniform(-500, 500)),
            float(rng.uniform(-500, 500)),
            float(rng.uniform(-np.pi, np.pi)),
        ),
    )
    lane = int(rng.integers(0, 2))
    route.initial_offset = LANE_OFFSETS[lane]
    turn_after = {round(s0, 3): kind for s0, _, kind in route.turns}
    for s0, s1 in route.straights:
        nxt = turn_after.get(round(s1, 3))
        # Left turns from the left lane, right turns from the right lane; on the
        # last straight a free lane change keeps every scene lively.
        want = {"left": 1, "right": 0}.get(nxt, 1 - lane if rng.random() < 0.7 else lane)
        if want != lane:
            a = s0 + float(rng.uniform(8.0, 15.0))
            b = min(a + float(rng.uniform(25.0, 35.0)), s1 - 5.0)
            route.lane_changes.append((a, b, LANE_OFFSETS[lane], LANE_OFFSETS[want]))
            lane = want
        elif s1 - s0 >= 90.0 and rng.random() < 0.6:  # overtake: out and back on a long straight
            a = s0 + float(rng.uniform(5.0, 12.0))
            b = a + float(rng.uniform(22.0, 30.0))
            c = b + float(rng.uniform(5.0, 20.0))
            d = min(c + float(rng.uniform(22.0, 30.0)), s1 - 5.0)
            if d - c >= 15.0:
                route.lane_changes.append((a, b, LANE_OFFSETS[lane], LANE_OFFSETS[1 - lane]))
                route.lane_changes.append((c, d, LANE_OFFSETS[1 - lane], LANE_OFFSETS[lane]))
    return route


def speed_profile(
    rng: np.random.Generator, route: Route, t: np.ndarray, s_start: float
) -> np.ndarray:
    """Arc length ``s(t)`` on the time grid ``t`` from random phases (cruise/accel/decel/stop)."""
    limit = route.speed_limit()
    v = float(rng.choice([0.0, rng.uniform(5.0, 11.0)], p=[0.25, 0.75]))
    phases: list[tuple[float, float, float]] = []  # (duration s, target m/s, rate m/s^2)
    kinds = ["stop", "accel", "decel", "cruise", "accel", "cruise", "decel"]
    order = list(rng.permutation(len(kinds)))
    target = v if v > 0 else float(rng.uniform(6.0, 10.0))
    if v == 0:
        phases.append((float(rng.uniform(1.0, 2.5)), 0.0, 3.0))  # standing, then starting
    for i in order:
        kind = kinds[i]
        if kind == "cruise":
            phases.append((float(rng.uniform(2.5, 4.5)), target, 1.0))
        elif kind == "accel":
            target = min(target + float(rng.uniform(3.0, 6.0)), 14.0)
            phases.append((float(rng.uniform(3.0, 4.5)), target, float(rng.uniform(1.5, 2.5))))
        elif kind == "decel":
            target = max(target - float(rng.uniform(3.0, 6.0)), 2.5)
            phases.append((float(rng.uniform(3.0, 4.5)), target, float(rng.uniform(1.5, 2.5))))
        else:  # stop, wait, start again
            rate = float(rng.uniform(2.0, 3.0))
            phases.append((target / rate + float(rng.uniform(2.0, 3.5)), 0.0, rate))
            target = float(rng.uniform(6.0, 10.0))
            phases.append((float(rng.uniform(3.0, 4.0)), target, 2.0))
    ends = np.cumsum([p[0] for p in phases]) + t[0]
    s = np.empty_like(t)
    s[0] = s_start
    dt = float(t[1] - t[0])
    for i in range(1, len(t)):  # explicit integration: ~3k steps per scene, cheap
        k = min(int(np.searchsorted(ends, t[i])), len(phases) - 1)
        _, tgt, rate = phases[k]
        idx = min(int(s[i - 1] / ROUTE_DS), len(limit) - 1)
        tgt = min(tgt, limit[idx])
        v += float(np.clip(tgt - v, -max(rate, COMFORT_DECEL * 1.25) * dt, rate * dt))
        v = max(v, 0.0)
        s[i] = s[i - 1] + v * dt
    return s


@dataclass(frozen=True)
class Agent:
    """A road user moving along the route at a fixed lateral offset; ``s(t) = s0 + v t (+ gap wave)``."""

    track_id: str
    category: str
    offset: float
    s0: float
    speed: float  # m/s along the route (negative: against the route direction)
    follows_ego: bool = False  # lead car: s = s_ego(t) + s0 + 4 sin(0.3 t)


class Scene:
    """One simulated drive: the ego track on a fine time grid plus the agents."""

    def __init__(self, rng: np.random.Generator, name: str, t_start: float, t_end: float) -> None:
        self.name = name
        self.t = np.arange(t_start, t_end + SIM_DT / 2, SIM_DT)
        self.route = build_route(rng, min_length=14.0 * (t_end - t_start) + 40.0)
        self.s = speed_profile(rng, self.route, self.t, s_start=15.0)
        off = self.route.offset(self.s)
        xy, _ = self.route.point(self.s, off)
        # Heading of the driven path from its arc-length derivative (valid when stopped).
        ds = 0.05
        xy2, _ = self.route.point(self.s + ds, self.route.offset(self.s + ds))
        self.xy = xy
        self.vel = np.gradient(xy, self.t, axis=0)
        # Kinematic ego: while moving, the heading is the direction of motion (the
        # rear-axle reference point of a bicycle model does not slip); a stopped car
        # does not turn, so it keeps its last heading (the path tangent before any motion).
        chord = np.unwrap(np.arctan2(xy2[:, 1] - xy[:, 1], xy2[:, 0] - xy[:, 0]))
        motion = np.arctan2(self.vel[:, 1], self.vel[:, 0])
        moving = np.hypot(self.vel[:, 0], self.vel[:, 1]) > 0.05
        last_moving = np.maximum.accumulate(np.where(moving, np.arange(len(moving)), -1))
        held = np.where(last_moving >= 0, motion[np.maximum(last_moving, 0)], chord)
        self.yaw = np.unwrap(held)
        self.acc = np.gradient(self.vel, self.t, axis=0)
        self.agents = self._make_agents(rng)

    # ------------------------------------------------------------------ ego

    def ego(self, t: np.ndarray | float) -> dict[str, np.ndarray]:
        """Ego state at times ``t``: x, y, yaw (world, rear axle), vx, vy, ax, ay (world), s, v."""
        t = np.asarray(t, dtype=np.float64)
        if (t < self.t[0] - 1e-9).any() or (t > self.t[-1] + 1e-9).any():
            raise ValueError(
                f"scene {self.name}: time {t} outside the simulated [{self.t[0]}, {self.t[-1]}] s"
            )
        out = {
            "x": np.interp(t, self.t, self.xy[:, 0]),
            "y": np.interp(t, self.t, self.xy[:, 1]),
            "yaw": wrap_angle(np.interp(t, self.t, self.yaw)),
            "vx": np.interp(t, self.t, self.vel[:, 0]),
            "vy": np.interp(t, self.t, self.vel[:, 1]),
            "ax": np.interp(t, self.t, self.acc[:, 0]),
            "ay": np.interp(t, self.t, self.acc[:, 1]),
            "s": np.interp(t, self.t, self.s),
        }
        out["v"] = np.hypot(out["vx"], out["vy"])
        return out

    def pose(self, t: float) -> np.ndarray:
        """World ego pose ``(x, y, yaw)`` at time ``t``."""
        e = self.ego(t)
        return np.array([float(e["x"]), float(e["y"]), float(e["yaw"])])

    def command(self, t: float) -> str:
        """Route command: the direction of a turn in progress or starting soon, else straight."""
        e = self.ego(t)
        s, v = float(e["s"]), float(e["v"])
        horizon = max(COMMAND_LOOKAHEAD_MIN, COMMAND_LOOKAHEAD_S * v)
        for s0, s1, kind in self.route.turns:
            if s0 - horizon <= s <= s1:
                return kind
        return "straight"

    # ------------------------------------------------------------------ agents

    def _make_agents(self, rng: np.random.Generator) -> list[Agent]:
        agents: list[Agent] = []
        length = self.route.length
        if rng.random() < 0.8:
            agents.append(
                Agent("lead", "car", LANE_OFFSETS[0], float(rng.uniform(16.0, 24.0)), 0.0, True)
            )
        for i in range(int(rng.integers(3, 6))):
            cat = "truck" if rng.random() < 0.2 else "car"
            agents.append(
                Agent(
                    f"oncoming{i}",
                    cat,
                    ONCOMING_OFFSET,
                    float(rng.uniform(0.2, 1.0) * length),
                    -float(rng.uniform(6.0, 12.0)),
                )
            )
        for i in range(int(rng.integers(2, 5))):
            agents.append(
                Agent(
                    f"parked{i}", "car", PARKING_OFFSET, float(rng.uniform(0.05, 0.9) * length), 0.0
                )
            )
        for i in range(int(rng.integers(3, 6))):
            side = SIDEWALK_OFFSETS[int(rng.integers(0, 2))]
            speed = float(rng.uniform(1.1, 1.6)) * (1 if rng.random() < 0.5 else -1)
            agents.append(
                Agent(f"ped{i}", "pedestrian", side, float(rng.uniform(0.05, 0.6) * length), speed)
            )
        return agents

    def _agent_s(self, agent: Agent, t: np.ndarray) -> np.ndarray:
        if agent.follows_ego:
            return np.interp(t, self.t, self.s) + agent.s0 + 4.0 * np.sin(0.3 * t)
        return agent.s0 + agent.speed * t

    def boxes(self, t: float, max_range: float | None = None) -> list[Box]:
        """Agents on the road at time ``t`` (optionally within ``max_range`` m of the ego), world frame."""
        ego = self.pose(t)
        out = []
        eps = 0.05
        times = np.array([t - eps, t, t + eps])
        for agent in self.agents:
            s = self._agent_s(agent, times)
            if s[1] < 0.0 or s[1] > self.route.length:
                continue
            xy, h = self.route.point(s, np.full(3, agent.offset))
            if max_range is not None and np.hypot(*(xy[1] - ego[:2])) > max_range:
                continue
            vel = (xy[2] - xy[0]) / (2 * eps)
            yaw = h[1] + (np.pi if agent.speed < 0 else 0.0)
            length, width, height = SIZES[agent.category]
            out.append(
                Box(
                    track_id=f"{self.name}:{agent.track_id}",
                    category=agent.category,
                    x=float(xy[1, 0]),
                    y=float(xy[1, 1]),
                    z=height / 2.0,
                    length=length,
                    width=width,
                    height=height,
                    yaw=float(wrap_angle(yaw)),
                    vx=float(vel[0]),
                    vy=float(vel[1]),
                )
            )
        return out
