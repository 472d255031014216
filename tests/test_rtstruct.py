"""RT Structure Set output (issue 15): dciodvfy, read back by plastimatch and by a polygon rasteriser, references."""

from __future__ import annotations

import copy
import subprocess
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from skimage.draw import polygon

from dicomnode.config import parse_config
from dicomnode.errors import PipelineError
from dicomnode.imaging.labels import AIRWAYS, LabelVolume
from dicomnode.imaging.masks import lung_mask
from dicomnode.imaging.volume import Volume, load_series_dir
from dicomnode.outputs.encode import build_encoded_outputs, check_output
from dicomnode.outputs.rtstruct import slice_contours
from tests.conftest import series_dir

RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
KW: dict[str, Any] = {"pipeline": "lung", "series_number_base": 9000, "algorithm_family": "MorphologicalOperations"}


@pytest.fixture(scope="module")
def p01() -> tuple[Volume, LabelVolume]:
    volume = load_series_dir(series_dir("P01"))
    return volume, lung_mask(volume)


@pytest.fixture(scope="module")
def encoded(p01: tuple[Volume, LabelVolume]) -> dict[str, tuple[Dataset, bytes]]:
    out = build_encoded_outputs(*p01, kinds=("seg", "rtstruct"), **KW)
    return {str(ds.Modality): (ds, data) for ds, data in out}


def rasterise(ds: Dataset, volume: Volume) -> dict[int, npt.NDArray[np.bool_]]:
    """ROI number -> (z, y, x) mask: each contour's points back to array indices through the volume's affine,
    filled with skimage.draw.polygon, contours of a slice combined with the even-odd rule (XOR)."""
    inverse = np.linalg.inv(volume.affine)
    masks = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(volume.shape, bool)
        for contour in roi.ContourSequence:
            lps = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            index = lps @ inverse[:3, :3].T + inverse[:3, 3]
            k = int(round(float(index[:, 0].mean())))
            assert np.abs(index[:, 0] - k).max() < 1e-3  # every point on the plane of one slice
            rows, cols = polygon(index[:, 1], index[:, 2], shape=volume.shape[1:])
            filled = np.zeros(volume.shape[1:], bool)
            filled[rows, cols] = True
            mask[k] ^= filled
        masks[int(roi.ReferencedROINumber)] = mask
    return masks


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_rtstruct_passes_dciodvfy(encoded: dict[str, tuple[Dataset, bytes]], tmp_path: Path) -> None:
    path = tmp_path / "rtstruct.dcm"
    path.write_bytes(encoded["RTSTRUCT"][1])
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_contours_read_back_into_the_lung_masks(encoded: dict[str, tuple[Dataset, bytes]],
                                                p01: tuple[Volume, LabelVolume]) -> None:
    volume, labels = p01
    ds = pydicom.dcmread(BytesIO(encoded["RTSTRUCT"][1]))
    masks = rasterise(ds, volume)
    assert sorted(masks) == [1, 2, 3]  # ROI n = SEG segment n = n-th label by value
    for number, value in ((1, 1), (2, 2), (3, 3)):
        assert dice(masks[number], labels.mask(value)) >= 0.98
    assert np.array_equal(masks[1], labels.mask(1))  # the iso-line at 0.5 gives back the very voxels


def test_plastimatch_reads_the_rtstruct_back_into_the_lung_masks(encoded: dict[str, tuple[Dataset, bytes]],
                                                                 p01: tuple[Volume, LabelVolume],
                                                                 tmp_path: Path) -> None:
    """plastimatch (Debian package), an independent reader, rasterises the structures on the source CT."""
    volume, labels = p01
    path = tmp_path / "rtstruct.dcm"
    path.write_bytes(encoded["RTSTRUCT"][1])
    out = tmp_path / "masks"
    run = subprocess.run(["plastimatch", "convert", "--input", str(path), "--referenced-ct", str(series_dir("P01")),
                          "--output-prefix", str(out), "--prefix-format", "nii.gz"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for value, name in ((1, "Right lung"), (2, "Left lung"), (3, "Airways")):
        image: Any = nib.load(out / f"{name}.nii.gz")
        data = np.asarray(image.dataobj) > 0
        ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        to_index = np.linalg.inv(volume.affine) @ ras_to_lps @ image.affine
        i, j, k = np.nonzero(data)
        zyx = np.rint(to_index[:3] @ np.vstack([i, j, k, np.ones_like(i)])).astype(int)
        got = np.zeros(volume.shape, bool)
        got[zyx[0], zyx[1], zyx[2]] = True
        assert dice(got, labels.mask(value)) >= 0.98, name


def test_rtstruct_references_the_source_and_matches_the_seg(encoded: dict[str, tuple[Dataset, bytes]],
                                                            p01: tuple[Volume, LabelVolume]) -> None:
    volume, labels = p01
    ds = pydicom.dcmread(BytesIO(encoded["RTSTRUCT"][1]))
    assert ds.SOPClassUID == RTSTRUCT_CLASS and ds.Modality == "RTSTRUCT" and ds.SeriesNumber == 9005
    assert ds.StudyInstanceUID == volume.study_instance_uid
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == volume.frame_of_reference_uid
    (series,) = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.series_instance_uid
    listed = {str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence}
    assert listed == {s.sop_instance_uid for s in volume.slices}
    headers = {str(h.SOPInstanceUID): h for h in volume.headers}
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:  # each contour lies on the plane of the image it references
            (ref,) = contour.ContourImageSequence
            header = headers[str(ref.ReferencedSOPInstanceUID)]
            iop = np.asarray(header.ImageOrientationPatient, dtype=float)
            normal = np.cross(iop[:3], iop[3:])
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            offsets = (points - np.asarray(header.ImagePositionPatient, dtype=float)) @ normal
            assert np.abs(offsets).max() < 1e-3
    seg = hd.seg.Segmentation.from_dataset(encoded["SEG"][0])
    for roi, contour, obs in zip(ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence,
                                 strict=True):
        segment = seg.get_segment_description(int(roi.ROINumber))
        info = labels.label(int(roi.ROINumber))
        assert roi.ROIName == segment.segment_label == info.name
        assert roi.ReferencedFrameOfReferenceUID == volume.frame_of_reference_uid
        assert tuple(contour.ROIDisplayColor) == info.color_rgb
        assert obs.RTROIInterpretedType == "ORGAN"
        assert obs.RTROIIdentificationCodeSequence[0].CodeValue == info.type.value
        assert roi.ROIDerivationAlgorithmIdentificationSequence[0].AlgorithmName == labels.algorithm_name


def test_rtstruct_uids_are_deterministic(encoded: dict[str, tuple[Dataset, bytes]],
                                         p01: tuple[Volume, LabelVolume]) -> None:
    again = build_encoded_outputs(*p01, kinds=("rtstruct",), **KW)
    ((ds, _),) = again
    first = encoded["RTSTRUCT"][0]
    assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (first.SOPInstanceUID, first.SeriesInstanceUID)
    other = build_encoded_outputs(*p01, kinds=("rtstruct",), **{**KW, "pipeline": "other"})
    assert other[0][0].SeriesInstanceUID != first.SeriesInstanceUID


def test_holes_and_islands_become_outer_and_inner_contours(p01: tuple[Volume, LabelVolume]) -> None:
    """A ring (a hole) with an island in its hole and a separate island: four contours, read back exactly."""
    volume, _ = p01
    yy, xx = np.mgrid[: volume.shape[1], : volume.shape[2]]
    radius = np.hypot(yy - 200, xx - 200)
    plane = (radius <= 60) & (radius > 30) | (radius <= 10) | (np.hypot(yy - 400, xx - 100) <= 20)
    data = np.zeros(volume.shape, np.uint8)
    data[10:13][:, plane] = 3
    labels = LabelVolume(data, (AIRWAYS,), "shapes", "1")
    assert len(slice_contours(plane)) == 4
    ((ds, encoded),) = build_encoded_outputs(volume, labels, kinds=("rtstruct",), **KW)
    back = pydicom.dcmread(BytesIO(encoded))
    assert len(back.ROIContourSequence[0].ContourSequence) == 3 * 4
    assert np.array_equal(rasterise(back, volume)[1], data == 3)


def test_check_output_refuses_broken_structure_sets(encoded: dict[str, tuple[Dataset, bytes]]) -> None:
    good = encoded["RTSTRUCT"][0]
    off_plane = copy.deepcopy(good)
    contour = off_plane.ROIContourSequence[0].ContourSequence[0]
    values = [float(v) for v in contour.ContourData]
    values[2] += 5.0  # the first point leaves the slice's plane
    contour.ContourData = [f"{v:.3f}" for v in values]
    with pytest.raises(PipelineError, match="do not lie on one plane"):
        check_output(off_plane)
    unobserved = copy.deepcopy(good)
    unobserved.RTROIObservationsSequence = unobserved.RTROIObservationsSequence[1:]
    with pytest.raises(PipelineError, match="ROI 1 has no contours or no observation"):
        check_output(unobserved)


def test_rtstruct_is_an_output_kind_of_the_config() -> None:
    cfg = parse_config({"pipelines": [{"name": "p", "kind": "segment",
                                       "outputs": {"kinds": ["sc-planes", "rtstruct", "seg"]}}]})
    kinds = [k.value for k in cfg.pipeline("p").outputs.kinds]
    assert kinds == ["seg", "rtstruct", "sc-planes"]  # output order: after SEG and SR, before the pictures


def test_an_outline_too_long_for_one_element_is_thinned_until_it_fits(p01: tuple[Volume, LabelVolume]) -> None:
    """A comb whose one outline has thousands of corners: its ContourData must stay under the 64 KiB an explicit
    VR DS element can hold, and still read back close to the mask."""
    volume, _ = p01
    plane = np.zeros(volume.shape[1:], bool)
    plane[100:110, 20:490] = True
    for column in range(20, 490, 2):  # teeth one pixel wide, one apart: about 1,900 corners
        plane[110:400, column] = True
    data = np.zeros(volume.shape, np.uint8)
    data[20][plane] = 3
    labels = LabelVolume(data, (AIRWAYS,), "comb", "1")
    ((ds, encoded),) = build_encoded_outputs(volume, labels, kinds=("rtstruct",), **KW)
    (contour,) = ds.ROIContourSequence[0].ContourSequence
    assert len("\\".join(str(v) for v in contour.ContourData)) <= 65534
    back = rasterise(pydicom.dcmread(BytesIO(encoded)), volume)[1]
    assert dice(back, data == 3) >= 0.9


def test_a_body_outline_is_an_external_roi_that_passes_dciodvfy(tmp_path: Path) -> None:
    from dicomnode.inference.segmenter import build_segmenter

    volume = load_series_dir(series_dir("P03"))
    labels = build_segmenter("body").segment(volume)
    ((ds, encoded),) = build_encoded_outputs(volume, labels, kinds=("rtstruct",), **{**KW, "pipeline": "body"})
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "EXTERNAL"  # the RT name of the body outline
    path = tmp_path / "body.dcm"
    path.write_bytes(encoded)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []
    assert dice(rasterise(pydicom.dcmread(BytesIO(encoded)), volume)[1], labels.mask(1)) >= 0.98
