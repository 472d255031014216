"""dicomnode.imaging.volume on the real shared series: geometry against dcm2niix, decoding, rescale, error cases."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from dicomnode.errors import VolumeError
from dicomnode.imaging.pixels import read_file, stored_values
from dicomnode.imaging.volume import Volume, VolumeOptions, load_series, load_series_dir
from tests.conftest import series_dir

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# dcm2niix's storage order versus ours, as a signed permutation: row r of the matrix says which of our index
# axes (k, j, i) becomes dcm2niix's index axis r (0 = x/i, 1 = y/j, 2 = z/k), with its sign (-1 = reversed).
# dcm2niix stores the image rows bottom-up (row flip) and, for 3D MR, reorients towards RAS.
D2N_AXES = {
    "P01": [[0, 0, 1], [0, -1, 0], [1, 0, 0]],  # (i, -j, k): rows flipped
    "P02": [[0, 0, 1], [0, -1, 0], [1, 0, 0]],
    "P03": [[0, 0, 1], [0, -1, 0], [1, 0, 0]],
    "P04": [[0, 0, -1], [0, -1, 0], [1, 0, 0]],  # (-i, -j, k): in-plane 180 degrees
    "P05": [[1, 0, 0], [0, 0, -1], [0, -1, 0]],  # sagittal 3D: (k, -i, -j)
    "P06": [[1, 0, 0], [0, 0, -1], [0, -1, 0]],
}


def _dcm2niix(series: Path, out: Path, name: str) -> list[Path]:
    if shutil.which("dcm2niix") is None:
        pytest.fail("dcm2niix is required for the geometry tests (apt-get install dcm2niix)")
    # -p n: Philips display values (RescaleSlope/Intercept, as our contract), not "precise" private scaling
    subprocess.run(["dcm2niix", "-p", "n", "-z", "y", "-f", name, "-o", str(out), str(series)], check=True,
                   capture_output=True)
    return sorted(out.glob(f"{name}*.nii.gz"))


def _to_dcm2niix_order(data: npt.NDArray[np.float32], axes: list[list[int]]) -> npt.NDArray[np.float32]:
    """Our (k, j, i) array rearranged into dcm2niix's (x, y, z) storage order with the flips of ``axes``."""
    perm = [int(np.flatnonzero(row)[0]) for row in axes]
    out = np.transpose(data, perm)
    for axis, row in enumerate(axes):
        if sum(row) < 0:
            out = np.flip(out, axis=axis)
    return np.asarray(out)


def _compare_with_dcm2niix(volume: Volume, nifti: Path, series: str, *, use_qform: bool = False,
                           ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Assert shape and affine (0.01 mm) against dcm2niix; return (ours, dcm2niix's) voxels in its order."""
    image: Any = nib.load(nifti)
    ras = image.get_qform() if use_qform else image.affine
    index_map = np.linalg.inv(LPS_FROM_RAS @ ras) @ volume.affine  # our (k, j, i) -> dcm2niix (x, y, z)
    axes = np.round(index_map[:3, :3])
    assert axes.astype(int).tolist() == D2N_AXES[series]
    ours = _to_dcm2niix_order(volume.data, D2N_AXES[series])
    assert ours.shape == image.shape
    corners = np.array([[k, j, i, 1.0] for k in (0, volume.shape[0] - 1) for j in (0, volume.shape[1] - 1)
                        for i in (0, volume.shape[2] - 1)])
    theirs_index = (index_map @ corners.T).T  # the same voxels in dcm2niix's index space
    assert np.abs(theirs_index[:, :3] - np.round(theirs_index[:, :3])).max() < 0.01
    ours_mm = (volume.affine @ corners.T).T
    theirs_mm = (LPS_FROM_RAS @ ras @ np.round(theirs_index).T).T
    assert np.abs(ours_mm - theirs_mm).max() < 0.01
    return ours, np.asarray(image.get_fdata(dtype=np.float32))


@pytest.mark.parametrize("series", ["P01", "P03", "P04", "P05", "P06"])
def test_geometry_and_values_match_dcm2niix(series: str, tmp_path: Path) -> None:
    volume = load_series_dir(series_dir(series))
    (nifti,) = _dcm2niix(series_dir(series), tmp_path, series)
    assert volume.slices and len(volume.slices) == volume.shape[0]
    ours, reference = _compare_with_dcm2niix(volume, nifti, series)
    assert np.allclose(ours, reference, rtol=1e-6, atol=1e-3)  # float32 rescale vs nibabel's scaling


def test_gantry_tilt_and_unequal_spacing_resampled_like_dcm2niix(tmp_path: Path) -> None:
    """P02: 18.5 deg tilt, spacing 1.08-7 mm. dcm2niix writes the sheared original (``P02.nii.gz``) and the
    tilt-corrected, equidistant copy ``P02_Tilt_Eq_1.nii.gz``, which is the one our regular grid must match.
    dcm2niix v1.0.20220720 writes a wrong sform for tilted series (rordenlab/dcm2niix issue 697, fixed 2023),
    so its qform is the reference."""
    volume = load_series_dir(series_dir("P02"))
    outputs = {p.name: p for p in _dcm2niix(series_dir("P02"), tmp_path, "P02")}
    assert volume.shape == (56, 611, 512) and volume.slices == () and len(volume.sources) == 28
    assert any("tilt" in note for note in volume.notes) and any("56 slices" in note for note in volume.notes)
    direction = volume.direction
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-6)  # orthogonal grid
    ours, reference = _compare_with_dcm2niix(volume, outputs["P02_Tilt_Eq_1.nii.gz"], "P02", use_qform=True)
    # dcm2niix keeps the padding value -1500 (we write air, -1000) and rounds interpolated values to int16:
    # compare inside the field of view, where at most 2% may differ by more than 1 HU (edges of the FOV).
    inside = (reference > -1400) & (ours > -999)
    assert inside.mean() > 0.4
    assert np.mean(np.abs(ours - reference)[inside] > 1.0) < 0.02
    assert np.median(np.abs(ours - reference)[inside]) < 0.5
    with pytest.raises(VolumeError, match="irregular geometry"):
        load_series_dir(series_dir("P02"), VolumeOptions(irregular="reject"))


def test_compressed_series_are_bit_identical_to_p01() -> None:
    reference = load_series_dir(series_dir("P01"))
    for series in ("P10", "P11"):
        volume = load_series_dir(series_dir(series))
        assert np.array_equal(volume.data, reference.data)
        assert np.array_equal(volume.affine, reference.affine)


def test_every_p09_transfer_syntax_decodes_to_the_same_pixels() -> None:
    files = sorted(p for p in series_dir("P09").iterdir() if p.suffix == ".dcm")
    assert len(files) == 9
    arrays = [load_series([f], options=VolumeOptions(min_slices=1)).data for f in files]
    for array in arrays[1:]:
        assert np.array_equal(array, arrays[0])
    with pytest.raises(VolumeError, match="duplicate positions"):
        load_series(files)


def test_hounsfield_units_and_p05_rescale_slope() -> None:
    ct = load_series_dir(series_dir("P01"))
    first = pydicom.dcmread(sorted(series_dir("P01").glob("*.dcm"))[0])
    assert ct.units == "HU" and ct.window == (-600.0, 1600.0)
    assert -1100 < float(np.median(ct.data[:, :20, :20])) < -900  # air around the patient
    files = sorted(series_dir("P05").glob("*.dcm"))
    volume = load_series(files)
    ds = pydicom.dcmread(files[0])
    assert float(ds.RescaleSlope) == pytest.approx(2.36166, abs=1e-4)
    index = [s.sop_instance_uid for s in volume.slices].index(ds.SOPInstanceUID)
    expected = ds.pixel_array * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
    assert np.allclose(volume.data[index], expected, rtol=1e-6)
    assert volume.units == "normalized"
    assert first.SOPInstanceUID in {s.sop_instance_uid for s in ct.sources}


def test_enhanced_multiframe_geometry() -> None:
    p06 = load_series_dir(series_dir("P06"))
    assert p06.shape == (96, 128, 128) and np.allclose(p06.spacing, (2.0, 2.0, 2.0), atol=1e-4)
    assert [s.frame_number for s in p06.slices][:2] in ([1, 2], [96, 95])
    p08 = load_series_dir(series_dir("P08"), VolumeOptions(min_slices=2))
    assert p08.shape == (2, 512, 512) and p08.modality == "CT"
    assert p08.units == "US"  # a perfusion map (RescaleType US), not Hounsfield units
    assert np.allclose(p08.spacing, (10.0, 0.388672, 0.388672))
    assert np.allclose(p08.affine[:3, 3], (99.5, -301.5, -149.0))  # frame at z=-149 first along the normal
    with pytest.raises(VolumeError, match="too few slices"):
        load_series_dir(series_dir("P08"))


def _copy_series(tmp_path: Path, series: str = "P03") -> list[Path]:
    out = tmp_path / series
    shutil.copytree(series_dir(series), out)
    return sorted(p for p in out.iterdir() if p.is_file())


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _sorted_by_position(files: list[Path]) -> list[Path]:
    def z(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    return sorted(files, key=z)


def test_missing_slice_is_reported_with_its_place(tmp_path: Path) -> None:
    files = _sorted_by_position(_copy_series(tmp_path))
    files[10].unlink()
    with pytest.raises(VolumeError, match=r"missing slices: gap of 10.00 mm .* between .* \(slices 9 and 10"):
        load_series_dir(tmp_path / "P03")


def test_duplicate_position(tmp_path: Path) -> None:
    files = _sorted_by_position(_copy_series(tmp_path))
    _edit(files[5], ImagePositionPatient=pydicom.dcmread(files[6]).ImagePositionPatient)
    with pytest.raises(VolumeError, match="duplicate positions"):
        load_series_dir(tmp_path / "P03")


def test_mixed_orientation(tmp_path: Path) -> None:
    files = _copy_series(tmp_path)
    _edit(files[3], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    with pytest.raises(VolumeError, match="mixed orientations"):
        load_series_dir(tmp_path / "P03")


def test_mixed_matrix_size(tmp_path: Path) -> None:
    files = _copy_series(tmp_path)
    ds = pydicom.dcmread(files[4])
    ds.PixelData = ds.pixel_array[:256, :].tobytes()
    ds.Rows = 256
    ds.save_as(files[4])
    with pytest.raises(VolumeError, match="mixed matrix sizes: 256x512, 512x512"):
        load_series_dir(tmp_path / "P03")


def test_more_than_one_series_and_too_few_slices_and_not_an_image(tmp_path: Path) -> None:
    mixed = [*sorted(series_dir("P01").glob("*.dcm"))[:3], *sorted(series_dir("P12").glob("*.dcm"))[3:6]]
    with pytest.raises(VolumeError, match="more than one series"):
        load_series(mixed)
    with pytest.raises(VolumeError, match="too few slices: 2"):
        load_series(sorted(series_dir("P01").glob("*.dcm"))[:2])
    ds = pydicom.dcmread(sorted(series_dir("P03").iterdir())[0])
    del ds.PixelData
    ds.save_as(tmp_path / "no_pixels")
    with pytest.raises(VolumeError, match="not an image"):
        load_series([tmp_path / "no_pixels"])
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(VolumeError, match="not a readable DICOM file"):
        load_series([tmp_path / "notes.txt"])


def test_padding_value_becomes_air(tmp_path: Path) -> None:
    """P02 stores PixelPaddingValue -1500 outside the field of view: it must read as -1000 HU."""
    volume = load_series_dir(series_dir("P02"))
    assert float(volume.data.min()) >= -1024.0
    files = _copy_series(tmp_path, "P03")
    ds = pydicom.dcmread(files[0])
    ds.add_new(0x00280120, "US", int(ds.pixel_array[0, 0]))  # PixelPaddingValue
    ds.save_as(files[0])
    padded = load_series_dir(tmp_path / "P03")
    index = [s.sop_instance_uid for s in padded.slices].index(ds.SOPInstanceUID)
    assert padded.data[index, 0, 0] == -1000.0


def test_uncompressed_fast_path_gives_pydicoms_stored_values() -> None:
    """Every uncompressed file of the shared series (LE implicit/explicit, BE; 12 of 16 bits, signed and
    unsigned) read at its Pixel Data offset equals pydicom's pixel_array, dtype included."""
    checked = 0
    for series in ("P01", "P02", "P03", "P04", "P05", "P06", "P08", "P09"):
        for path in sorted(p for p in series_dir(series).iterdir() if p.is_file())[:3]:
            source = read_file(path)
            expected = pydicom.dcmread(path).pixel_array
            if source.native is None:
                continue
            got = stored_values(source)
            assert got.dtype.kind == expected.dtype.kind and got.dtype.itemsize == expected.dtype.itemsize
            assert np.array_equal(got, expected.reshape(got.shape)), path.name
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize(("bits", "stored", "signed", "syntax"), [
    (16, 12, 1, ExplicitVRLittleEndian), (16, 12, 0, ImplicitVRLittleEndian),
    (16, 16, 1, ExplicitVRBigEndian), (16, 10, 1, ExplicitVRBigEndian),
    (8, 8, 0, ExplicitVRLittleEndian), (32, 32, 1, ExplicitVRLittleEndian)])
def test_fast_path_bit_depths_and_unused_high_bits(tmp_path: Path, bits: int, stored: int, signed: int,
                                                   syntax: str) -> None:
    """Garbage in the unused high bits is masked (unsigned) or sign-extended (signed) as pydicom does."""
    rng = np.random.default_rng(bits + stored + signed)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size=(2, 6, 5), endpoint=True, dtype=dtype)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 6, 5, 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, signed
    ds.PixelData = values.astype(dtype.newbyteorder(">" if syntax == ExplicitVRBigEndian else "<")).tobytes()
    ds.save_as(tmp_path / "x.dcm", implicit_vr=syntax == ImplicitVRLittleEndian,
               little_endian=syntax != ExplicitVRBigEndian, enforce_file_format=True)
    source = read_file(tmp_path / "x.dcm")
    assert source.native is not None
    expected = pydicom.dcmread(tmp_path / "x.dcm").pixel_array
    assert np.array_equal(stored_values(source), expected)
