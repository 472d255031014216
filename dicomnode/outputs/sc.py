"""Secondary Capture images (highdicom ``sc.SCImage``) of the rendered pictures, readable in any viewer.

Contract of every SC built here:

- RGB 8-bit, single frame, uncompressed (Explicit VR Little Endian): the most widely displayable form.
- Patient and Study copied from the source (``SCImage.from_ref_dataset``), a new series per picture kind
  with deterministic Series/SOP Instance UIDs and series number from
  :class:`~dicomnode.outputs.uids.OutputIds`.
- ConversionType WSD (workstation), BurnedInAnnotation YES (the pictures carry text, including
  "NOT FOR DIAGNOSTIC USE"), ImageType DERIVED\\SECONDARY, ContributingEquipmentSequence from provenance.
- PatientOrientation is (L, P) for native axial overlays (row direction to patient Left, column
  direction towards Posterior); multi-panel pictures have no single orientation, so it is sent empty
  (Type 2C, allowed empty).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.config import OutputKind
from dicomnode.errors import PipelineError
from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.outputs.measure import LabelMeasures, measure_labels
from dicomnode.outputs.provenance import (
    Provenance,
    contributing_equipment,
    drop_incomplete_study_references,
)
from dicomnode.outputs.render import RGB, axial_overlay, three_plane
from dicomnode.outputs.surface import surface_view
from dicomnode.outputs.uids import OutputIds

_DESCRIPTIONS = {
    OutputKind.SC_OVERLAY: "overlay",
    OutputKind.SC_PLANES: "3 planes",
    OutputKind.SC_SURFACE: "3D surface",
}


def overlay_slices(labels: LabelVolume, *, every: int = 4, max_count: int = 24,
                   measures: LabelMeasures | None = None) -> list[int]:
    """0-based slice indices to picture: every ``every``-th slice containing any label, at most ``max_count``.

    When more would qualify, ``max_count`` are spread evenly over the qualifying slices (first and last
    kept). With ``measures`` only described labels count (they are what the pictures show). Raises
    ValueError for ``every`` < 1 or ``max_count`` < 1.
    """
    if every < 1 or max_count < 1:
        raise ValueError(f"every ({every}) and max_count ({max_count}) must be >= 1")
    if measures is not None:
        present = measures.slices_with_labels()
    else:
        present = np.flatnonzero(labels.data.reshape(labels.data.shape[0], -1).any(axis=1))
    chosen = present[::every]
    if len(chosen) > max_count:
        picks = np.unique(np.round(np.linspace(0, len(chosen) - 1, max_count)).astype(int))
        chosen = chosen[picks]
    return [int(k) for k in chosen]


def make_sc(picture: RGB, ref: Dataset, *, ids: OutputIds, kind: OutputKind, index: int, prov: Provenance,
            series_description: str, orientation: tuple[str, str] | None) -> hd.sc.SCImage:
    """One SC image of ``picture`` (rows, cols, 3 uint8); ``index`` is 0-based (InstanceNumber index+1)."""
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise PipelineError(f"SC picture must be (rows, cols, 3) uint8, got {picture.shape} {picture.dtype}")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=np.ascontiguousarray(picture),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=ids.series_uid(kind),
        series_number=ids.series_number(kind),
        sop_instance_uid=ids.instance_uid(kind, index),
        instance_number=index + 1,
        manufacturer="dicomnode",
        patient_orientation=orientation or ("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(prov),
        series_description=series_description[:64],
        manufacturer_model_name=prov.pipeline[:64],
        software_versions=prov.software_version,
    )
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    if "Laterality" not in sc:
        sc.add_new("Laterality", "CS", None)  # Type 2C for paired parts (CHEST): empty = both / unknown
    if orientation is None:
        del sc.PatientOrientation
        sc.add_new("PatientOrientation", "CS", None)
    sc.DerivationDescription = f"{prov.pipeline}: {prov.model_name} {prov.model_version}"[:1024]
    drop_incomplete_study_references(sc)
    return sc


def make_overlays(volume: Volume, labels: LabelVolume, *, ids: OutputIds, prov: Provenance,
                  series_description: str, every: int = 4, max_count: int = 24,
                  measures: LabelMeasures | None = None) -> list[hd.sc.SCImage]:
    """Windowed source slices with the labels drawn over, one SC each (see :func:`overlay_slices`)."""
    title = f"{series_description}: {prov.model_name} {prov.model_version}"
    out = []
    for index, k in enumerate(overlay_slices(labels, every=every, max_count=max_count, measures=measures)):
        picture = axial_overlay(volume, labels, k, title=title)
        orientation = ("L", "P") if _is_axial(volume) else None
        out.append(make_sc(picture, volume.headers[0], ids=ids, kind=OutputKind.SC_OVERLAY, index=index,
                           prov=prov, series_description=f"{series_description} overlay",
                           orientation=orientation))
    return out


def make_summaries(volume: Volume, labels: LabelVolume, *, ids: OutputIds, prov: Provenance,
                   series_description: str, kinds: Sequence[OutputKind],
                   measures: LabelMeasures | None = None) -> list[hd.sc.SCImage]:
    """The three-plane and/or 3D surface pictures, one SC series each, in the order of ``kinds``.

    ``measures``: :func:`~dicomnode.outputs.measure.measure_labels` of the same inputs, computed when None.
    """
    title = f"{series_description}: {prov.model_name} {prov.model_version}"
    measures = measures or measure_labels(volume, labels)
    out = []
    for kind in kinds:
        if kind == OutputKind.SC_PLANES:
            picture = three_plane(volume, labels, title=title, measures=measures)
        elif kind == OutputKind.SC_SURFACE:
            picture = surface_view(volume, labels, title=title, measures=measures)
        else:
            raise ValueError(f"{kind} is not a summary picture kind")
        out.append(make_sc(picture, volume.headers[0], ids=ids, kind=kind, index=0, prov=prov,
                           series_description=f"{series_description} {_DESCRIPTIONS[kind]}",
                           orientation=None))
    return out


def _is_axial(volume: Volume) -> bool:
    """True when the slice normal is closest to the patient S axis (display then has L right, P down)."""
    normal = volume.direction[:, 0]
    return int(np.argmax(np.abs(normal))) == 2
