"""The Ray engine: each pipeline's model lives in Ray actors; the worker keeps the job and sends the volume.

Contract, per worker process (one :class:`RayEngine`, connected on first use):

- Replicas are *named, detached* Ray actors (``<pipeline>.<key>.replica-<i>``, in ``ray.namespace``), created by
  whichever worker process needs them first and shared by all: resident across jobs and worker restarts, placed
  by Ray on nodes with the ``num_gpus``/``num_cpus``/``resources`` asked for, spread over nodes. ``key`` is a
  digest of the model configuration: a new configuration gets new replicas and the old ones are killed, so
  they give back their GPUs. A :class:`~dicomnode.inference.replica.Gate` actor per pipeline hands out
  replica slots: at most ``replicas`` jobs of a pipeline are in Ray at once, no queue builds up inside Ray.
- :meth:`RayEngine.segment` waits (bounded by ``ray.replica_wait_seconds``) for a slot, puts the volume in
  Ray's object store (without its DICOM headers), calls the replica, and returns the labels with their
  :class:`~dicomnode.inference.replica.Placement` (node, actor, the time waited for the slot).
- Failures are :class:`~dicomnode.errors.DicomNodeError`: a replica (or its node) that dies mid-job or
  exceeds ``ray.call_timeout_seconds`` is a :class:`~dicomnode.errors.TransientError` (the attempt counts:
  the job may be what kills it; Ray restarts the replica); a cluster that cannot be reached, or no free
  replica in time, is :class:`~dicomnode.errors.EngineUnavailable` (retryable, not counted: the job waits for
  as long as the engine is gone). A model error raised inside the replica comes back as itself.

Ray is imported only here and only when the engine is used: the local engine never imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

from dicomnode.config import RayConfig, RayPlacement
from dicomnode.errors import DicomNodeError, EngineUnavailable, PipelineError, TransientError
from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.inference.replica import Gate, Placement, Replica
from dicomnode.inference.segmenter import Segmenter

log = logging.getLogger(__name__)

Builder = Callable[[], Segmenter]  # picklable (e.g. functools.partial of a module-level factory)
ACQUIRE_ROUND_SECONDS = 5.0  # one wait at the gate; rounds repeat until replica_wait_seconds


class NoFreeReplica(EngineUnavailable):
    """Every replica of the pipeline stayed busy for ``ray.replica_wait_seconds``: try again later."""


def _ray() -> Any:
    try:
        import ray  # noqa: PLC0415 - optional dependency, only for engine: ray
    except ImportError:
        raise DicomNodeError("worker.engine is ray but Ray is not installed: pip install 'dicomnode-server[ray]'"
                             ) from None
    return ray


def _probe(address: str, timeout: float) -> None:
    """Raise EngineUnavailable unless a TCP connection to ``host:port`` (or ``ray://host:port``) opens."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise EngineUnavailable(f"Ray cluster at {address} is unreachable: {exc.strerror or exc}") from None


def connect(cfg: RayConfig) -> None:
    """Connect this process to the configured cluster (once); EngineUnavailable names the address."""
    ray = _ray()
    if ray.is_initialized():
        return
    target = os.environ.get("RAY_ADDRESS", "") if cfg.address == "auto" else cfg.address
    if target and target not in ("auto", "local"):
        _probe(target, cfg.connect_timeout_seconds)
    options: dict[str, Any] = {"namespace": cfg.namespace, "log_to_driver": False,
                               "logging_level": logging.WARNING}
    if cfg.address == "local":
        options["include_dashboard"] = False
    try:
        ray.init(address=cfg.address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EngineUnavailable(f"Ray cluster at {cfg.address} is unreachable: {exc}") from None


def disconnect() -> None:
    """Drop this process' connection (the next :func:`connect` starts afresh); safe when not connected."""
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()


def check_cluster(cfg: RayConfig, placements: dict[str, RayPlacement]) -> str:
    """Start-up check: connect, say what the cluster offers, warn about resources no node has; disconnect.

    Raises EngineUnavailable (naming the address) when the cluster cannot be reached.
    """
    ray = _ray()
    if cfg.address == "local":
        return "Ray: each worker process starts its own single-machine instance (address: local)"
    connect(cfg)
    try:
        total = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    finally:
        disconnect()
    for name, place in placements.items():
        wanted = {"GPU": place.num_gpus or 0.0, "CPU": place.num_cpus or 0.0, **(place.resources or {})}
        missing = [k for k, v in wanted.items() if v > 0 and total.get(k, 0.0) < v]
        if missing:
            log.warning("pipeline %s: no Ray node offers %s yet; its jobs wait until one does", name,
                        ", ".join(missing))
    summary = ", ".join(f"{k} {v:g}" for k, v in sorted(total.items()) if not k.startswith("node:"))
    return f"Ray cluster at {cfg.address}: {nodes} node(s), {summary}"


def _failure(exc: BaseException, what: str) -> DicomNodeError:
    """A Ray exception as the node's error: the model's own errors as they were, Ray's as retryable."""
    ray = _ray()
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, DicomNodeError):
            return cause
        return PipelineError(f"{what}: {type(cause).__name__}: {cause}")
    if isinstance(exc, ray.exceptions.GetTimeoutError):
        return TransientError(f"{what}: no answer in time")
    return TransientError(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


class ReplicaPool:
    """One pipeline's replicas and gate on the cluster, seen from one worker process."""

    def __init__(self, cfg: RayConfig, pipeline: str, placement: RayPlacement, builder: Builder, key: str,
                 owner: str) -> None:
        self.cfg, self.pipeline, self.placement, self.builder, self.owner = cfg, pipeline, placement, builder, owner
        self.prefix = f"{pipeline}.{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        self.replicas = int(placement.replicas or 1)
        self._handles: dict[str, Any] = {}  # actor name -> handle (still valid across Ray's restarts)
        self._ready_slots: set[int] = set()  # replicas seen answering (a restart reloads while calls wait)

    def _actor(self, name: str, cls: type, options: dict[str, Any], *args: Any) -> Any:
        """The named actor's handle: this process' cached one, else get it or create it on the cluster."""
        handle = self._handles.get(name)
        if handle is None:
            handle = _ray().remote(cls).options(name=name, get_if_exists=True, lifetime="detached",
                                                **options).remote(*args)
            self._handles[name] = handle
        return handle

    def forget(self) -> None:
        """Drop cached handles: the next call looks the actors up (or recreates those dead for good)."""
        self._handles.clear()
        self._ready_slots.clear()

    def ensure(self) -> None:
        """Create the gate and every replica unless they exist (they start loading their model at once)."""
        self._gate()
        for index in range(self.replicas):
            self._replica(index)
        self._retire_stale()

    def _gate(self) -> Any:
        return self._actor(f"{self.prefix}.gate", Gate, {"num_cpus": 0, "max_restarts": -1, "max_concurrency": 1000},
                           self.replicas, self.cfg.call_timeout_seconds + 60.0)

    def _replica(self, index: int) -> Any:
        place = self.placement
        options = {"num_cpus": place.num_cpus, "num_gpus": place.num_gpus, "resources": dict(place.resources or {}),
                   "scheduling_strategy": "SPREAD", "max_restarts": self.cfg.max_restarts, "max_task_retries": 0,
                   "max_concurrency": 1}
        return self._actor(f"{self.prefix}.replica-{index}", Replica, options, self.builder, index)

    def _retire_stale(self) -> None:
        """Kill this pipeline's actors of an older configuration (they hold GPUs the new ones need)."""
        ray = _ray()
        ours = re.compile(rf"{re.escape(self.pipeline)}\.[0-9a-f]{{10}}\.(gate|replica-\d+)")
        for name in ray.util.list_named_actors():
            if ours.fullmatch(name) and not name.startswith(f"{self.prefix}."):
                try:
                    ray.kill(ray.get_actor(name))
                    log.info("pipeline %s: retired %s (older configuration)", self.pipeline, name)
                except ValueError:
                    pass  # gone meanwhile

    def acquire(self) -> tuple[int, float]:
        """A replica slot and the seconds waited for it; EngineUnavailable when none comes free in time."""
        ray = _ray()
        started = time.monotonic()
        deadline = started + self.cfg.replica_wait_seconds
        while True:
            left = deadline - time.monotonic()
            wait = max(min(left, ACQUIRE_ROUND_SECONDS), 0.0)
            try:
                slot = ray.get(self._gate().acquire.remote(self.owner, wait), timeout=wait + 30.0)
            except ray.exceptions.RayError as exc:
                self.forget()
                raise EngineUnavailable(f"pipeline {self.pipeline}: replica gate unreachable: {_failure(exc, 'gate')}"
                                        ) from None
            if slot is not None:
                return int(slot), time.monotonic() - started
            if left <= ACQUIRE_ROUND_SECONDS:
                raise NoFreeReplica(f"pipeline {self.pipeline}: no free replica in "
                                        f"{self.cfg.replica_wait_seconds:g} s ({self.replicas} replica(s), all busy)")

    def release(self, slot: int) -> None:
        ray = _ray()
        try:
            self._gate().release.remote(slot, self.owner)
        except ray.exceptions.RayError as exc:  # the gate takes the slot back after hold_seconds anyway
            log.warning("pipeline %s: could not release replica %d: %s", self.pipeline, slot, exc)

    def _ready(self, slot: int, started: float) -> Any:
        """The slot's replica once it is placed and has built its model, within what is left of
        ``replica_wait_seconds``; else EngineUnavailable (no node offers what it asks for, or it is still loading)."""
        ray = _ray()
        replica = self._replica(slot)
        if slot in self._ready_slots:
            return replica
        deadline = started + self.cfg.replica_wait_seconds
        while True:
            left = max(deadline - time.monotonic(), 0.5)
            try:
                ray.get(replica.ready.remote(), timeout=left)
                break
            except ray.exceptions.ActorUnavailableError:  # being restarted by Ray: wait for it
                if time.monotonic() + 0.5 >= deadline:
                    raise EngineUnavailable(f"pipeline {self.pipeline}: replica {slot} is being restarted") from None
                time.sleep(0.5)
            except ray.exceptions.GetTimeoutError:
                raise EngineUnavailable(f"pipeline {self.pipeline}: replica {slot} not ready in time (still "
                                        f"loading, or no Ray node offers {self._asks()})") from None
        self._ready_slots.add(slot)
        return replica

    def _asks(self) -> str:
        place = self.placement
        asks = {"CPU": place.num_cpus or 0.0, "GPU": place.num_gpus or 0.0, **(place.resources or {})}
        return ", ".join(f"{k} {v:g}" for k, v in asks.items() if v)

    def run(self, volume: Volume) -> tuple[LabelVolume, Placement]:
        """Segment ``volume`` on a free replica: (labels on its grid, placement with the wait)."""
        ray = _ray()
        started = time.monotonic()
        slot, _ = self.acquire()
        try:
            replica = self._ready(slot, started)
            waited = time.monotonic() - started
            ref = ray.put(dataclasses.replace(volume, headers=()))
            labels, where = ray.get(replica.segment.remote(ref), timeout=self.cfg.call_timeout_seconds)
        except ray.exceptions.RayError as exc:
            if isinstance(exc, ray.exceptions.GetTimeoutError):  # still busy with it: restart, never queue behind
                ray.kill(self._replica(slot), no_restart=False)
            self._handles.pop(f"{self.prefix}.replica-{slot}", None)
            self._ready_slots.discard(slot)
            raise _failure(exc, f"pipeline {self.pipeline} replica {slot}") from None
        finally:
            self.release(slot)
        if not isinstance(labels, LabelVolume) or not isinstance(where, Placement):
            raise PipelineError(f"pipeline {self.pipeline} replica {slot} answered {type(labels).__name__}")
        return labels, dataclasses.replace(where, wait_seconds=waited)


class RayEngine:
    """The worker process' view of the Ray engine: one pool per pipeline, connected on first use."""

    def __init__(self, cfg: RayConfig, owner: str) -> None:
        self.cfg = cfg
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._pools: dict[str, ReplicaPool] = {}

    def pool(self, pipeline: str, placement: RayPlacement, builder: Builder, key: str) -> ReplicaPool:
        """The pipeline's pool (connecting and creating its actors on first use)."""
        found = self._pools.get(pipeline)
        if found is None:
            connect(self.cfg)
            found = ReplicaPool(self.cfg, pipeline, placement, builder, key, self.owner)
            try:
                found.ensure()
            except _ray().exceptions.RayError as exc:
                raise EngineUnavailable(f"pipeline {pipeline}: cannot create replicas: {exc}") from None
            self._pools[pipeline] = found
        return found

    def segment(self, pipeline: str, placement: RayPlacement, builder: Builder, key: str,
                volume: Volume) -> tuple[LabelVolume, Placement]:
        """Labels for ``volume`` from one of the pipeline's replicas; see the module docstring for errors."""
        try:
            return self.pool(pipeline, placement, builder, key).run(volume)
        except NoFreeReplica:
            raise  # busy, not gone
        except EngineUnavailable:
            self._pools.clear()  # the cluster may have gone: reconnect and look the actors up again next time
            disconnect()
            raise
