"""TID 1500 Measurement Report (Comprehensive 3D SR, highdicom) with per-segment volume and mean value.

Contract of :func:`make_sr`:

- One TID 1411 Volumetric ROI group per segment of the given SEG, each referencing that segment
  (SEG SOP instance and segment number) and the source series (TID 1411 "Source series for segmentation",
  the standard's alternative to listing every source image: the SEG's frames already name their exact source
  slices in DerivationImageSequence, so repeating them per segment - 3 x 300 content items for a 300-slice
  lung series - added nothing but build and check time), with
  tracking identifier and UID equal to the segment's TrackingID/TrackingUID, finding type = the segment's
  property type, finding site with laterality, and the algorithm identification.
- Measurements per segment: Volume (SCT 118565006) in millilitres, UCUM ``ml``, = voxel count x voxel
  volume (|det| of the affine's 3x3 part, mm^3) / 1000; and, for CT, Attenuation Coefficient (DCM 112031)
  with derivation Mean (SCT 373098007) in UCUM ``[hnsf'U]`` over the segment's voxels. Values are rounded
  to 3 decimals (volume) and 1 decimal (HU).
- Observer: the node as a device (deterministic Device Observer UID). Evidence: the SEG and the source
  instances, so the SR inherits Patient and Study from them and lists them in its evidence sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from dicomnode.config import OutputKind
from dicomnode.errors import PipelineError
from dicomnode.imaging.labels import LabelInfo, LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.outputs.measure import LabelMeasures, measure_labels
from dicomnode.outputs.provenance import (
    MANUFACTURER,
    Provenance,
    contributing_equipment,
    drop_incomplete_study_references,
    sr_algorithm_identification,
)
from dicomnode.outputs.seg import ordered_labels
from dicomnode.outputs.uids import OutputIds

ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
HU = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")


@dataclass(frozen=True)
class SegmentStats:
    """Measurements of one label: volume in mL and mean value in the volume's units (None when empty)."""

    label: LabelInfo
    voxels: int
    volume_ml: float
    mean: float | None


def voxel_volume_mm3(volume: Volume) -> float:
    """Volume of one voxel in mm^3: |det| of the affine's 3x3 part (exact also for sheared grids)."""
    return float(abs(np.linalg.det(volume.affine[:3, :3])))


def segment_stats(volume: Volume, labels: LabelVolume,
                  measures: LabelMeasures | None = None) -> list[SegmentStats]:
    """Per label, in segment order: voxel count, volume (mL) and mean value over the label's voxels.

    ``measures`` (from :func:`~dicomnode.outputs.measure.measure_labels` on the same inputs) saves
    measuring again.
    """
    measures = measures or measure_labels(volume, labels)
    per_voxel = voxel_volume_mm3(volume)
    out = []
    for info in ordered_labels(labels):
        item = measures.of(info.value)
        out.append(SegmentStats(info, item.voxels, item.voxels * per_voxel / 1000.0, item.mean))
    return out


def _measurements(stats: SegmentStats, volume: Volume) -> list[hd.sr.Measurement]:
    items = [hd.sr.Measurement(name=codes.SCT.Volume, value=round(stats.volume_ml, 3), unit=ML)]
    if stats.mean is not None and volume.units == "HU":
        items.append(hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=round(stats.mean, 1),
                                       unit=HU, derivation=codes.SCT.Mean))
    return items


def _group(seg: hd.seg.Segmentation, number: int, stats: SegmentStats, volume: Volume,
           prov: Provenance) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    item = seg.SegmentSequence[number - 1]
    info = stats.label
    site = hd.sr.FindingSite(
        anatomic_location=hd.sr.CodedConcept(info.type.value, info.type.scheme, info.type.meaning),
        laterality=(hd.sr.CodedConcept(info.laterality.value, info.laterality.scheme, info.laterality.meaning)
                    if info.laterality is not None else None),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=item.TrackingUID, identifier=item.TrackingID),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid)),
        finding_type=hd.sr.CodedConcept(info.type.value, info.type.scheme, info.type.meaning),
        finding_category=hd.sr.CodedConcept(info.category.value, info.category.scheme, info.category.meaning),
        finding_sites=[site],
        algorithm_id=sr_algorithm_identification(prov),
        measurements=_measurements(stats, volume),
    )


def make_sr(volume: Volume, labels: LabelVolume, seg: hd.seg.Segmentation, *, ids: OutputIds,
            prov: Provenance, series_description: str,
            measures: LabelMeasures | None = None) -> hd.sr.Comprehensive3DSR:
    """The measurement report of ``labels`` referencing ``seg`` (made by make_seg from the same labels).

    ``measures``: see :func:`segment_stats`. Raises PipelineError when the SEG's segments do not match the
    labels one to one.
    """
    stats = segment_stats(volume, labels, measures)
    if len(seg.SegmentSequence) != len(stats):
        raise PipelineError(f"SEG has {len(seg.SegmentSequence)} segments, labels {len(stats)}")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ids.uid("device", prov.device_serial_number), name=MANUFACTURER,
            manufacturer_name=MANUFACTURER, model_name=prov.pipeline[:64]),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.ImagingProcedure,
        imaging_measurements=[_group(seg, n + 1, s, volume, prov) for n, s in enumerate(stats)],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *volume.headers],
        content=report[0],
        series_instance_uid=ids.series_uid(OutputKind.SR),
        series_number=ids.series_number(OutputKind.SR),
        sop_instance_uid=ids.instance_uid(OutputKind.SR, 0),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=series_description[:64],
        contributing_equipment=contributing_equipment(prov),
    )
    drop_incomplete_study_references(sr)
    return sr
