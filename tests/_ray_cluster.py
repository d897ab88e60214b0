"""A private local Ray cluster for tests: `ray start --block` processes with their own temp dir and ports.

Other Ray sessions may run on the same machine, so every port is chosen free
and explicit, the temp dir is private (short: Ray's unix socket paths must fit
107 bytes) and the cluster is stopped by the pids of the processes started
here, never with a global ``ray stop``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


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
    env.update(extra or {})
    return env


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


@dataclass
class LocalCluster:
    temp_dirs: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    gcs_address: str = ""
    client_address: str = ""

    def _start(self, args: list[str], cpus: int) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.temp_dirs.append(tmp)
        p = free_ports(9)
        cmd = [RAY, "start", "--block", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
               f"--temp-dir={tmp}", f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
               f"--dashboard-agent-grpc-port={p[2]}", f"--dashboard-agent-listen-port={p[3]}",
               f"--metrics-export-port={p[4]}", f"--runtime-env-agent-port={p[5]}",
               f"--min-worker-port={p[6]}", f"--max-worker-port={p[6] + 40}", "--disable-usage-stats",
               f"--dashboard-port={p[7]}", "--object-store-memory=100000000", *args]  # fmt: skip
        log = open(tmp / "ray_start.log", "wb")  # noqa: SIM115 - kept open for the process's life
        self.procs.append(
            subprocess.Popen(cmd, env=cluster_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def start_head(self, cpus: int = 1) -> None:
        gcs, client = free_ports(2)
        self._start(["--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=false"], cpus)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.client_address = f"ray://127.0.0.1:{client}"

    def add_node(self, cpus: int = 1) -> None:
        self._start([f"--address={self.gcs_address}"], cpus)

    def wait_nodes(self, n: int, timeout: float = 300.0) -> None:
        """Block until ``n`` alive nodes have registered (via short-lived subprocess drivers; slow on a busy box)."""
        code = (
            "import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False);"
            "print(sum(1 for x in ray.nodes() if x['Alive']))"
        )
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
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
        del left
