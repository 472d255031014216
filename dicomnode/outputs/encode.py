"""Derived objects for the PACS: DICOM SEG, a TID 1500 SR, an RT Structure Set and Secondary Capture pictures.

The integrator calls :func:`build_outputs` once per job. Everything it returns

- lies in the source's Study (same Patient, Study; the SEG also the same Frame of Reference),
- has Series/SOP Instance UIDs and SeriesNumbers that are pure functions of (source SeriesInstanceUID,
  pipeline, model name, model version, kind, index) - see :mod:`dicomnode.outputs.uids` - so a retry or a
  re-run replaces rather than duplicates what the PACS holds,
- carries dicomnode and the model in its ContributingEquipmentSequence (:mod:`.provenance`),
- has passed :func:`dicomnode.outputs.validate.check_output` (strict round trip, highdicom read-back).

Series numbers: ``series_number_base + offset`` with offsets SEG 0, SR 1, SC overlay 2, SC three-plane 3,
SC 3D surface 4, RTSTRUCT 5.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.config import OutputKind, output_kinds
from dicomnode.errors import PipelineError
from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.outputs.measure import LabelMeasures, measure_labels
from dicomnode.outputs.provenance import Provenance
from dicomnode.outputs.rtstruct import make_rtstruct
from dicomnode.outputs.sc import make_overlays, make_summaries
from dicomnode.outputs.seg import make_seg
from dicomnode.outputs.sr import make_sr
from dicomnode.outputs.uids import OutputIds, derive_uid
from dicomnode.outputs.validate import check_output

__all__ = [
    "OutputIds", "OutputKind", "Provenance", "build_encoded_outputs", "build_outputs", "check_output",
    "derive_uid",
]
log = logging.getLogger(__name__)


def load_standard_tables() -> None:
    """Load highdicom's tables of the standard (IODs, modules and their attributes: about 0.4 s of JSON
    parsing, cached for the process) now, so that a worker's first job does not pay for them. Best effort:
    they are private to highdicom, and without them the first job simply loads them itself."""
    try:
        from highdicom import _standard_utils as tables  # noqa: PLC0415 - private, so looked up at call time

        tables.get_sop_class_iod_map()
        tables.get_iod_module_map()
        tables.get_module_attribute_map()
    except Exception:  # noqa: BLE001 - a warm-up must never stop a worker
        log.debug("highdicom's standard tables were not preloaded", exc_info=True)


def resolve_kinds(kinds: Collection[str | OutputKind]) -> tuple[OutputKind, ...]:
    """The output kinds named by ``kinds`` (:func:`~dicomnode.config.output_kinds`), in output order.
    PipelineError for unknown names or SR without SEG."""
    try:
        return output_kinds(kinds)
    except ValueError as exc:
        raise PipelineError(f"output kinds: {exc}") from None


def present_labels(labels: LabelVolume) -> LabelVolume:
    """``labels`` without the label values that mark no voxel (a segment must have frames, and the SR can only
    reference segments that exist). PipelineError when no label marks anything: there is nothing to encode."""
    kept = tuple(i for i in labels.labels if np.any(labels.data == i.value))
    if not kept:
        names = ", ".join(i.name for i in labels.labels) or "no labels"
        raise PipelineError(f"the segmenter found nothing to report ({names}: all empty)")
    if len(kept) == len(labels.labels):
        return labels
    return dataclasses.replace(labels, labels=kept)


def build_outputs(volume: Volume, labels: LabelVolume, **options: Any) -> list[Dataset]:
    """The checked derived objects of :func:`build_encoded_outputs`, as datasets."""
    return [ds for ds, _ in build_encoded_outputs(volume, labels, **options)]


def build_encoded_outputs(volume: Volume, labels: LabelVolume, *, pipeline: str, series_number_base: int,
                          kinds: Collection[str | OutputKind] = ("seg", "sc", "sr"), overlay_every: int = 4,
                          overlay_max: int = 24, series_description: str | None = None,
                          algorithm_family: str = "ArtificialIntelligence", device_serial_number: str = "dicomnode",
                          institution_name: str | None = None) -> list[tuple[Dataset, bytes]]:
    """All derived objects of ``labels`` on ``volume`` with their checked Part 10 bytes, in a deterministic order.

    The bytes are exactly what :func:`check_output` read back and verified: write those, not a new encoding.

    Order: SEG, SR, RTSTRUCT, overlay SCs (increasing slice), three-plane SC, 3D surface SC (only the kinds
    asked for). ``overlay_every``: picture every n-th slice that contains a label, at most ``overlay_max`` of them.
    ``series_description`` defaults to the pipeline name; each kind appends its own suffix.
    ``algorithm_family`` is a CID 7162 keyword (e.g. "ArtificialIntelligence", "MorphologicalOperations").
    Raises PipelineError when an object cannot be built or fails its read-back check.
    """
    wanted = resolve_kinds(kinds)
    labels = present_labels(labels)
    prov = Provenance(pipeline=pipeline, model_name=labels.algorithm_name,
                      model_version=labels.algorithm_version, device_serial_number=device_serial_number,
                      algorithm_family=algorithm_family,
                      institution_name=institution_name)
    ids = OutputIds(volume.series_instance_uid, pipeline, labels.algorithm_name, labels.algorithm_version,
                    series_number_base)
    # counts, profiles and value sums of every label, measured once for the SR and all pictures
    needs_measures = (any(k not in (OutputKind.SEG, OutputKind.RTSTRUCT) for k in wanted)
                      and labels.data.shape == volume.shape)
    job = _Encoding(volume, labels, wanted, ids, prov, series_description or pipeline,
                    measure_labels(volume, labels) if needs_measures else None, overlay_every, overlay_max)
    # The two halves are independent: the pictures are drawn on a second thread while this one builds the
    # documents, so they overlap on two cores (the order of the result stays the documented one).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-pictures") as pool:
        drawn = pool.submit(_pictures, job)
        first = _documents(job)
        return first + drawn.result()


@dataclasses.dataclass(frozen=True)
class _Encoding:
    """What one job's objects are built from (see :func:`build_encoded_outputs`)."""

    volume: Volume
    labels: LabelVolume
    wanted: tuple[OutputKind, ...]
    ids: OutputIds
    prov: Provenance
    description: str
    measures: LabelMeasures | None
    overlay_every: int
    overlay_max: int


def _documents(job: _Encoding) -> list[tuple[Dataset, bytes]]:
    """SEG, SR and RTSTRUCT (highdicom and pydicom: mostly Python), each checked."""
    out: list[tuple[Dataset, bytes]] = []
    if OutputKind.SEG in job.wanted:
        seg = make_seg(job.volume, job.labels, ids=job.ids, prov=job.prov,
                       series_description=f"{job.description} SEG")
        out.append((seg, check_output(seg)))
        if OutputKind.SR in job.wanted:
            sr = make_sr(job.volume, job.labels, seg, ids=job.ids, prov=job.prov,
                         series_description=f"{job.description} measurements", measures=job.measures)
            out.append((sr, check_output(sr)))
    if OutputKind.RTSTRUCT in job.wanted:
        rt = make_rtstruct(job.volume, job.labels, ids=job.ids, prov=job.prov,
                           series_description=f"{job.description} RTSTRUCT")
        out.append((rt, check_output(rt)))
    return out


def _pictures(job: _Encoding) -> list[tuple[Dataset, bytes]]:
    """The Secondary Captures (numpy and Pillow, which release the GIL for most of their work), checked."""
    out: list[Dataset] = []
    if OutputKind.SC_OVERLAY in job.wanted:
        out.extend(make_overlays(job.volume, job.labels, ids=job.ids, prov=job.prov,
                                 series_description=job.description, every=job.overlay_every,
                                 max_count=job.overlay_max, measures=job.measures))
    summaries = [k for k in job.wanted if k in (OutputKind.SC_PLANES, OutputKind.SC_SURFACE)]
    if summaries:
        out.extend(make_summaries(job.volume, job.labels, ids=job.ids, prov=job.prov,
                                  series_description=job.description, kinds=summaries, measures=job.measures))
    return [(ds, check_output(ds)) for ds in out]
