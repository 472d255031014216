"""nnU-Net v2 models behind the node: a trained-model folder run by nnunetv2's own ``nnUNetPredictor``.

The model folder is what nnU-Net training writes (``dataset.json``, ``plans.json``, ``fold_N/<checkpoint>``);
``model.path`` may also name the dataset folder above it (``nnUNet_results/DatasetXXX_Name``), in which case
``model.configuration`` picks the ``<trainer>__<plans>__<configuration>`` folder inside.

Axis order, spacing and orientation (the contract nnU-Net documents for ``predict_single_npy_array``): the
predictor gets the array its plans' reader (``image_reader_writer``) would read from the NIfTI that
``dicomnode convert`` writes for the series, built in memory (:func:`nnunet_input`):

- ``SimpleITKIO`` and ``NibabelIO``: ``sitk.GetArrayFromImage`` order, i.e. the NIfTI storage (i, Rows-1-j, k)
  transposed to (k, Rows-1-j, i) - the Volume's (z, y, x) with the row axis reversed - and spacing
  (z, y, x) as the file's float32 ``pixdim`` reversed;
- ``NibabelIOWithReorient`` / ``SimpleITKIOWithReorient``: the same after nibabel's reorientation of the
  storage array to the closest canonical RAS orientation (exact flips and transposes).

nnU-Net's own preprocessing (cropping to non-zero, normalisation from the plans, resampling to the
configuration's spacing), sliding window (Gaussian, ``tile_step``), test-time mirroring and the resampling of
the logits back to the input grid all run inside nnunetv2; :func:`nnunet_output` undoes the array order, so
the labels lie on the Volume's grid. Label values and names come from ``dataset.json`` (region-based models are
refused). Checkpoints are pickles that nnU-Net loads with ``weights_only=False``: only configure model folders
you trust.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel.orientations
import numpy as np
import numpy.typing as npt
import torch

from dicomnode.config import ModelConfig, SegmenterKind
from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.inference.frameworks import (
    ModelInfo,
    from_nifti_view,
    label_infos,
    nifti_view,
    quiet_stdout,
    weights_hash,
)
from dicomnode.inference.loaders import ModelLoadError
from dicomnode.inference.runner import configure_torch

log = logging.getLogger(__name__)

nio: Any = nibabel.orientations  # untyped
READERS = {"SimpleITKIO": False, "NibabelIO": False, "NibabelIOWithReorient": True, "SimpleITKIOWithReorient": True}


@dataclass(frozen=True)
class NnUNetInput:
    """The array (1, z', y', x') float32 and ``{"spacing": [z', y', x']}`` nnU-Net is given, and how its
    output (z', y', x') goes back to the Volume's (z, y, x)."""

    image: npt.NDArray[np.float32]
    properties: dict[str, Any]
    undo: Callable[[npt.NDArray[Any]], npt.NDArray[Any]]


def nnunet_input(volume: Volume, reorient: bool) -> NnUNetInput:
    """What nnU-Net's reader gives for the series' NIfTI (see the module docstring), with the inverse."""
    storage, affine = nifti_view(volume)
    zooms = np.linalg.norm(affine[:3, :3], axis=0).astype(np.float32)  # the file's pixdim precision
    back: npt.NDArray[np.float64] | None = None
    if reorient:
        ornt = nio.io_orientation(affine)
        storage = nio.apply_orientation(storage, ornt)
        order = np.argsort(ornt[:, 0])  # output axis a holds input axis order[a]
        zooms = zooms[order]
        back = nio.ornt_transform(nio.axcodes2ornt("RAS"), ornt)
    image = np.ascontiguousarray(np.transpose(storage, (2, 1, 0))[None], dtype=np.float32)
    shape = volume.shape

    def undo(seg: npt.NDArray[Any]) -> npt.NDArray[Any]:
        out = np.transpose(np.asarray(seg), (2, 1, 0))
        if back is not None:
            out = nio.apply_orientation(out, back)
        return from_nifti_view(out, shape)

    return NnUNetInput(image, {"spacing": [float(z) for z in zooms[::-1]]}, undo)


def model_folder(path: Path, configuration: str | None) -> Path:
    """The trained-model folder: ``path`` itself when it holds ``plans.json``, else its one subfolder
    ``<trainer>__<plans>__<configuration>``. ModelLoadError names what was found."""
    if (path / "plans.json").is_file():
        return path
    candidates = sorted(p for p in path.glob("*__*__*") if (p / "plans.json").is_file())
    if configuration is not None:
        candidates = [p for p in candidates if p.name.split("__")[-1] == configuration]
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "none"
    raise ModelLoadError(f"{path}: no single nnU-Net model folder (plans.json, dataset.json, fold_N/) for "
                         f"configuration {configuration or '(any)'}; found: {found}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return raw


def dataset_labels(dataset: dict[str, Any], where: Path) -> dict[int, str]:
    """Foreground label value -> name from ``dataset.json``'s ``labels`` (name -> value); regions refused."""
    out: dict[int, str] = {}
    for name, value in dict(dataset.get("labels", {})).items():
        if not isinstance(value, int):
            raise ModelLoadError(f"{where}: label {name!r} is a region {value!r}; region-based models are not "
                                 "supported")
        if value != 0:
            out[value] = str(name)
    if not out:
        raise ModelLoadError(f"{where}: dataset.json names no foreground labels")
    return out


def available_folds(folder: Path, checkpoint: str) -> tuple[str, ...]:
    """Folds with ``checkpoint`` present: ``fold_N`` numbers in order, then ``all``."""
    found = [p.name[5:] for p in folder.glob("fold_*") if (p / checkpoint).is_file()]
    return tuple(sorted((f for f in found if f.isdigit()), key=int)) + (("all",) if "all" in found else ())


class NnUNetSegmenter:
    """An nnU-Net v2 model resident in this process: initialised once, then ``segment`` per series."""

    def __init__(self, model: ModelConfig, device: torch.device) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # heavy: only for this kind

        if model.path is None:
            raise ModelLoadError("model kind 'nnunet' needs model.path")
        folder = model_folder(Path(model.path), model.configuration)
        dataset, plans = _read_json(folder / "dataset.json"), _read_json(folder / "plans.json")
        reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
        if reader not in READERS:
            raise ModelLoadError(f"{folder}: image reader {reader!r} is not supported (known: {', '.join(READERS)})")
        folds = model.folds or available_folds(folder, model.checkpoint)
        missing = [f for f in folds if not (folder / f"fold_{f}" / model.checkpoint).is_file()]
        if not folds or missing:
            raise ModelLoadError(f"{folder}: no {model.checkpoint} for fold(s) {', '.join(missing) or 'any'}")
        self._reorient = READERS[reader]
        self._labels = label_infos(dataset_labels(dataset, folder), model.codes)
        self.predictor = nnUNetPredictor(tile_step_size=model.tile_step, use_gaussian=True,
                                         use_mirroring=model.mirroring,
                                         perform_everything_on_device=device.type == "cuda", device=device,
                                         verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        try:
            with quiet_stdout("nnUNetPredictor"):
                self.predictor.initialize_from_trained_model_folder(
                    str(folder), tuple(int(f) if f.isdigit() else f for f in folds), model.checkpoint)
        except Exception as error:  # nnU-Net raises many types for broken folders
            raise ModelLoadError(f"{folder}: nnU-Net cannot load the model: {error}") from error
        configure_torch()  # nnUNetPredictor turns cuDNN benchmark on for CUDA: the node's flags win
        if model.configuration is not None and self._configuration(model.configuration) != \
                self.predictor.configuration_manager.configuration:
            raise ModelLoadError(f"{folder}: the checkpoint is not of configuration {model.configuration!r}")
        self.name = str(dataset.get("name") or plans.get("dataset_name") or folder.parent.name)[:64]
        self.version = str(dataset.get("release") or dataset.get("version") or
                           weights_hash(folder / f"fold_{f}" / model.checkpoint for f in folds))
        self.info = ModelInfo(self.name, self.version, SegmenterKind.NNUNET.value, str(folder),
                              {i.value: i.name for i in self._labels}, str(device))
        log.info("nnU-Net model %s %s resident on %s (folds %s)", self.name, self.version, device, ",".join(folds))

    def _configuration(self, name: str) -> Any:
        try:
            return self.predictor.plans_manager.get_configuration(name).configuration
        except (KeyError, RuntimeError, ValueError):
            return None

    def segment(self, volume: Volume) -> LabelVolume:
        """Labels (z, y, x) uint8 on the volume's grid, values as in ``dataset.json``."""
        given = nnunet_input(volume, self._reorient)
        with quiet_stdout("nnUNetPredictor.predict_single_npy_array"):
            seg = self.predictor.predict_single_npy_array(given.image, given.properties, None, None, False)
        data = given.undo(np.asarray(seg)).astype(np.uint8)
        return LabelVolume(data=data, labels=self._labels, algorithm_name=self.name,
                           algorithm_version=self.version)
