"""Shared checks for the model-kind tests: the NIfTI of a series made by the node's own CLI, a framework's
NIfTI output back on the DICOM grid, and the SEG of a label volume (dciodvfy, read back with highdicom)."""

from __future__ import annotations

import subprocess
import sys
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt

from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.inference.frameworks import from_nifti_view
from dicomnode.outputs.encode import build_encoded_outputs

BIN = Path(sys.executable).parent


def convert(series: Path, out: Path) -> Path:
    """``dicomnode convert SERIES OUT.nii.gz``, the node's command line, as an operator would run it."""
    run = subprocess.run([sys.executable, "-m", "dicomnode", "convert", str(series), str(out)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def nifti_labels(path: Path, volume: Volume) -> npt.NDArray[np.uint8]:
    """A label NIfTI written for the converted series, back on the volume's (z, y, x) grid (its affine must be
    the converted series' affine: same grid)."""
    image: Any = nib.load(str(path))
    return np.asarray(from_nifti_view(np.asarray(image.dataobj), volume.shape), dtype=np.uint8)


def seg_round_trip(volume: Volume, labels: LabelVolume, tmp_path: Path) -> hd.seg.Segmentation:
    """Encode the SEG, check it with dciodvfy (no errors) and read it back with highdicom; the segments'
    labels and type codes must be those of the label volume's labels that are present (the encoder drops
    empty ones)."""
    outputs = build_encoded_outputs(volume, labels, pipeline="models-test", series_number_base=9500,
                                    kinds=("seg",))
    ds, data = outputs[0]
    path = tmp_path / "seg.dcm"
    path.write_bytes(data)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], errors
    seg = hd.seg.segread(BytesIO(data))
    present = sorted(v for v in np.unique(labels.data) if v)
    described = {info.value: info for info in labels.labels}
    got = [(str(item.SegmentLabel), str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue))
           for item in seg.SegmentSequence]
    want = [(described[v].name[:64], described[v].type.value) for v in present]
    assert got == want and present, (got, want)
    return seg
