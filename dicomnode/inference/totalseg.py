"""TotalSegmentator behind the node, with its nnU-Net models resident across jobs.

TotalSegmentator's Python API (``totalsegmentator.python_api.totalsegmentator``) builds a new nnU-Net predictor,
loading the weights, for every call, and goes through NIfTI files in a temporary folder: it cannot keep a model
resident. So the adapter runs the same steps as the API's ``nnUNet_predict_image`` for tasks that are one
model or TotalSegmentator's multi-part models without cropping, with TotalSegmentator's own functions and
settings, around nnU-Net predictors built once:

1. the series' NIfTI image in memory (:func:`dicomnode.imaging.nifti.nifti_image`, what ``dicomnode convert``
   writes), turned to the closest canonical orientation (``totalsegmentator.alignment.as_closest_canonical``);
2. resampled to the task's spacing by ``totalsegmentator.resampling.change_spacing`` (order 1, int32, as the
   API does);
3. each of the task's nnU-Net models (``get_task_config``: dataset ids, trainer, plans, configuration, folds;
   step 0.8 for the total tasks, else 0.5; no test-time mirroring) predicts on the array nnU-Net's reader gets
   for that image; parts are combined with TotalSegmentator's part maps;
4. TotalSegmentator's auxiliary labels removed, resampled back (order 0) and the canonical orientation undone,
   with TotalSegmentator's functions; the labels are mapped onto the Volume's (z, y, x).

Tasks that need a crop model, a cascade, a body pre-segmentation or task-specific postprocessing are refused at
start-up (they would not be resident). Weights are never downloaded: when a dataset folder is missing, the
pipeline fails at start-up naming the folders looked for and where to put them. Label names and values are
TotalSegmentator's ``class_map[task]``; their SNOMED CT codes come from the mapping it ships.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import torch

from dicomnode.config import ModelConfig, SegmenterKind
from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.nifti import nifti_image
from dicomnode.imaging.volume import Volume
from dicomnode.inference.frameworks import ModelInfo, from_nifti_view, label_infos, quiet_stdout
from dicomnode.inference.loaders import ModelLoadError
from dicomnode.inference.nnunet import make_predictor, read_json, reader_reorients, storage_input

log = logging.getLogger(__name__)
UNSUPPORTED_KEYS = ("crop", "cascade", "crop_model", "remove_outside", "remove_mask")
SPECIAL_POSTPROCESSING = ("body", "vertebrae_pp", "vertebrae_pp_refined")
PARTS = {"total": ("class_map_5_parts", "map_taskid_to_partname_ct"),
         "total_v3": ("class_map_5_parts_total_v3", "map_taskid_to_partname_ct_v3"),
         "total_mr": ("class_map_parts_mr", "map_taskid_to_partname_mr")}


def task_settings(task: str, fast: bool) -> dict[str, Any]:
    """TotalSegmentator's own configuration of ``task`` (``get_task_config``), refused when not resident-able."""
    from totalsegmentator.python_api import get_task_config

    try:
        with quiet_stdout("totalsegmentator"):
            config: dict[str, Any] = dict(get_task_config(task, fast=fast, quiet=True, plans="nnUNetPlans"))
    except ValueError as error:
        raise ModelLoadError(f"TotalSegmentator: {error}") from error
    if task in SPECIAL_POSTPROCESSING or any(config.get(key) for key in UNSUPPORTED_KEYS) or config.get("commercial"):
        raise ModelLoadError(f"TotalSegmentator task {task!r} needs a crop model, cascade, licence or special "
                             "postprocessing, which the node does not run resident; use a task without them")
    return config


def weights_folder(model: ModelConfig) -> Path:
    """``model.weights``, else where TotalSegmentator keeps weights (TOTALSEG_WEIGHTS_PATH, else
    TOTALSEG_HOME_DIR/nnunet/results, else ~/.totalsegmentator/nnunet/results)."""
    if model.weights is not None:
        return Path(model.weights)
    from totalsegmentator.config import get_weights_dir

    return Path(get_weights_dir())


def model_folders(weights: Path, config: dict[str, Any], task: str) -> dict[int, Path]:
    """Dataset id -> trained-model folder under ``weights``; ModelLoadError naming every missing folder."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
    inner = f"{config['trainer']}__{config.get('plans') or 'nnUNetPlans'}__{config.get('model') or '3d_fullres'}"
    folders: dict[int, Path] = {}
    for tid in ids:
        info = TASK_ID_WEIGHTS_CONFIGS[tid]
        dataset = Path(info.get("rel_path") or "") / info["foldername"]
        folders[int(tid)] = weights / dataset / inner
    missing = [f for f in folders.values() if not (f / "plans.json").is_file()]
    if missing:
        wanted = ", ".join(str(f.relative_to(weights)) for f in missing)
        raise ModelLoadError(
            f"TotalSegmentator task {task!r}: weights not found in {weights}; looked for {wanted}. The node never "
            f"downloads weights: on a machine with internet run 'totalseg_download_weights -t {task}' and copy "
            f"those dataset folders into {weights} (or set model.weights / TOTALSEG_WEIGHTS_PATH)")
    return folders


class TotalSegmentatorSegmenter:
    """A TotalSegmentator task with its nnU-Net models resident (see the module docstring)."""

    def __init__(self, model: ModelConfig, device: torch.device) -> None:
        from totalsegmentator.map_to_binary import class_map

        task = model.task
        self.config = task_settings(task, model.fast)
        weights = weights_folder(model)
        folders = model_folders(weights, self.config, task)
        self.task = task
        step = 0.8 if task in ("total", "total_v3", "total_mr") else 0.5
        folds = tuple(str(f) for f in (self.config.get("folds") or [0]))
        self.models = {tid: (make_predictor(folder, folds, "checkpoint_final.pth", tile_step=step, mirroring=False,
                                            device=device), reader_reorients(read_json(folder / "plans.json"), folder))
                       for tid, folder in folders.items()}
        self.part_luts = self._part_luts(task, tuple(folders)) if len(folders) > 1 else {}
        self._labels = label_infos(dict(class_map[task]), model.codes)
        self.name = f"TotalSegmentator {task}{' fast' if model.fast else ''}"[:64]
        self.version = self._version(folders)
        self.info = ModelInfo(self.name, self.version, SegmenterKind.TOTALSEGMENTATOR.value, str(weights),
                              {i.value: i.name for i in self._labels}, str(device))
        log.info("%s %s resident on %s (%d model(s))", self.name, self.version, device, len(folders))

    @staticmethod
    def _version(folders: dict[int, Path]) -> str:
        import importlib.metadata

        datasets = "+".join(str(tid) for tid in sorted(folders))
        return f"{importlib.metadata.version('totalsegmentator')}/{datasets}"

    @staticmethod
    def _part_luts(task: str, ids: tuple[int, ...]) -> dict[int, npt.NDArray[np.uint8]]:
        """Dataset id -> lookup table from that part model's labels to the task's, for the task's own part
        models (``ids``) by TotalSegmentator's maps (its map of dataset ids to part names also lists the parts
        of other versions of the task, whose classes the task does not have)."""
        from totalsegmentator import map_to_binary

        if task not in PARTS:
            raise ModelLoadError(f"TotalSegmentator task {task!r}: several models but no part maps")
        parts = getattr(map_to_binary, PARTS[task][0])
        names = getattr(map_to_binary, PARTS[task][1])
        inverse = {name: value for value, name in map_to_binary.class_map[task].items()}
        luts = {}
        for tid in ids:
            part_map = parts[names[tid]]
            lut = np.zeros(max(part_map) + 1, dtype=np.uint8)
            for index, name in part_map.items():
                lut[index] = inverse[name]
            luts[tid] = lut
        return luts

    def segment(self, volume: Volume) -> LabelVolume:
        """Labels (z, y, x) uint8 on the volume's grid, values of TotalSegmentator's class map for the task."""
        from totalsegmentator.alignment import as_closest_canonical, undo_canonical
        from totalsegmentator.postprocessing import remove_auxiliary_labels
        from totalsegmentator.resampling import change_spacing

        nifti: Any = nib.Nifti1Image
        original: Any = nifti.from_bytes(nifti_image(volume).to_bytes())
        canonical = as_closest_canonical(nifti(original.get_fdata(), original.affine))
        resample = self.config.get("resample")
        resample = [resample] * 3 if isinstance(resample, float) else resample
        with quiet_stdout("totalsegmentator"):
            image = canonical if resample is None else change_spacing(canonical, resample, order=1, dtype=np.int32,
                                                                      nr_cpus=1)
            seg = self._predict(np.asanyarray(image.dataobj), image)
            prediction = remove_auxiliary_labels(nifti(seg, image.affine), self.task)
            if resample is not None:
                prediction = change_spacing(prediction, resample, canonical.shape, order=0, dtype=np.uint8,
                                            nr_cpus=1, force_affine=canonical.affine)
            prediction = undo_canonical(prediction, original)
        data = from_nifti_view(np.asanyarray(prediction.dataobj).astype(np.uint8), volume.shape)
        return LabelVolume(data=data, labels=self._labels, algorithm_name=self.name, algorithm_version=self.version)

    def _predict(self, storage: npt.NDArray[Any], image: Any) -> npt.NDArray[np.uint8]:
        """Every model of the task on the image (NIfTI storage order); parts combined as TotalSegmentator does."""
        combined = np.zeros(storage.shape, dtype=np.uint8)
        zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float32)
        for tid, (predictor, reorient) in self.models.items():
            given = storage_input(storage, image.affine, zooms, reorient)
            seg = np.asarray(given.undo(predictor.predict_single_npy_array(given.image, given.properties, None,
                                                                          None, False))).astype(np.uint8)
            if tid in self.part_luts:
                lut = self.part_luts[tid]
                if seg.size and int(seg.max()) >= len(lut):
                    lut = np.pad(lut, (0, int(seg.max()) + 1 - len(lut)))
                seg = lut[seg]
                np.copyto(combined, seg, where=seg != 0)
            else:
                combined = seg
        return combined
