"""RT Structure Set (PS3.3 A.19) of a :class:`~dicomnode.imaging.labels.LabelVolume`, built with pydicom.

highdicom (0.28) builds SEG and SR but no RT Structure Sets, so the modules are written here, following the IOD:
Patient, General Study and Frame of Reference (copied from the source), RT Series, General Equipment,
Structure Set, ROI Contour, RT ROI Observations and SOP Common.

Contract of :func:`make_rtstruct`:

- One ROI per label, in segment order (ROI number ``n`` = SEG segment number ``n``: increasing label value),
  with the SEG's name (ROIName) and colour (ROIDisplayColor), the label's coded type in the RT ROI
  Identification Code Sequence, RTROIInterpretedType EXTERNAL for the entire body and ORGAN otherwise, and the
  algorithm (name, version, family) in the ROI Derivation Algorithm Identification Sequence.
- Contours: for each slice ``k`` of the (z, y, x) volume and each label, the iso-line at 0.5 of the slice's
  binary mask (``skimage.measure.find_contours`` on the zero-padded mask, so every contour is closed), i.e. the
  polygon through the midpoints between inside and outside pixel centres. Every connected region gives its
  outer boundary and every hole its inner boundary, each a separate CLOSED_PLANAR contour (the last point
  joins the first; it is not repeated). Nested contours are to be read with the even-odd (XOR) rule, as
  PS3.3 C.8.8.6.3 describes for inner and outer contours. Points inside straight runs are dropped (lossless);
  only an outline too long for one DS element (64 KiB of text) is thinned (Douglas-Peucker, from 1/4 pixel).
- Coordinates: patient LPS millimetres, ``point = origin_k + row * affine[:3, 1] + column * affine[:3, 2]``
  with ``origin_k`` the slice's own ImagePositionPatient where slice ``k`` is a single-frame source image
  (so every point lies on that image's plane), else the affine's position of slice ``k``. Written with
  three decimals (micrometres).
- References: the Frame of Reference of the source; the source series with every source instance in the
  RT Referenced Series' Contour Image Sequence; each contour references the image of its slice (when the
  volume's slices map one-to-one to source images; not for resampled volumes).
- Same Patient and Study as the source, a new series (``ids``), deterministic UIDs (:mod:`.uids`).
"""

from __future__ import annotations

import copy
import datetime

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from skimage import measure

from dicomnode.config import OutputKind
from dicomnode.errors import PipelineError
from dicomnode.imaging.labels import LabelInfo, LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.outputs.provenance import MANUFACTURER, Provenance, contributing_equipment, seg_algorithm_identification
from dicomnode.outputs.seg import ordered_labels
from dicomnode.outputs.uids import OutputIds

RTSTRUCT_CLASS = UID("1.2.840.10008.5.1.4.1.1.481.3")
DETACHED_STUDY_CLASS = "1.2.840.10008.3.1.2.3.1"  # the study reference class RT objects conventionally carry
_ENTIRE_BODY = "38266002"
_MAX_DS_BYTES = 65534  # an explicit-VR DS element has a 16-bit length
_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def slice_contours(mask: npt.NDArray[np.bool_]) -> list[npt.NDArray[np.float64]]:
    """Closed contours of a 2D mask as (n, 2) arrays of (row, column) pixel coordinates, the closing point not
    repeated: outer boundaries of every region and inner boundaries of every hole (read them with even-odd).
    Points on a straight run between two others are dropped (lossless: the polygon is the same)."""
    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.uint8), 1)
    contours = measure.find_contours(padded, 0.5)  # type: ignore[no-untyped-call]
    return [_corners(contour[:-1] - 1.0) for contour in contours]


def _corners(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The vertices of a closed polygon where its direction changes (marching squares puts a point on every
    pixel edge it crosses; straight runs need only their ends)."""
    ahead = np.roll(points, -1, axis=0) - points
    behind = points - np.roll(points, 1, axis=0)
    cross = behind[:, 0] * ahead[:, 1] - behind[:, 1] * ahead[:, 0]
    same_way = (np.abs(cross) < 1e-9) & (np.einsum("ij,ij->i", behind, ahead) > 0)
    kept = points[~same_way]
    return np.asarray(kept if len(kept) >= 3 else points, dtype=np.float64)


def _slice_origins(volume: Volume) -> npt.NDArray[np.float64]:
    """(z, 3) LPS position of pixel (0, 0) of each slice: the image's own ImagePositionPatient where slice k is a
    single-frame source image, else the affine's."""
    ks = np.arange(volume.shape[0], dtype=np.float64)
    origins = volume.affine[:3, 3][None, :] + ks[:, None] * volume.affine[:3, 0][None, :]
    if volume.slices and all(s.frame_number is None for s in volume.slices):
        by_uid = {str(h.SOPInstanceUID): h for h in volume.headers}
        for k, ref in enumerate(volume.slices):
            header = by_uid.get(ref.sop_instance_uid)
            if header is not None and "ImagePositionPatient" in header:
                origins[k] = [float(v) for v in header.ImagePositionPatient]
    return origins


def _contour_data(points: npt.NDArray[np.float64]) -> list[str]:
    return [f"{v:.3f}" for v in points.ravel()]


def _image_ref(volume: Volume, k: int) -> Dataset | None:
    if not volume.slices:
        return None
    ref = volume.slices[k]
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    if ref.frame_number is not None:
        item.ReferencedFrameNumber = ref.frame_number
    return item


def roi_contours(volume: Volume, mask: npt.NDArray[np.bool_]) -> list[Dataset]:
    """Contour Sequence items (CLOSED_PLANAR, LPS mm) of one label's (z, y, x) mask, slice by slice."""
    origins = _slice_origins(volume)
    row_step, col_step = volume.affine[:3, 1], volume.affine[:3, 2]
    items: list[Dataset] = []
    for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        for rc in slice_contours(mask[k]):
            data = _contour_data(origins[k][None, :] + rc[:, :1] * row_step + rc[:, 1:] * col_step)
            tolerance = 0.25
            while sum(map(len, data)) + len(data) > _MAX_DS_BYTES:  # a huge outline: thin it until it fits
                closed = np.vstack([rc, rc[:1]])
                rc = measure.approximate_polygon(closed, tolerance)[:-1]  # type: ignore[no-untyped-call]
                data = _contour_data(origins[k][None, :] + rc[:, :1] * row_step + rc[:, 1:] * col_step)
                tolerance *= 2
            item = Dataset()
            ref = _image_ref(volume, int(k))
            if ref is not None:
                item.ContourImageSequence = [ref]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(rc)
            item.ContourNumber = len(items) + 1
            item.ContourData = data
            items.append(item)
    return items


def _roi(info: LabelInfo, number: int, volume: Volume, labels: LabelVolume, prov: Provenance) -> Dataset:
    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
    roi.ROIName = info.name[:64]
    roi.ROIGenerationAlgorithm = labels.algorithm_type
    roi.ROIGenerationDescription = f"{prov.model_name} {prov.model_version}"[:64]
    roi.ROIDerivationAlgorithmIdentificationSequence = seg_algorithm_identification(prov)
    return roi


def _observation(info: LabelInfo, number: int) -> Dataset:
    obs = Dataset()
    obs.ObservationNumber = number
    obs.ReferencedROINumber = number
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = info.type.value, info.type.scheme, info.type.meaning
    obs.RTROIIdentificationCodeSequence = [code]
    obs.RTROIInterpretedType = "EXTERNAL" if info.type.value == _ENTIRE_BODY else "ORGAN"
    obs.ROIInterpreter = ""
    return obs


def _referenced_frame_of_reference(volume: Volume) -> Dataset:
    images = []
    for ref in volume.sources:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        if ref.frame_number is not None:
            item.ReferencedFrameNumber = ref.frame_number
        images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = volume.series_instance_uid
    series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_CLASS
    study.ReferencedSOPInstanceUID = volume.study_instance_uid
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = volume.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    return frame


def _header(volume: Volume, ids: OutputIds, prov: Provenance, series_description: str) -> Dataset:
    """Patient, General Study (copied), RT Series, General Equipment, SOP Common and the file meta."""
    source = volume.headers[0]
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = UID(ids.instance_uid(OutputKind.RTSTRUCT, 0))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.SOPClassUID = RTSTRUCT_CLASS
    ds.SOPInstanceUID = ids.instance_uid(OutputKind.RTSTRUCT, 0)
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for keyword in _PATIENT_STUDY:  # copied as the source has them (type 2: empty when absent)
        if keyword in source:
            ds.add(copy.deepcopy(source[keyword]))
        else:
            setattr(ds, keyword, "")
    ds.StudyInstanceUID = volume.study_instance_uid
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = ids.series_uid(OutputKind.RTSTRUCT)
    ds.SeriesNumber = ids.series_number(OutputKind.RTSTRUCT)
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    if prov.institution_name:
        ds.InstitutionName = prov.institution_name
    ds.ManufacturerModelName = prov.pipeline[:64]
    ds.DeviceSerialNumber = prov.device_serial_number[:64]
    ds.SoftwareVersions = prov.software_version
    ds.ContributingEquipmentSequence = Sequence(contributing_equipment(prov))
    return ds


def make_rtstruct(volume: Volume, labels: LabelVolume, *, ids: OutputIds, prov: Provenance,
                  series_description: str) -> Dataset:
    """RT Structure Set of ``labels`` on ``volume`` (see the module docstring for the contract).

    Raises PipelineError when the labels do not lie on the volume's grid, describe nothing, or the volume has
    no Frame of Reference (contours are meaningless without one).
    """
    if labels.data.shape != volume.shape:
        raise PipelineError(f"label volume shape {labels.data.shape} != volume shape {volume.shape}")
    if not labels.labels:
        raise PipelineError("label volume describes no labels")
    if not volume.frame_of_reference_uid or not volume.headers:
        raise PipelineError("the source has no Frame of Reference: an RT Structure Set cannot be placed")
    ds = _header(volume, ids, prov, series_description)
    ds.StructureSetLabel = _label(prov.pipeline)
    ds.StructureSetName = f"{prov.model_name} {prov.model_version}"[:64]
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = ds.SeriesDate, ds.SeriesTime
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame_of_reference(volume)]
    rois, contours, observations = [], [], []
    for number, info in enumerate(ordered_labels(labels), start=1):
        rois.append(_roi(info, number, volume, labels, prov))
        item = Dataset()
        item.ROIDisplayColor = list(info.color_rgb)
        item.ContourSequence = roi_contours(volume, labels.mask(info.value))
        item.ReferencedROINumber = number
        contours.append(item)
        observations.append(_observation(info, number))
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations
    return ds


def _label(pipeline: str) -> str:
    """StructureSetLabel is an SH: at most 16 characters, no backslash."""
    cleaned = "".join(c if c.isalnum() or c in " _-" else "_" for c in pipeline)
    return (cleaned or "dicomnode")[:16]
