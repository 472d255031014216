"""What runs inside Ray: a pipeline's resident model (:class:`Replica`) and its slot keeper (:class:`Gate`).

Both are plain classes that :mod:`dicomnode.inference.remote` turns into Ray actors; this module imports Ray
only inside methods that run in an actor, so it can be imported (and its :class:`Placement` used) without Ray.

- :class:`Replica` builds its segmenter once, when Ray starts (or restarts) the actor, and then segments every
  volume it is sent: ``segment(volume) -> (labels, placement)``. The model never leaves the actor.
- :class:`Gate` hands out the pipeline's replica slots, one job per replica: a worker holds a slot for the
  length of one inference. A slot held longer than ``hold_seconds`` (its worker died holding it) is taken back.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.inference.segmenter import Segmenter


@dataclass(frozen=True)
class Placement:
    """Where one job's inference ran and what it waited for. Seconds; ids are Ray's hex strings.

    ``engine`` is ``local`` (the worker process itself: ``node_ip`` is its host name, no node or actor id) or
    ``ray`` (``node_id``/``node_ip`` of the Ray node, ``actor_id`` of the replica, ``replica`` its index in
    the pipeline's pool). ``wait_seconds``: from asking for a replica to holding one (0 for local);
    ``seconds``: the segmenter's own time (inside the actor for ray); ``pid``: the process that ran it.
    """

    engine: str
    node_ip: str
    pid: int
    seconds: float
    wait_seconds: float = 0.0
    node_id: str = ""
    actor_id: str = ""
    replica: int | None = None

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["seconds"], doc["wait_seconds"] = round(self.seconds, 3), round(self.wait_seconds, 3)
        return doc


def local_placement(seconds: float) -> Placement:
    """The placement of an inference run by this very process (the local engine)."""
    return Placement(engine="local", node_ip=socket.gethostname(), pid=os.getpid(), seconds=seconds)


class Replica:
    """One pipeline's model, resident in a Ray actor; ``builder`` is called once per actor (re)start."""

    def __init__(self, builder: Callable[[], Segmenter], index: int) -> None:
        self.segmenter = builder()
        self.index = index

    def ready(self) -> Placement:
        """Where this replica lives (answers once the model is built)."""
        return self._here(0.0)

    def segment(self, volume: Volume) -> tuple[LabelVolume, Placement]:
        """The segmenter's labels on ``volume``'s grid (z, y, x), and where they were computed."""
        started = time.monotonic()
        labels = self.segmenter.segment(volume)
        return labels, self._here(time.monotonic() - started)

    def _here(self, seconds: float) -> Placement:
        import ray  # noqa: PLC0415 - runs only inside a Ray actor

        context = ray.get_runtime_context()
        actor = context.get_actor_id()
        node_ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        return Placement(engine="ray", node_ip=node_ip, pid=os.getpid(), seconds=seconds,
                         node_id=context.get_node_id(), actor_id=actor or "", replica=self.index)


class Gate:
    """Replica slots of one pipeline: ``acquire`` waits (bounded) for a free one, ``release`` gives it back.

    An async Ray actor: many workers may wait at once, each coroutine waking when a slot is released or its
    wait ends. The free slot released longest ago goes first, so jobs take turns on the replicas (and their
    nodes) even when they come one at a time. If the gate itself is restarted it forgets who held
    what, so for one inference's length a replica may get a second job queued behind the first.
    """

    def __init__(self, replicas: int, hold_seconds: float) -> None:
        self.replicas = replicas
        self.hold_seconds = hold_seconds
        self._held: dict[int, tuple[str, float]] = {}  # slot -> (holder, monotonic time taken)
        self._released: dict[int, float] = {}  # slot -> monotonic time of its last release
        self._changed = asyncio.Condition()

    def _free_slot(self) -> int | None:
        now = time.monotonic()
        for slot, (_, since) in list(self._held.items()):
            if now - since > self.hold_seconds:  # its worker died holding it
                del self._held[slot]
        free = [i for i in range(self.replicas) if i not in self._held]
        return min(free, key=lambda i: (self._released.get(i, float("-inf")), i)) if free else None

    async def acquire(self, holder: str, wait_seconds: float) -> int | None:
        """A free slot index for ``holder``, or None when none came free within ``wait_seconds``."""
        deadline = time.monotonic() + wait_seconds
        async with self._changed:
            while True:
                slot = self._free_slot()
                if slot is not None:
                    self._held[slot] = (holder, time.monotonic())
                    return slot
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))
                except asyncio.TimeoutError:
                    pass

    async def release(self, slot: int, holder: str) -> None:
        """Give ``slot`` back (ignored unless ``holder`` holds it)."""
        async with self._changed:
            if self._held.get(slot, ("", 0.0))[0] == holder:
                del self._held[slot]
                self._released[slot] = time.monotonic()
                self._changed.notify_all()

    async def holders(self) -> dict[int, str]:
        """Slot -> holder, for diagnostics."""
        return {slot: holder for slot, (holder, _) in self._held.items()}
