"""TotalSegmentator behind the node, with its nnU-Net models resident across jobs.

TotalSegmentator's Python API (``totalsegmentator.python_api.totalsegmentator``) builds a new nnU-Net predictor,
loading the weights, for every call, and goes through NIfTI files in a temporary folder: it cannot keep a model
resident. So the adapter runs the same steps as the API's ``nnUNet_predict_image`` for tasks that are one
model or TotalSegmentator's multi-part models, cropped to organs of a rough total segmentation or not, with
TotalSegmentator's own functions and settings, around nnU-Net predictors built once:

1. the series' NIfTI image in memory (:func:`dicomnode.imaging.nifti.nifti_image`, what ``dicomnode convert``
   writes); for a task with ``crop`` (e.g. ``lung_vessels``, ``liver_vessels``), first the rough organ model the
   API chooses (the 6 mm total model, Dataset298; 3 mm with ``robust_crop``; the MR model for MR tasks) runs
   through steps 2-4 on the whole image, and the image is cropped to the task's organs with the API's margin
   (``totalsegmentator.cropping.crop_to_mask``; no organ found: no labels);
2. turned to the closest canonical orientation (``totalsegmentator.alignment.as_closest_canonical``) and
   resampled to the task's spacing by ``totalsegmentator.resampling.change_spacing`` (order 1, int32, as the
   API does);
3. each of the task's nnU-Net models (``get_task_config``: dataset ids, trainer, plans, configuration, folds;
   step 0.8 for the total tasks, else 0.5; no test-time mirroring) predicts on the array nnU-Net's reader gets
   for that image; parts are combined with TotalSegmentator's part maps;
4. TotalSegmentator's auxiliary labels removed, resampled back (order 0) and the canonical orientation undone,
   with TotalSegmentator's functions; a crop is undone (``undo_crop``); the labels are mapped onto the Volume's
   (z, y, x).

Tasks that need a cascade, a crop by another task's model, a body pre-segmentation or task-specific
postprocessing are refused at start-up (they would not be resident). The API splits very large images (over
512 x 512 x 900 voxels after resampling) into three overlapping slabs for multi-part tasks to save memory; the
node predicts them whole. Weights are never downloaded: when a dataset folder is missing (the crop model's
too), the pipeline fails at start-up naming the folders looked for and where to put them. Label names and
values are TotalSegmentator's ``class_map[task]``; their SNOMED CT codes come from the mapping it ships.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
UNSUPPORTED_KEYS = ("cascade", "crop_model", "remove_outside", "remove_mask")
BODY_CROPS = ("body_trunc", "body_extremities")  # cropped by the body model, which needs its own postprocessing
CROP_DOWNLOADS = {297: "total_fast", 298: "total_fast", 852: "total_fast_mr"}  # totalseg_download_weights -t
SPECIAL_POSTPROCESSING = ("body", "vertebrae_pp", "vertebrae_pp_refined")
PARTS = {"total": ("class_map_5_parts", "map_taskid_to_partname_ct"),
         "total_v3": ("class_map_5_parts_total_v3", "map_taskid_to_partname_ct_v3"),
         "total_mr": ("class_map_parts_mr", "map_taskid_to_partname_mr")}


def task_settings(task: str, fast: bool) -> dict[str, Any]:
    """TotalSegmentator's own configuration of ``task`` (``get_task_config``), refused when not resident-able;
    a task with ``crop`` gets ``crop_stage``: the rough organ model that crops it (:func:`crop_stage`)."""
    from totalsegmentator.python_api import get_task_config

    try:
        with quiet_stdout("totalsegmentator"):
            config: dict[str, Any] = dict(get_task_config(task, fast=fast, quiet=True, plans="nnUNetPlans"))
    except ValueError as error:
        raise ModelLoadError(f"TotalSegmentator: {error}") from error
    crop = list(config.get("crop") or [])
    if (task in SPECIAL_POSTPROCESSING or any(config.get(key) for key in UNSUPPORTED_KEYS) or config.get("commercial")
            or any(roi in BODY_CROPS for roi in crop)):
        raise ModelLoadError(f"TotalSegmentator task {task!r} needs a cascade, a crop by another task's or the body "
                             "model, a licence or special postprocessing, which the node does not run resident; use "
                             "a task without them")
    if crop:
        config["crop_stage"] = crop_stage(task, config)
    return config


def crop_stage(task: str, config: dict[str, Any]) -> dict[str, Any]:
    """The rough organ segmentation that the API runs to crop ``task`` (``python_api.totalsegmentator``, crop
    with no crop model): its dataset id, trainer, spacing and class map, the organs kept and the margin
    (20 voxels each way, the API's for this case)."""
    mr = task.endswith("_mr")
    if mr:
        tid, spacing, trainer = 852, 3.0, "nnUNetTrainer_2000epochs_NoMirroring"
    elif config.get("robust_crop"):
        tid, spacing, trainer = 297, 3.0, "nnUNetTrainer_4000epochs_NoMirroring"
    else:
        tid, spacing, trainer = 298, 6.0, "nnUNetTrainer_4000epochs_NoMirroring"
    name = "total_mr" if mr or config.get("modality") == "mr" else "total"
    return {"task_id": tid, "trainer": trainer, "plans": "nnUNetPlans", "model": "3d_fullres", "folds": [0],
            "resample": spacing, "task_name": name, "rois": list(config["crop"]), "addon": [20, 20, 20]}


def weights_folder(model: ModelConfig) -> Path:
    """``model.weights``, else where TotalSegmentator keeps weights (TOTALSEG_WEIGHTS_PATH, else
    TOTALSEG_HOME_DIR/nnunet/results, else ~/.totalsegmentator/nnunet/results)."""
    if model.weights is not None:
        return Path(model.weights)
    from totalsegmentator.config import get_weights_dir

    return Path(get_weights_dir())


def stage_folders(weights: Path, config: dict[str, Any]) -> dict[int, Path]:
    """Dataset id -> trained-model folder under ``weights`` for one stage's settings (present or not)."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
    inner = f"{config['trainer']}__{config.get('plans') or 'nnUNetPlans'}__{config.get('model') or '3d_fullres'}"
    folders: dict[int, Path] = {}
    for tid in ids:
        info = TASK_ID_WEIGHTS_CONFIGS[tid]
        dataset = Path(info.get("rel_path") or "") / info["foldername"]
        folders[int(tid)] = weights / dataset / inner
    return folders


def model_folders(weights: Path, config: dict[str, Any], task: str) -> dict[int, Path]:
    """Dataset id -> trained-model folder under ``weights`` for the task's models; ModelLoadError naming every
    missing folder, the crop model's included, and the download commands that fetch them."""
    folders = stage_folders(weights, config)
    crop = stage_folders(weights, config["crop_stage"]) if config.get("crop_stage") else {}
    missing = [f for f in [*folders.values(), *crop.values()] if not (f / "plans.json").is_file()]
    if missing:
        wanted = ", ".join(str(f.relative_to(weights)) for f in missing)
        tasks = [task] + [CROP_DOWNLOADS.get(tid, "total_fast") for tid, f in crop.items() if f in missing]
        commands = " and ".join(f"'totalseg_download_weights -t {t}'" for t in dict.fromkeys(tasks))
        raise ModelLoadError(
            f"TotalSegmentator task {task!r}: weights not found in {weights}; looked for {wanted}. The node never "
            f"downloads weights: on a machine with internet run {commands} and copy those dataset folders into "
            f"{weights} (or set model.weights / TOTALSEG_WEIGHTS_PATH)")
    return folders


@dataclass(frozen=True)
class Stage:
    """One TotalSegmentator model run (steps 2-4 of the module docstring): the class map it predicts
    (``task``), the spacing it resamples to (mm, or None), its resident nnU-Net predictors with whether each
    one's reader reorients, and the part maps when it has several models."""

    task: str
    resample: list[float] | None
    models: dict[int, tuple[Any, bool]]
    part_luts: dict[int, npt.NDArray[np.uint8]]


class TotalSegmentatorSegmenter:
    """A TotalSegmentator task with its nnU-Net models resident (see the module docstring)."""

    def __init__(self, model: ModelConfig, device: torch.device) -> None:
        from totalsegmentator.map_to_binary import class_map

        task = model.task
        self.config = task_settings(task, model.fast)
        weights = weights_folder(model)
        folders = model_folders(weights, self.config, task)
        self.task = task
        self.stage = self._stage(task, self.config, folders, device)
        self.crop = self.config.get("crop_stage")
        self.crop_stage = None if self.crop is None else self._stage(
            self.crop["task_name"], self.crop, stage_folders(weights, self.crop), device)
        self.models = self.stage.models
        self.part_luts = self.stage.part_luts
        self._labels = label_infos(dict(class_map[task]), model.codes)
        self.name = f"TotalSegmentator {task}{' fast' if model.fast else ''}"[:64]
        self.version = self._version(folders)
        self.info = ModelInfo(self.name, self.version, SegmenterKind.TOTALSEGMENTATOR.value, str(weights),
                              {i.value: i.name for i in self._labels}, str(device))
        cropped = f", cropped by Dataset{self.crop['task_id']}" if self.crop else ""
        log.info("%s %s resident on %s (%d model(s)%s)", self.name, self.version, device, len(folders), cropped)

    @classmethod
    def _stage(cls, task: str, config: dict[str, Any], folders: dict[int, Path], device: torch.device) -> Stage:
        step = 0.8 if task in ("total", "total_v3", "total_mr") else 0.5
        folds = tuple(str(f) for f in (config.get("folds") or [0]))
        models = {tid: (make_predictor(folder, folds, "checkpoint_final.pth", tile_step=step, mirroring=False,
                                       device=device), reader_reorients(read_json(folder / "plans.json"), folder))
                  for tid, folder in folders.items()}
        resample = config.get("resample")
        resample = [float(resample)] * 3 if isinstance(resample, (int, float)) else resample
        return Stage(task, resample, models, cls._part_luts(task, tuple(folders)) if len(folders) > 1 else {})

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
        nifti: Any = nib.Nifti1Image
        original: Any = nifti.from_bytes(nifti_image(volume).to_bytes())
        image = nifti(original.get_fdata(), original.affine)  # float64, as the API copies its input
        with quiet_stdout("totalsegmentator"):
            if self.crop_stage is not None and self.crop is not None:
                prediction = self._cropped(self.crop_stage, self.crop, image)
            else:
                prediction = _run(self.stage, image)
        data = from_nifti_view(np.asanyarray(prediction.dataobj).astype(np.uint8), volume.shape)
        return LabelVolume(data=data, labels=self._labels, algorithm_name=self.name, algorithm_version=self.version)

    def _cropped(self, crop_stage: Stage, crop: dict[str, Any], image: Any) -> Any:
        """The task's stage on the image cropped to its organs in the rough organ segmentation, uncropped."""
        from totalsegmentator.cropping import crop_to_mask, undo_crop
        from totalsegmentator.map_to_binary import class_map

        nifti: Any = nib.Nifti1Image
        organs = _run(crop_stage, image)
        inverse = {name: value for value, name in class_map[crop["task_name"]].items()}
        mask = np.isin(np.asanyarray(organs.dataobj), [inverse[roi] for roi in crop["rois"]]).astype(np.uint8)
        if not mask.any():
            log.info("%s: none of the organs it crops to (%s) found; no labels", self.name, ", ".join(crop["rois"]))
            return nifti(np.zeros(image.shape, dtype=np.uint8), image.affine)
        cropped, bbox = crop_to_mask(image, nifti(mask, organs.affine), addon=crop["addon"], dtype=np.int32)
        return undo_crop(_run(self.stage, cropped), image, bbox)


def _run(stage: Stage, image: Any) -> Any:
    """Steps 2-4 of the module docstring for one stage on ``image`` (NIfTI, any orientation): the labels as a
    NIfTI image in the image's own space (uint8 values of the stage's class map)."""
    from totalsegmentator.alignment import as_closest_canonical, undo_canonical
    from totalsegmentator.postprocessing import remove_auxiliary_labels
    from totalsegmentator.resampling import change_spacing

    nifti: Any = nib.Nifti1Image
    canonical = as_closest_canonical(image)
    resampled = canonical if stage.resample is None else change_spacing(canonical, stage.resample, order=1,
                                                                        dtype=np.int32, nr_cpus=1)
    seg = _predict(stage, np.asanyarray(resampled.dataobj), resampled)
    prediction = remove_auxiliary_labels(nifti(seg, resampled.affine), stage.task)
    if stage.resample is not None:
        prediction = change_spacing(prediction, stage.resample, canonical.shape, order=0, dtype=np.uint8, nr_cpus=1,
                                    force_affine=canonical.affine)
    return undo_canonical(prediction, image)


def _predict(stage: Stage, storage: npt.NDArray[Any], image: Any) -> npt.NDArray[np.uint8]:
    """Every model of the stage on the image (NIfTI storage order); parts combined as TotalSegmentator does."""
    combined = np.zeros(storage.shape, dtype=np.uint8)
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float32)
    for tid, (predictor, reorient) in stage.models.items():
        given = storage_input(storage, image.affine, zooms, reorient)
        seg = np.asarray(given.undo(predictor.predict_single_npy_array(given.image, given.properties, None,
                                                                      None, False))).astype(np.uint8)
        if tid in stage.part_luts:
            lut = stage.part_luts[tid]
            if seg.size and int(seg.max()) >= len(lut):
                lut = np.pad(lut, (0, int(seg.max()) + 1 - len(lut)))
            seg = lut[seg]
            np.copyto(combined, seg, where=seg != 0)
        else:
            combined = seg
    return combined
