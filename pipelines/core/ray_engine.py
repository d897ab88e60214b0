"""Ray engine: partitions run on a pool of Ray actors, scheduled from the driver with plain actor calls.

Each worker (a Ray actor made from :class:`_PartitionWorker`) calls
``stage.setup()`` once and then runs whole partitions with
:func:`~pipelines.core.runner.run_partition`, writing shards and markers
itself; only the small per-partition results travel back to the driver.

Why actors and not Ray Data: the engine needs a scheduler, not a dataset.
Ray Data's streaming executor runs in the driver and needs its core worker,
which a Ray Client driver (``ray://``) does not have (``AttributeError:
'Worker' object has no attribute 'core_worker'`` from ``BlockRefCounter``).
Actor creation, actor calls, ``ray.put`` and ``ray.wait`` are part of the Ray
Client API, so the same code runs with ``RAY_ADDRESS`` set to a GCS address
(``head:6379``, ``auto``) or to a Ray Client server (``ray://head:10001``).

Driver death: the actors are owned by the driver's job (not detached), so
when the driver process dies Ray kills them (Ray docs, "Actor lifetimes":
non-detached actors fate-share with their owner); on a cluster that took about
0.15 s in tests/test_ray_cluster.py. A local Ray started by the driver itself
has its head processes fate-share with the driver (the kernel kills them), but
its workers noticed the lost raylet only about 2 s later and kept writing
meanwhile, so each worker also watches its parent process (the raylet) and
exits at once when it is gone.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pipelines.core.runner import PartitionResult, run_partition
from pipelines.core.stage import Partition, Stage
from pipelines.io.fs import as_path

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set (GCS address or ``ray://``), else start a local Ray (quietly)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # the secret-free address only; a ray:// URL carries no credentials
        log.info("connecting to Ray cluster at %s", address)
        _connect(address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


# What Ray Client's proxy answers when the server process it starts for each new driver (a
# "SpecificServer") died at start or never answered (ray/util/client/server/proxier.py, Datapath).
# The proxy frees that server's port and starts a new one for the next connection, so a new
# connection can succeed; seen under load on 2-core CI machines, where the process died within
# milliseconds of its fork, with nothing in its log.
_CLIENT_SERVER_START_FAILURES = ("Starting Ray client server failed", "Proxy failed to Connect to backend")
CLIENT_CONNECT_ATTEMPTS = 3


def _connect(address: str, attempts: int = CLIENT_CONNECT_ATTEMPTS, backoff_s: float = 2.0) -> None:
    """``ray.init(address)``; a ``ray://`` connection whose per-driver server failed to start is retried.

    Only that proxy-side start failure is retried, each time with a warning that names it;
    any other error (wrong address, version mismatch, authentication) is raised at once.
    """
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, log_to_driver=True)
            return
        except ConnectionAbortedError as exc:
            start_failed = any(m in str(exc) for m in _CLIENT_SERVER_START_FAILURES)
            if not (address.startswith("ray://") and start_failed) or attempt == attempts:
                raise
            log.warning(
                "Ray Client at %s: the cluster could not start a server process for this driver "
                "(attempt %d of %d; its head node's logs ray_client_server*.err may say why); connecting again",
                address, attempt, attempts,
            )  # fmt: skip
            time.sleep(backoff_s * attempt)


def is_client_mode() -> bool:
    """True when this process is a Ray Client driver (``ray://``)."""
    import ray

    return bool(ray.util.client.ray.is_connected())


def exit_with_parent(poll_s: float = 0.1) -> None:
    """Exit this process as soon as its parent (a Ray worker's raylet) is gone: no writes after that."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # reparented: the raylet died (with the driver of a local Ray)
                os._exit(1)  # no cleanup on purpose: unfinished partitions have no marker and are redone

    threading.Thread(target=watch, name="drivevla-parent-watch", daemon=True).start()


class _PartitionWorker:
    """One stage worker: ``setup`` once, then any number of partitions."""

    def __init__(self, stage: Stage, out_dir: str, kwargs: dict[str, Any]) -> None:
        exit_with_parent()
        self.stage = stage
        self.out_dir = as_path(out_dir)  # keeps s3://, gs:// URLs intact
        self.kwargs = kwargs
        stage.setup()

    def run(self, pid: str, payload: str) -> dict[str, Any]:
        import ray

        res = run_partition(self.stage, Partition(pid, json.loads(payload)), self.out_dir, **self.kwargs)
        return {**res.to_json(), "skipped": res.skipped, "node_id": ray.get_runtime_context().get_node_id()}

    def where(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def close(self) -> None:
        self.stage.teardown()


def run_on_ray(
    stage: Stage, parts: list[Partition], out: Path, kwargs: dict[str, Any], num_workers: int | None
) -> list[PartitionResult]:
    """Run ``parts`` on ``num_workers`` actors (default: the cluster's CPUs), one partition per call."""
    import ray

    ensure_ray()
    if not parts:
        return []
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if num_workers and num_workers > cpus:  # more one-CPU actors than CPUs would wait forever for a slot
        log.warning("%s: --workers %d > %d CPUs in the Ray cluster; using %d", stage.name, num_workers, cpus, cpus)
    n = max(1, min(num_workers or cpus, cpus, len(parts)))
    log.info("%s: %d partitions on %d Ray workers%s", stage.name, len(parts), n, " (Ray Client)" if is_client_mode() else "")
    # SPREAD places the workers over every node rather than packing the first one.
    actor_cls = ray.remote(_PartitionWorker).options(num_cpus=1, max_restarts=0, scheduling_strategy="SPREAD")
    stage_ref = ray.put(stage)
    workers = [actor_cls.remote(stage_ref, str(out), kwargs) for _ in range(n)]
    places = ray.get([w.where.remote() for w in workers])
    nodes = sorted({p["node_id"] for p in places})
    log.info("%s: %d Ray workers on %d nodes: %s", stage.name, n, len(nodes), ", ".join(x[:12] for x in nodes))
    todo = list(reversed(parts))
    running: dict[Any, tuple[Any, Partition]] = {}
    results: list[PartitionResult] = []

    def submit(worker: Any) -> None:
        if todo:
            part = todo.pop()
            ref = worker.run.remote(part.id, json.dumps(dict(part.payload), sort_keys=True))
            running[ref] = (worker, part)

    try:
        for w in workers:
            submit(w)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            worker, part = running.pop(done[0])
            try:
                d = ray.get(done[0])
            except ray.exceptions.RayActorError as exc:  # the worker died (OOM kill, node lost): report, go on
                log.error("%s: worker died running partition %s: %s", stage.name, part.id, exc)
                results.append(PartitionResult(partition=part.id, error=f"Ray worker died: {type(exc).__name__}"))
                workers.remove(worker)
                if not workers and todo:  # no one left to run the rest
                    for p in todo:
                        results.append(PartitionResult(partition=p.id, error="no Ray worker left"))
                    todo.clear()
                continue
            node = d.pop("node_id")
            results.append(PartitionResult(**d))
            log.info("%s: partition %s done on node %s (%d/%d)", stage.name, part.id, node[:12], len(results), len(parts))
            submit(worker)
    finally:
        for w in workers:
            try:
                ray.get(w.close.remote(), timeout=60)
            except Exception as exc:  # noqa: BLE001 - teardown is best effort; the results are already in
                log.warning("%s: worker teardown failed: %s", stage.name, exc)
            ray.kill(w)
    return results
