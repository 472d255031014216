"""Image pipelines: series files -> Volume -> labels -> derived DICOM objects -> the outbox.

``make_outputs`` is the data path of a ``segment`` pipeline, shared by the worker (through
``segment_producer``) and by ``dicomnode process`` (offline, no store). Outputs are written to the outbox
(``<storage>/outbox/<output series UID>/<SOP Instance UID>.dcm``) with the same durable write as received
instances, before any delivery is attempted: a crash or a PACS outage loses nothing, and a retry re-sends
the same files. Output UIDs are deterministic, so a re-run writes (and sends) the same objects again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from dicomnode.config import Config, PipelineConfig
from dicomnode.errors import PipelineError
from dicomnode.imaging.volume import VolumeOptions, load_series
from dicomnode.inference.runner import RunnerSettings
from dicomnode.inference.segmenter import SegmenterCache
from dicomnode.outputs.encode import build_encoded_outputs
from dicomnode.state.jobs import OutboundFile
from dicomnode.state.spool import Spool
from dicomnode.state.store import JobRow, Store
from dicomnode.telemetry import metrics

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
    """One SegmenterCache per pipeline (models stay resident in this worker process)."""

    def __init__(self, cfg: Config) -> None:
        self._device = cfg.worker.device.value
        self._caches: dict[str, SegmenterCache] = {}

    def preload(self, pipes: Sequence[PipelineConfig]) -> None:
        """Load every segment pipeline's model now (at worker start-up), so the first job does not pay for it
        and a model that cannot load is reported at once; such a pipeline's jobs then fail with the reason."""
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
            settings = RunnerSettings(device=self._device, batch_size=pipe.model.batch_size,
                                      overlap=pipe.model.overlap, amp=pipe.model.amp)
            cache = self._caches[pipe.name] = SegmenterCache(settings)
        return cache


def make_outputs(files: Sequence[Path], pipe: PipelineConfig, segmenters: Segmenters,
                 progress: Progress | None = None) -> tuple[list[tuple[Dataset, bytes]], StageTimes, tuple[str, ...]]:
    """Run a segment pipeline on a series' files: (derived objects with their checked bytes, stage times,
    volume notes).

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
    segmenter = segmenters.for_pipeline(pipe).get(pipe.model)
    labels = segmenter.segment(volume)
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


def segment_producer(cfg: Config, store: Store, spool: Spool) -> Callable[[JobRow, PipelineConfig],
                                                                        list[OutboundFile]]:
    """The worker's producer for ``segment`` pipelines (models are loaded on first use and kept)."""
    segmenters = Segmenters(cfg)
    segmenters.preload(cfg.pipelines)
    outbox = Spool(cfg.outbox_dir, fsync=cfg.storage.fsync)

    def produce(job: JobRow, pipe: PipelineConfig) -> list[OutboundFile]:
        paths = [Path(r.path) for r in store.instances(job.series_uid)]
        datasets, times, notes = make_outputs(paths, pipe, segmenters)
        if notes:
            store.add_event("volume.notes", "; ".join(notes), series_uid=job.series_uid, job_id=job.id)
        files = write_outbox(outbox, datasets)
        store.add_event("job.stages", f"{len(paths)} instances -> {len(files)} object(s): {times}",
                        series_uid=job.series_uid, job_id=job.id)
        log.info("job %d: %s", job.id, times)
        return files

    return produce
