"""DICOM Segmentation (binary SEG) of a :class:`~dicomnode.imaging.labels.LabelVolume`, built with highdicom.

Contract of :func:`make_seg`:

- One segment per :class:`~dicomnode.imaging.labels.LabelInfo`, in increasing label value; segment numbers are
  1-based and consecutive (segment ``n`` is the ``n``-th label by value, not necessarily label value ``n``).
- Each segment carries its coded category and type (SNOMED CT), laterality as Segmented Property Type
  Modifier (CID 244), the recommended display colour, a deterministic tracking UID/ID, and the algorithm
  identification (name, version, family) with SegmentAlgorithmType from the label volume (AUTOMATIC).
- When the volume's slices map one-to-one to single-frame source images, frame ``k`` of the mask is
  passed with source image ``k`` so every SEG frame's DerivationImageSequence references the SOP instance
  it was computed from. Otherwise (resampled or multi-frame sources) the mask is passed as a highdicom
  Volume with the volume's affine and highdicom infers references from geometry where it can.
- Same Study and Frame of Reference as the source (copied by highdicom), a new series from ``ids``.
- Only non-empty frames are stored. BINARY segmentations are bit-packed and stored uncompressed
  (Explicit VR Little Endian): highdicom compresses only FRACTIONAL/LABELMAP, and bit-packing already makes
  a binary frame 1/16 of a CT slice; every PACS reads it.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.config import OutputKind
from dicomnode.errors import PipelineError
from dicomnode.imaging.labels import LabelInfo, LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.outputs.provenance import (
    MANUFACTURER,
    Provenance,
    contributing_equipment,
    drop_incomplete_study_references,
    seg_algorithm_identification,
)
from dicomnode.outputs.uids import OutputIds


def ordered_labels(labels: LabelVolume) -> tuple[LabelInfo, ...]:
    """The labels in segment order: increasing label value (segment number = position + 1)."""
    return tuple(sorted(labels.labels, key=lambda info: info.value))


def segment_description(info: LabelInfo, number: int, ids: OutputIds, prov: Provenance,
                        algorithm_type: str) -> hd.seg.SegmentDescription:
    """The Segment Description macro item of one label (``number`` is the 1-based segment number)."""
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=info.name[:64],
        segmented_property_category=hd.sr.CodedConcept(info.category.value, info.category.scheme,
                                                       info.category.meaning),
        segmented_property_type=hd.sr.CodedConcept(info.type.value, info.type.scheme, info.type.meaning),
        algorithm_type=algorithm_type,
        algorithm_identification=seg_algorithm_identification(prov),
        tracking_uid=ids.uid("segment", str(info.value), info.name),
        tracking_id=info.name[:64],
        display_color=hd.color.CIELabColor.from_rgb(*info.color_rgb),
    )
    if info.description:
        desc.SegmentDescription = info.description[:64]
    if info.laterality is not None:
        lat = info.laterality
        # (0062,0011) is nested in the Segmented Property Type Code Sequence item (PS3.3 C.8.20-4)
        type_item = desc.SegmentedPropertyTypeCodeSequence[0]
        type_item.SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(lat.value, lat.scheme, lat.meaning)]
    return desc


def _segment_map(labels: LabelVolume) -> npt.NDArray[np.uint8]:
    """(z, y, x) uint8 array of 1-based segment numbers (0 = background): highdicom's *label map* style.

    Equivalent to stacking one 0/1 mask per segment, but highdicom then only checks the maximum instead of
    summing a (z, y, x, n) stack for overlaps (labels cannot overlap), and builds each frame's binary mask
    with one comparison per plane. Label values without a description map to background, as before.
    """
    order = ordered_labels(labels)
    values = [info.value for info in order]
    data = np.asarray(labels.data, dtype=np.uint8)
    if values == list(range(1, len(values) + 1)) and int(data.max(initial=0)) <= len(values):
        return data  # the common case: label value = segment number, nothing to remap
    lut = np.zeros(256, dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    return lut[data]


def _sources_in_slice_order(volume: Volume) -> list[Dataset] | None:
    """Source headers aligned with the volume's slices, or None when slices are not single-frame images."""
    if not volume.slices or any(s.frame_number is not None for s in volume.slices):
        return None
    by_uid = {str(h.SOPInstanceUID): h for h in volume.headers}
    try:
        return [by_uid[s.sop_instance_uid] for s in volume.slices]
    except KeyError as exc:
        raise PipelineError(f"volume slice {exc} has no source header") from exc


def _pixels_and_sources(volume: Volume, labels: LabelVolume) -> tuple[npt.NDArray[np.uint8] | hd.Volume,
                                                                      list[Dataset]]:
    segments = _segment_map(labels)
    ordered = _sources_in_slice_order(volume)
    if ordered is not None:
        return segments, ordered
    hd_volume = hd.Volume(
        array=segments,
        affine=volume.affine,
        coordinate_system="PATIENT",
        frame_of_reference_uid=volume.frame_of_reference_uid,
    )
    return hd_volume, list(volume.headers)


def make_seg(volume: Volume, labels: LabelVolume, *, ids: OutputIds, prov: Provenance,
             series_description: str) -> hd.seg.Segmentation:
    """Binary SEG of ``labels`` on ``volume`` (see the module docstring for the contract).

    Raises PipelineError when the label volume does not lie on the volume's grid or has no labels.
    """
    if labels.data.shape != volume.shape:
        raise PipelineError(f"label volume shape {labels.data.shape} != volume shape {volume.shape}")
    if not labels.labels:
        raise PipelineError("label volume describes no labels")
    pixels, sources = _pixels_and_sources(volume, labels)
    descriptions = [segment_description(info, n + 1, ids, prov, labels.algorithm_type)
                    for n, info in enumerate(ordered_labels(labels))]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=ids.series_uid(OutputKind.SEG),
        series_number=ids.series_number(OutputKind.SEG),
        sop_instance_uid=ids.instance_uid(OutputKind.SEG, 0),
        instance_number=1,
        series_description=series_description[:64],
        content_label=_content_label(prov.pipeline),
        content_description=f"{prov.model_name} {prov.model_version}"[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
        contributing_equipment=contributing_equipment(prov),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=prov.pipeline[:64],
        software_versions=prov.software_version,
        device_serial_number=prov.device_serial_number[:64],
        institution_name=prov.institution_name,
    )
    drop_incomplete_study_references(seg)
    return seg


def _content_label(pipeline: str) -> str:
    """ContentLabel is a CS: upper case letters, digits, space and underscore, at most 16 characters."""
    cleaned = "".join(c if c.isalnum() else "_" for c in pipeline.upper())
    return (cleaned or "DICOMNODE")[:16]
