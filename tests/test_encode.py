"""Derived objects (issue 5): SEG, Secondary Capture, SR on the real P01 CT, checked by real validators."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

import dicomnode
from dicomnode.errors import PipelineError
from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.masks import lung_mask
from dicomnode.imaging.volume import Volume, load_series_dir
from dicomnode.outputs.encode import build_outputs, check_output, derive_uid
from dicomnode.outputs.render import write_pngs
from dicomnode.outputs.sc import overlay_slices
from tests.conftest import series_dir

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
KW = {"series_number_base": 9000, "overlay_every": 10, "overlay_max": 3,
      "algorithm_family": "MorphologicalOperations"}


@pytest.fixture(scope="module")
def p01() -> tuple[Volume, LabelVolume]:
    volume = load_series_dir(series_dir("P01"))
    labels = lung_mask(volume)
    return volume, labels


@pytest.fixture(scope="module")
def outputs(p01: tuple[Volume, LabelVolume]) -> list[Dataset]:
    return build_outputs(*p01, pipeline="lung", **KW)  # type: ignore[arg-type]


def _of(outputs: list[Dataset], sop_class: str) -> list[Dataset]:
    return [ds for ds in outputs if ds.SOPClassUID == sop_class]


def _dciodvfy_errors(ds: Dataset, tmp_path: Path) -> list[str]:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_every_kind_passes_dciodvfy(outputs: list[Dataset], tmp_path: Path) -> None:
    by_series: dict[int, Dataset] = {}
    for ds in outputs:
        by_series.setdefault(int(ds.SeriesNumber), ds)  # one of each kind: SEG, SR, 3 SC kinds
    assert sorted(by_series) == [9000, 9001, 9002, 9003, 9004]
    for number, ds in by_series.items():
        assert _dciodvfy_errors(ds, tmp_path) == [], f"series {number}"


def test_seg_reads_back_equal_to_mask(outputs: list[Dataset], p01: tuple[Volume, LabelVolume]) -> None:
    volume, labels = p01
    (seg_ds,) = _of(outputs, SEG_CLASS)
    buffer = BytesIO()
    seg_ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    seg = hd.seg.segread(buffer)
    uids = [s.sop_instance_uid for s in volume.slices]
    for number, info in enumerate(sorted(labels.labels, key=lambda i: i.value), start=1):
        assert seg.SegmentSequence[number - 1].SegmentLabel == info.name
        pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[number],
                                                   assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(pixels[..., 0] > 0, labels.mask(info.value))


def test_seg_frames_reference_their_source_slices(outputs: list[Dataset],
                                                 p01: tuple[Volume, LabelVolume]) -> None:
    volume, labels = p01
    (seg,) = _of(outputs, SEG_CLASS)
    step = volume.affine[:3, 0]
    non_empty = {int(k) for k in np.flatnonzero(labels.data.reshape(volume.shape[0], -1).any(axis=1))}
    seen = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        k = int(round(float(np.dot(position - volume.affine[:3, 3], step) / np.dot(step, step))))
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == volume.slices[k].sop_instance_uid
        seen.add(k)
    assert seen == non_empty  # only non-empty frames, all of them
    assert seg.StudyInstanceUID == volume.study_instance_uid
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"


def _groups(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        if child.ValueType == "CONTAINER" and child.ConceptNameCodeSequence[0].CodeValue == "125007":
            yield child
        yield from _groups(child)


def _num(group: Dataset, code: str) -> float:
    for child in group.ContentSequence:
        if child.ValueType == "NUM" and child.ConceptNameCodeSequence[0].CodeValue == code:
            return float(child.MeasuredValueSequence[0].NumericValue)
    raise KeyError(code)


def test_sr_volumes_and_means_match_the_mask(outputs: list[Dataset], p01: tuple[Volume, LabelVolume]) -> None:
    volume, labels = p01
    (sr,) = _of(outputs, SR_CLASS)
    (seg,) = _of(outputs, SEG_CLASS)
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000.0
    groups = list(_groups(sr))
    assert len(groups) == len(labels.labels)
    for number, (group, info) in enumerate(zip(groups, sorted(labels.labels, key=lambda i: i.value),
                                               strict=True), start=1):
        mask = labels.mask(info.value)
        assert _num(group, "118565006") == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
        assert _num(group, "112031") == pytest.approx(volume.data[mask].mean(), abs=0.05)
        ref = next(c for c in group.ContentSequence if c.ValueType == "IMAGE")
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert ref.ReferencedSOPSequence[0].ReferencedSegmentNumber == number
        # TID 1411 "Source series for segmentation" (the SEG's frames name their exact source slices)
        (series,) = [c for c in group.ContentSequence if c.ValueType == "UIDREF"
                     and c.ConceptNameCodeSequence[0].CodeValue == "121232"]
        assert series.UID == volume.series_instance_uid


def test_uids_are_deterministic_and_pipeline_scoped(outputs: list[Dataset],
                                                    p01: tuple[Volume, LabelVolume]) -> None:
    again = build_outputs(*p01, pipeline="lung", **KW)  # type: ignore[arg-type]
    ids = [(ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber) for ds in outputs]
    assert ids == [(ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber) for ds in again]
    other = build_outputs(*p01, pipeline="lung-v2", kinds=("seg",), **KW)  # type: ignore[arg-type]
    assert other[0].SOPInstanceUID not in {ds.SOPInstanceUID for ds in outputs}
    assert other[0].SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in outputs}
    assert len({uid for _, uid, _ in ids}) == len(ids)


def test_sc_pictures_belong_to_the_source_study(outputs: list[Dataset], p01: tuple[Volume, LabelVolume],
                                                tmp_path: Path) -> None:
    volume, _ = p01
    source = volume.headers[0]
    scs = _of(outputs, SC_CLASS)
    assert len(scs) == 3 + 2
    for ds in scs:
        assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
        assert ds.SeriesInstanceUID != volume.series_instance_uid
        assert (ds.BurnedInAnnotation, ds.ConversionType) == ("YES", "WSD")
        header = ds.pixel_array[30:60, :300].reshape(-1, 3).astype(int)  # the red "NOT FOR DIAGNOSTIC USE"
        assert np.any((header[:, 0] > 200) & (header[:, 1] < 120)), "warning label missing"
    assert len(write_pngs(outputs, tmp_path)) == len(scs)


def test_every_output_names_dicomnode_and_the_model(outputs: list[Dataset]) -> None:
    for ds in outputs:
        # highdicom lists the source's acquisition equipment first (SEG) and itself last
        equipment = ds.ContributingEquipmentSequence
        items = [i for i in equipment if i.get("ManufacturerModelName") == ds_model(ds)]
        assert len(items) == 1, [(i.Manufacturer, i.get("ManufacturerModelName")) for i in
                                 ds.ContributingEquipmentSequence]
        item = items[0]
        assert item.Manufacturer == "dicomnode"
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert dicomnode.__version__ in item.SoftwareVersions


def ds_model(ds: Dataset) -> str:
    return "dicomnode-classical-lung"


def test_check_output_rejects_broken_objects(outputs: list[Dataset]) -> None:
    broken = copy.deepcopy(_of(outputs, SC_CLASS)[0])
    del broken.StudyInstanceUID
    with pytest.raises(PipelineError, match="StudyInstanceUID"):
        check_output(broken)
    bad_uid = copy.deepcopy(_of(outputs, SC_CLASS)[0])
    bad_uid.SeriesInstanceUID = "1.2.abc"
    with pytest.raises(PipelineError):
        check_output(bad_uid)


def test_derive_uid_is_a_pure_valid_uid() -> None:
    uid = derive_uid("1.2.3", "lung", "model", "1", "seg", "series")
    assert uid == derive_uid("1.2.3", "lung", "model", "1", "seg", "series")
    assert uid != derive_uid("lung", "1.2.3", "model", "1", "seg", "series")
    assert uid.startswith("2.25.") and len(uid) <= 64 and all(p.isdigit() for p in uid.split("."))


def test_overlay_slice_choice(p01: tuple[Volume, LabelVolume]) -> None:
    _, labels = p01
    chosen = overlay_slices(labels, every=2, max_count=5)
    assert len(chosen) == 5 and chosen == sorted(chosen)
    assert all(labels.data[k].any() for k in chosen)
    with pytest.raises(ValueError):
        overlay_slices(labels, every=0)


def test_standard_tables_are_loaded_ahead_of_the_first_job() -> None:
    """Workers load highdicom's tables of the standard at start-up (about 0.4 s of JSON) instead of in the first
    job, which is what a radiologist waits for."""
    from highdicom import _standard_utils as tables

    from dicomnode.outputs.encode import load_standard_tables

    loaders = (tables.get_sop_class_iod_map, tables.get_iod_module_map, tables.get_module_attribute_map)
    for loader in loaders:
        loader.cache_clear()
    load_standard_tables()
    assert [loader.cache_info().currsize for loader in loaders] == [1, 1, 1]
