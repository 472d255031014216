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
the labels lie on the Volume's grid. A cascade (``configuration: 3d_cascade_fullres``, whose plans name a
previous stage) runs its previous stage's model first, from the folder beside it, and gives its labels to the
full-resolution stage in memory, as ``nnUNetv2_predict -prev_stage_predictions`` does through files. Label
values and names come from ``dataset.json`` (region-based models are refused). Checkpoints are pickles that
nnU-Net loads with ``weights_only=False``: only configure model folders you trust.
"""

from __future__ import annotations

import importlib
import importlib.util
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
    """What nnU-Net's reader gives for the series' NIfTI (see the module docstring), with the inverse back to
    the Volume's (z, y, x)."""
    storage, affine = nifti_view(volume)
    given = storage_input(storage, affine, np.linalg.norm(affine[:3, :3], axis=0), reorient)
    shape = volume.shape
    return NnUNetInput(given.image, given.properties, lambda seg: from_nifti_view(given.undo(seg), shape))


def storage_input(storage: npt.NDArray[Any], affine: npt.NDArray[np.float64], zooms: npt.NDArray[Any],
                  reorient: bool) -> NnUNetInput:
    """What nnU-Net's reader gives for a NIfTI image with data ``storage`` (NIfTI (i, j, k) order), ``affine``
    and ``zooms`` (pixdim, mm along i, j, k; taken at float32, the file's precision); the inverse returns an
    array in the same storage order."""
    zooms = np.asarray(zooms, dtype=np.float32)
    back: npt.NDArray[np.float64] | None = None
    if reorient:
        ornt = nio.io_orientation(affine)
        storage = nio.apply_orientation(storage, ornt)
        order = np.argsort(ornt[:, 0])  # output axis a holds input axis order[a]
        zooms = zooms[order]
        back = nio.ornt_transform(nio.axcodes2ornt("RAS"), ornt)
    image = np.ascontiguousarray(np.transpose(storage, (2, 1, 0))[None], dtype=np.float32)

    def undo(seg: npt.NDArray[Any]) -> npt.NDArray[Any]:
        out = np.transpose(np.asarray(seg), (2, 1, 0))
        return nio.apply_orientation(out, back) if back is not None else out

    return NnUNetInput(image, {"spacing": [float(z) for z in zooms[::-1]]}, undo)


def trainer_class(name: str) -> Any:
    """The nnU-Net trainer class ``name`` (it builds the network from the plans), by nnU-Net's own search
    (``recursive_find_python_class``) over its ``variants`` trainers first, then TotalSegmentator's custom
    trainers, then nnU-Net's full search.

    Why not only the full search that ``initialize_from_trained_model_folder`` does: it imports every trainer
    module in file order, and ``nnUNetTrainer/primus`` imports timm, which imports torchvision. The
    torchvision the package registry serves is a CUDA build that fails to import next to the CPU torch, and
    nothing in the node may need it; the variants (where TotalSegmentator's trainers live) never import it.
    """
    import nnunetv2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    if name == "nnUNetTrainer":
        return nnUNetTrainer
    root = Path(nnunetv2.__path__[0])
    found = recursive_find_python_class(str(root / "training" / "nnUNetTrainer" / "variants"), name,
                                        "nnunetv2.training.nnUNetTrainer.variants", str(root))
    if found is None and importlib.util.find_spec("totalsegmentator") is not None:
        found = getattr(importlib.import_module("totalsegmentator.custom_trainers"), name, None)
    return found if found is not None else recursive_find_trainer_class_by_name(name)


def make_predictor(folder: Path, folds: tuple[str, ...], checkpoint: str, *, tile_step: float, mirroring: bool,
                   device: torch.device) -> Any:
    """nnunetv2's ``nnUNetPredictor`` for a model folder, initialised once with nnU-Net's
    ``manual_initialization`` exactly as ``initialize_from_trained_model_folder`` does (checkpoints loaded on
    the CPU, network built by the trainer class from the plans, first fold's weights loaded), except for how
    the trainer class is found (:func:`trainer_class`). The node's torch flags are restored afterwards
    (nnU-Net turns cuDNN benchmark on for CUDA)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # heavy: only for these kinds
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    missing = [f for f in folds if not (folder / f"fold_{f}" / checkpoint).is_file()]
    if not folds or missing:
        raise ModelLoadError(f"{folder}: no {checkpoint} for fold(s) {', '.join(missing) or 'any'}")
    dataset = read_json(folder / "dataset.json")
    try:
        with quiet_stdout("nnUNetPredictor"):
            predictor = nnUNetPredictor(tile_step_size=tile_step, use_gaussian=True, use_mirroring=mirroring,
                                        perform_everything_on_device=device.type == "cuda", device=device,
                                        verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            checkpoints = [torch.load(folder / f"fold_{f}" / checkpoint, map_location="cpu", weights_only=False)
                           for f in folds]
            plans = PlansManager(read_json(folder / "plans.json"))
            configuration = plans.get_configuration(checkpoints[0]["init_args"]["configuration"])
            trainer = str(checkpoints[0]["trainer_name"])
            network = trainer_class(trainer).build_network_architecture(
                plans, configuration, determine_num_input_channels(plans, configuration, dataset),
                plans.get_label_manager(dataset).num_segmentation_heads, enable_deep_supervision=False)
            network.load_state_dict(checkpoints[0]["network_weights"])
            predictor.manual_initialization(network, plans, configuration,
                                            [c["network_weights"] for c in checkpoints], dataset, trainer,
                                            checkpoints[0].get("inference_allowed_mirroring_axes"))
    except ModelLoadError:
        raise
    except Exception as error:  # nnU-Net raises many types for broken folders
        raise ModelLoadError(f"{folder}: nnU-Net cannot load the model: {error}") from error
    configure_torch()
    return predictor


def reader_reorients(plans: dict[str, Any], where: Path) -> bool:
    """Whether the plans' ``image_reader_writer`` reorients to RAS (ModelLoadError for unknown readers)."""
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in READERS:
        raise ModelLoadError(f"{where}: image reader {reader!r} is not supported (known: {', '.join(READERS)})")
    return READERS[reader]


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


def read_json(path: Path) -> dict[str, Any]:
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
        if model.path is None:
            raise ModelLoadError("model kind 'nnunet' needs model.path")
        folder = model_folder(Path(model.path), model.configuration)
        dataset, plans = read_json(folder / "dataset.json"), read_json(folder / "plans.json")
        self._reorient = reader_reorients(plans, folder)
        folds = model.folds or available_folds(folder, model.checkpoint)
        self._labels = label_infos(dataset_labels(dataset, folder), model.codes)
        self.predictor = make_predictor(folder, folds, model.checkpoint, tile_step=model.tile_step,
                                        mirroring=model.mirroring, device=device)
        if model.configuration is not None and self._configuration(model.configuration) != \
                self.predictor.configuration_manager.configuration:
            raise ModelLoadError(f"{folder}: the checkpoint is not of configuration {model.configuration!r}")
        self.previous = self._previous_stage(folder, model, device)
        self.name = str(dataset.get("name") or plans.get("dataset_name") or folder.parent.name)[:64]
        self.version = str(dataset.get("release") or dataset.get("version") or
                           weights_hash(folder / f"fold_{f}" / model.checkpoint for f in folds))
        self.info = ModelInfo(self.name, self.version, SegmenterKind.NNUNET.value, str(folder),
                              {i.value: i.name for i in self._labels}, str(device))
        log.info("nnU-Net model %s %s resident on %s (folds %s)", self.name, self.version, device, ",".join(folds))

    def _previous_stage(self, folder: Path, model: ModelConfig, device: torch.device) -> Any:
        """For a cascade's full-resolution configuration (its plans name a ``previous_stage``), the predictor of
        that stage, from its model folder beside this one (``<trainer>__<plans>__<previous stage>``, as
        nnU-Net trains it), resident too; None otherwise."""
        previous = self.predictor.configuration_manager.previous_stage_name
        if previous is None:
            return None
        trainer, plans_name, _ = folder.name.split("__")
        stage = folder.parent / f"{trainer}__{plans_name}__{previous}"
        if not (stage / "plans.json").is_file():
            raise ModelLoadError(f"{folder}: a cascade stage needs the {previous} model it follows, expected "
                                 f"in {stage}")
        folds = model.folds or available_folds(stage, model.checkpoint)
        log.info("nnU-Net cascade: %s runs first (folds %s)", previous, ",".join(folds))
        return make_predictor(stage, folds, model.checkpoint, tile_step=model.tile_step, mirroring=model.mirroring,
                              device=device)

    def _configuration(self, name: str) -> Any:
        try:
            return self.predictor.plans_manager.get_configuration(name).configuration
        except (KeyError, RuntimeError, ValueError):
            return None

    def segment(self, volume: Volume) -> LabelVolume:
        """Labels (z, y, x) uint8 on the volume's grid, values as in ``dataset.json``."""
        given = nnunet_input(volume, self._reorient)
        with quiet_stdout("nnUNetPredictor.predict_single_npy_array"):
            previous = None
            if self.previous is not None:  # a cascade: the previous stage's labels, on the input grid, go in too
                low = self.previous.predict_single_npy_array(given.image, dict(given.properties), None, None, False)
                previous = np.asarray(low, dtype=np.float32)[None]  # as nnU-Net's readers give a segmentation
            seg = self.predictor.predict_single_npy_array(given.image, dict(given.properties), previous, None,
                                                          False)
        data = given.undo(np.asarray(seg)).astype(np.uint8)
        return LabelVolume(data=data, labels=self._labels, algorithm_name=self.name,
                           algorithm_version=self.version)
