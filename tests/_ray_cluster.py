"""A private local Ray cluster for tests: `ray start --block` processes with their own temp dir and ports.

Other Ray sessions may run on the same machine, so every port is chosen free
and explicit, the temp dir is private (short: Ray's unix socket paths must fit
107 bytes) and the cluster is stopped by the pids of the processes started
here, never with a global ``ray stop``.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


# Ray Client's proxy starts one "SpecificServer" per connecting client on the first free port of this
# range (ray/util/client/server/proxier.py, MIN/MAX_SPECIFIC_SERVER_PORT); with a node, worker or client
# port of this cluster there, the SpecificServer dies at start ("SpecificServer startup failed", seen
# once in a full `make test`), so the cluster's ports stay out of it.
def _specific_server_ports() -> range:
    try:
        from ray.util.client.server import proxier

        return range(proxier.MIN_SPECIFIC_SERVER_PORT, proxier.MAX_SPECIFIC_SERVER_PORT)
    except (ImportError, AttributeError):
        return range(23000, 24000)


SPECIFIC_SERVER_PORTS = _specific_server_ports()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, span: int = 0) -> list[int]:
    """``n`` distinct free ports below the kernel's ephemeral range, the last followed by ``span`` free ones.

    A port picked by binding port 0 lies in the ephemeral range, from which the kernel also
    hands out the local ends of outgoing connections: between our pick and Ray's bind, one
    of the many gRPC connections a starting Ray node opens can take it, and the node
    process then dies (`ray start --block` exits 1). Ports below that range are never
    handed out that way.
    """
    lo = 20000
    hi = min(_ephemeral_range()[0], 65535) - 1
    rng = random.Random()
    chosen: list[int] = []
    for _ in range(10000):
        if len(chosen) == n:
            break
        want = span + 1 if len(chosen) == n - 1 else 1
        start = rng.randrange(lo, hi - want)
        block = range(start, start + want)
        if any(q in chosen for q in block) or any(c in block for c in chosen):
            continue
        if start < SPECIFIC_SERVER_PORTS.stop and SPECIFIC_SERVER_PORTS.start < start + want:
            continue  # Ray Client's proxy starts a server per client on these; a node port there kills it
        if all(_bindable(q) for q in block):
            chosen.append(start)
    if len(chosen) != n:
        raise RuntimeError(f"no {n} free ports between {lo} and {hi}")
    return chosen


TOKEN = secrets.token_hex(32)


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for processes of this cluster: the worktree and tests importable, no usage stats."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray >= 2.5x turns token authentication on for `ray start`; a private token per cluster keeps it
    # on without touching the shared ~/.ray/auth_token that other sessions' clusters use.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = TOKEN
    # The Ray Client proxy gives a client's SpecificServer process 30 s to come up
    # (ray/util/client/server/proxier.py, CHECK_CHANNEL_TIMEOUT_S); a busy 2-core CI box can take longer.
    env["RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S"] = "180"
    env.update(extra or {})
    return env


NODE_HOOKS = REPO / "tests" / "ray_node_hooks"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def processes_with(marks: list[Path] | list[str]) -> dict[int, psutil.Process]:
    """Live processes whose command line names one of ``marks`` (private temp dirs)."""
    out = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(str(t) in cmd for t in marks) and _alive(proc):
            out[proc.pid] = proc
    return out


def _node_logs(tmp: Path) -> str:
    """`ray start`'s own output and the tails of the node's error logs, for failure messages."""
    out = []
    for f in [tmp / "ray_start.log", *sorted(tmp.glob("session_latest/logs/*.err")),
              *sorted(tmp.glob("session_latest/logs/ray_process_exit.log"))]:  # fmt: skip
        try:
            text = f.read_text(errors="replace")[-3000:]
        except OSError:
            continue
        if text.strip():
            out.append(f"== {f.name}\n{text}")
    return "\n".join(out)


def _stop_node(proc: subprocess.Popen, tmp: Path) -> None:
    """Stop a failed node's processes (found by its private temp dir) and remove its temp dir."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    for left in processes_with([tmp]).values():
        try:
            left.kill()
        except psutil.Error:
            pass
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class LocalCluster:
    temp_dirs: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    gcs_address: str = ""
    client_address: str = ""
    node_env: dict[str, str] = field(default_factory=dict)  # more environment for the `ray start` processes
    # with fault hooks on (see tests/ray_node_hooks/sitecustomize.py), touching this file makes the
    # next Ray Client server the head starts for a driver die at start
    fail_client_server: Path | None = None

    def enable_fault_hooks(self) -> None:
        """Put the fault hooks on the PYTHONPATH of the nodes started after this call (inert until armed)."""
        self.fail_client_server = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp")) / "fail-next-client-server"
        self.node_env["PYTHONPATH"] = os.pathsep.join([str(NODE_HOOKS), str(REPO), str(REPO / "tests")])
        self.node_env["DRIVEVLA_TEST_FAIL_CLIENT_SERVER"] = str(self.fail_client_server)

    def _start(self, args: Callable[[list[int]], list[str]], cpus: int, attempts: int = 3, extra: int = 0) -> None:
        """Start one `ray start --block` node; retried with fresh ports and a fresh temp dir if it dies starting.

        ``args`` is called per attempt with ``extra`` more free ports (a head's GCS and client ports). A node
        counts as started once it printed "Ray runtime started." and is still alive a few
        seconds later (a raylet whose agent cannot start dies just after). When every attempt
        fails, the error carries each attempt's `ray start` output and Ray's own error logs.
        """
        failures = []
        for attempt in range(attempts):
            tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
            # one pick for every port of this node (the head's GCS and client ports included), so none
            # overlap; the last one starts the 41-port worker range that free_ports checked free
            *p, w = free_ports(8 + extra, span=40)
            cmd = [RAY, "start", "--block", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
                   f"--temp-dir={tmp}", f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
                   f"--dashboard-agent-grpc-port={p[2]}", f"--dashboard-agent-listen-port={p[3]}",
                   f"--metrics-export-port={p[4]}", f"--runtime-env-agent-port={p[5]}",
                   f"--min-worker-port={w}", f"--max-worker-port={w + 40}", "--disable-usage-stats",
                   f"--dashboard-port={p[6]}", "--object-store-memory=100000000", *args(p[7:])]  # fmt: skip
            log_path = tmp / "ray_start.log"
            log = open(log_path, "wb")  # noqa: SIM115 - kept open for the process's life
            proc = subprocess.Popen(
                cmd, env=cluster_env(self.node_env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            if self._came_up(proc, log_path):
                self.temp_dirs.append(tmp)
                self.procs.append(proc)
                return
            failures.append(
                f"--- attempt {attempt + 1}: exit code {proc.poll()}\n{_node_logs(tmp)}"
            )
            _stop_node(proc, tmp)
        raise RuntimeError("`ray start` failed on every attempt:\n" + "\n".join(failures))

    @staticmethod
    def _came_up(
        proc: subprocess.Popen, log_path: Path, timeout: float = 180.0, settle: float = 5.0
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if b"Ray runtime started." in log_path.read_bytes():
                time.sleep(settle)
                return proc.poll() is None
            time.sleep(0.5)
        return False

    def start_head(self, cpus: int = 1) -> None:
        def args(ports: list[int]) -> list[str]:
            gcs, client = ports
            self.gcs_address = f"127.0.0.1:{gcs}"
            self.client_address = f"ray://127.0.0.1:{client}"
            return [
                "--head",
                f"--port={gcs}",
                f"--ray-client-server-port={client}",
                "--include-dashboard=false",
            ]

        self._start(args, cpus, extra=2)

    def add_node(self, cpus: int = 1) -> None:
        self._start(lambda ports: [f"--address={self.gcs_address}"], cpus)

    def _check_alive(self) -> None:
        for proc, tmp in zip(self.procs, self.temp_dirs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"a `ray start` of this cluster exited ({proc.returncode}):\n{_node_logs(tmp)}"
                )

    def wait_nodes(self, n: int, timeout: float = 300.0) -> None:
        """Block until ``n`` alive nodes have registered (via short-lived subprocess drivers; slow on a busy box).

        Fails at once, with the node's logs, if one of this cluster's `ray start` processes has exited.
        """
        code = (
            "import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False);"
            "print(sum(1 for x in ray.nodes() if x['Alive']))"
        )
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                r = subprocess.run([sys.executable, "-c", code, self.gcs_address], env=cluster_env(),
                                   capture_output=True, text=True, timeout=90)  # fmt: skip
            except subprocess.TimeoutExpired:
                last = "driver timed out"
                continue
            if r.returncode == 0 and int(r.stdout.strip().splitlines()[-1]) >= n:
                return
            last = r.stdout + r.stderr[-2000:]
            time.sleep(1.0)
        self._check_alive()
        raise TimeoutError(f"Ray cluster did not reach {n} nodes: {last}")

    def logs(self, pattern: str) -> str:
        """The tails of this cluster's log files matching ``pattern`` (for failure messages)."""
        out = []
        for t in self.temp_dirs:
            for f in sorted(t.glob(f"session_latest/logs/{pattern}")):
                out.append(f"\n== {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "".join(out)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: children of our `ray start` or carrying its private temp dir."""
        out: dict[int, psutil.Process] = {}
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                for c in [root, *root.children(recursive=True)]:
                    out[c.pid] = c
            except psutil.Error:
                pass
        out.update(processes_with(self.temp_dirs))
        return [p for p in out.values() if _alive(p)]

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node's processes), then kill what is left."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        deadline = time.monotonic() + 10
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for proc in self.processes():  # only processes carrying this cluster's private temp dir
            try:
                proc.kill()
            except psutil.Error:
                pass
        for t in self.temp_dirs:
            shutil.rmtree(t, ignore_errors=True)
        if self.fail_client_server is not None:
            shutil.rmtree(self.fail_client_server.parent, ignore_errors=True)
        del left
