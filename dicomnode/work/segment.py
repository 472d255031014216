"""Image pipelines: series files -> Volume -> labels -> derived DICOM objects -> the outbox.

``make_outputs`` is the data path of a ``segment`` pipeline, shared by the worker (through
``segment_producer``) and by ``dicomnode process`` (offline, no store). Outputs are written to the outbox
(``<storage>/outbox/<output series UID>/<SOP Instance UID>.dcm``) with the same durable write as received
instances, before any delivery is attempted: a crash or a PACS outage loses nothing, and a retry re-sends
the same files. Output UIDs are deterministic, so a re-run writes (and sends) the same objects again.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from dicomnode.config import Config, Engine, PipelineConfig, RayConfig, RayPlacement
from dicomnode.errors import EngineUnavailable, PipelineError
from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.volume import Volume, VolumeOptions, load_series
from dicomnode.inference.replica import Placement, local_placement
from dicomnode.inference.runner import RunnerSettings
from dicomnode.inference.segmenter import SegmenterCache, build_segmenter
from dicomnode.outputs.encode import build_encoded_outputs, load_standard_tables
from dicomnode.state.jobs import OutboundFile
from dicomnode.state.spool import Spool
from dicomnode.state.store import JobRow, Store
from dicomnode.telemetry import metrics

if TYPE_CHECKING:
    from dicomnode.inference.remote import Builder, RayEngine

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]  # (stage name, fraction of the job done)


@dataclass(frozen=True)
class StageTimes:
    load: float
    inference: float
    encode: float

    def __str__(self) -> str:
        return f"load {self.load:.2f} s, inference {self.inference:.2f} s, encode {self.encode:.2f} s"


class Segmenters:
    """Each pipeline's segmenter, resident in this worker process (engine ``local``: one SegmenterCache per
    pipeline) or in the pipeline's Ray replicas (engine ``ray``: Ray is imported on first use only)."""

    def __init__(self, cfg: Config, owner: str = "") -> None:
        self._device = cfg.worker.device.value
        self._caches: dict[str, SegmenterCache] = {}
        self._ray = cfg.ray if cfg.worker.engine is Engine.RAY else None
        self._owner = owner
        self._engine: RayEngine | None = None

    def _settings(self, pipe: PipelineConfig) -> RunnerSettings:
        return RunnerSettings(device=self._device, batch_size=pipe.model.batch_size, overlap=pipe.model.overlap,
                              amp=pipe.model.amp)

    def preload(self, pipes: Sequence[PipelineConfig]) -> None:
        """Load every segment pipeline's model now (at worker start-up), so the first job does not pay for it
        and a model that cannot load is reported at once; such a pipeline's jobs then fail with the reason.
        Engine ``ray``: nothing here (the replicas load their models, see :meth:`warm`)."""
        if self._ray is not None:
            return
        for pipe in pipes:
            if pipe.kind != "segment":
                continue
            try:
                segmenter = self.for_pipeline(pipe).get(pipe.model)
            except PipelineError as error:
                log.error("pipeline %s: model does not load: %s", pipe.name, error)
            else:
                log.info("pipeline %s: model %s %s loaded", pipe.name, segmenter.name, segmenter.version)

    def for_pipeline(self, pipe: PipelineConfig) -> SegmenterCache:
        cache = self._caches.get(pipe.name)
        if cache is None:
            cache = self._caches[pipe.name] = SegmenterCache(self._settings(pipe))
        return cache

    def segment(self, pipe: PipelineConfig, volume: Volume) -> tuple[LabelVolume, Placement]:
        """The pipeline's labels for ``volume`` and where they were computed (see Placement)."""
        if self._ray is None:
            started = time.monotonic()
            labels = self.for_pipeline(pipe).get(pipe.model).segment(volume)
            return labels, local_placement(time.monotonic() - started)
        return self._remote(self._ray).segment(pipe.name, *self._replica_spec(self._ray, pipe), volume)

    def _replica_spec(self, ray_cfg: RayConfig, pipe: PipelineConfig) -> tuple[RayPlacement, Builder, str]:
        """What a Ray replica of ``pipe`` reserves, how it builds its segmenter (the same factory call as the
        local cache) and the key naming that configuration."""
        settings = self._settings(pipe)
        builder = functools.partial(build_segmenter, pipe.model, None, settings)
        return ray_cfg.placement(pipe.ray), builder, repr((pipe.model, settings))

    def _remote(self, ray_cfg: RayConfig) -> RayEngine:
        if self._engine is None:
            from dicomnode.inference.remote import RayEngine  # noqa: PLC0415 - Ray only for engine: ray

            self._engine = RayEngine(ray_cfg, self._owner)
        return self._engine

    def warm(self, pipes: Sequence[PipelineConfig]) -> None:
        """Engine ``ray``: connect and create the pipelines' replicas now (they load their models while the
        worker waits for jobs); a cluster that cannot be reached is only logged: jobs wait and retry."""
        if self._ray is None:
            return
        for pipe in pipes:
            if pipe.kind != "segment":
                continue
            try:
                self._remote(self._ray).pool(pipe.name, *self._replica_spec(self._ray, pipe))
            except EngineUnavailable as exc:
                log.warning("pipeline %s: %s; its jobs wait until the cluster is back", pipe.name, exc)


def make_outputs(files: Sequence[Path], pipe: PipelineConfig, segmenters: Segmenters,
                 progress: Progress | None = None, placed: Callable[[Placement], None] | None = None,
                 ) -> tuple[list[tuple[Dataset, bytes]], StageTimes, tuple[str, ...]]:
    """Run a segment pipeline on a series' files: (derived objects with their checked bytes, stage times,
    volume notes). ``placed`` is told where the inference ran (and how long it waited for a replica).

    Raises VolumeError (final) when the files cannot form a volume, PipelineError for model or encoder
    failures; both carry a message fit for the job's FAILED reason.
    """
    report = progress or (lambda stage, fraction: None)
    t0 = time.monotonic()
    report("load", 0.0)
    volume = load_series(list(files), options=VolumeOptions(min_slices=pipe.volume.min_slices,
                                                            irregular=pipe.volume.irregular))
    t1 = time.monotonic()
    report("inference", 0.3)
    labels, placement = segmenters.segment(pipe, volume)
    if placed is not None:
        placed(placement)
    t2 = time.monotonic()
    report("encode", 0.7)
    out = pipe.outputs
    datasets = build_encoded_outputs(volume, labels, pipeline=pipe.name, series_number_base=out.series_number_base,
                                     kinds=out.kinds, overlay_every=out.overlay_every, overlay_max=out.overlay_max,
                                     series_description=out.series_description)
    t3 = time.monotonic()
    report("done", 1.0)
    times = StageTimes(t1 - t0, t2 - t1, t3 - t2)
    for stage, seconds in (("load", times.load), ("inference", times.inference), ("encode", times.encode)):
        metrics.observe_stage(stage, seconds)
    return datasets, times, volume.notes


def write_outbox(outbox: Spool, outputs: Sequence[tuple[Dataset, bytes]]) -> list[OutboundFile]:
    """Durably write objects (with their checked bytes) to the outbox; return them as deliverable files."""
    files = []
    for ds, data in outputs:
        written = outbox.write(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), data)
        files.append(OutboundFile(str(written.path), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                  str(ds.file_meta.TransferSyntaxUID)))
    return files


def segment_producer(cfg: Config, store: Store, spool: Spool, owner: str = "") -> Callable[[JobRow, PipelineConfig],
                                                                                         list[OutboundFile]]:
    """The worker's producer for ``segment`` pipelines (engine local: every model is loaded now, at worker
    start-up, and kept; engine ray: the replicas are created now). Each job's inference is recorded as a
    ``job.inference`` event whose message is the JSON of its :class:`~dicomnode.inference.replica.Placement`."""
    segmenters = Segmenters(cfg, owner)
    segmenters.preload(cfg.pipelines)
    segmenters.warm(cfg.pipelines)
    load_standard_tables()  # the encoders' tables, now rather than in the first job
    outbox = Spool(cfg.outbox_dir, fsync=cfg.storage.fsync)

    def produce(job: JobRow, pipe: PipelineConfig) -> list[OutboundFile]:
        paths = [Path(r.path) for r in store.instances(job.series_uid)]

        def placed(where: Placement) -> None:
            store.add_event("job.inference", json.dumps(where.as_dict(), sort_keys=True),
                            series_uid=job.series_uid, job_id=job.id)
            metrics.inference_placed(where.engine, where.node_ip, where.wait_seconds)

        datasets, times, notes = make_outputs(paths, pipe, segmenters, placed=placed)
        if notes:
            store.add_event("volume.notes", "; ".join(notes), series_uid=job.series_uid, job_id=job.id)
        files = write_outbox(outbox, datasets)
        store.add_event("job.stages", f"{len(paths)} instances -> {len(files)} object(s): {times}",
                        series_uid=job.series_uid, job_id=job.id)
        log.info("job %d: %s", job.id, times)
        return files

    return produce
