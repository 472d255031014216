"""``dicomnode process``: run a pipeline on a folder of DICOM files without a PACS or a running node.

Writes what the node would send to ``out`` as DICOM files and returns their paths: derived objects for a
``segment`` pipeline, copies of the inputs for a ``forward`` pipeline. File names:
``<Modality>_<SeriesNumber>_<InstanceNumber>.dcm`` for derived objects.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dicomnode.config import Config
from dicomnode.errors import PipelineError
from dicomnode.imaging.files import find_dicom_files
from dicomnode.work.segment import Progress, Segmenters, make_outputs


def process_series(series_dir: Path, pipeline: str, out: Path, cfg: Config,
                   progress: Progress | None = None) -> list[Path]:
    """Run ``pipeline`` (by name, from ``cfg``) on the DICOM files under ``series_dir``; see module docstring."""
    pipe = cfg.pipeline(pipeline)
    files = find_dicom_files([series_dir])
    if not files:
        raise PipelineError(f"no DICOM files under {series_dir}")
    out.mkdir(parents=True, exist_ok=True)
    if pipe.kind == "forward":
        copies = []
        for path in files:
            copies.append(Path(shutil.copy2(path, out / path.name)))
        return copies
    outputs, _, _ = make_outputs(files, pipe, Segmenters(cfg), progress)
    written = []
    for ds, data in outputs:
        path = out / f"{ds.Modality}_{ds.SeriesNumber}_{int(ds.InstanceNumber):03d}.dcm"
        path.write_bytes(data)
        written.append(path)
    return written
