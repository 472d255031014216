"""Random-weight models in each framework's own on-disk format, for tests and benchmarks (no weights can be
downloaded here).

- :func:`nnunet_model_folder`: an nnU-Net v2 trained-model folder (``dataset.json``, ``plans.json``,
  ``fold_N/checkpoint_final.pth`` in nnU-Net's checkpoint format) holding a PlainConvUNet with random weights.
- :func:`totalsegmentator_weights`: a TotalSegmentator weights folder with such a model under the dataset
  folder name TotalSegmentator looks for (e.g. ``Dataset297_TotalSegmentator_total_3mm_1559subj``), with
  TotalSegmentator's own label map for the task.
- :func:`monai_bundle`: a MONAI bundle (``configs/inference.json``, ``configs/metadata.json``,
  ``models/model.pt``) with a small MONAI UNet.

Shapes and spacings follow each framework's convention: nnU-Net plans are (z, y, x) in the array order of
its SimpleITK reader (spacing reversed from SimpleITK's (x, y, z)).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


@dataclass(frozen=True)
class NnUNetArch:
    """A PlainConvUNet plan: ``features`` per stage, ``strides`` per stage (z, y, x), ``patch`` (z, y, x),
    ``spacing`` (z, y, x) mm of the configuration."""

    features: tuple[int, ...] = (4, 8, 16)
    strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 2, 2), (2, 2, 2))
    patch: tuple[int, int, int] = (16, 64, 64)
    spacing: tuple[float, float, float] = (5.0, 4.0, 4.0)
    convs_per_stage: int = 1
    reader: str = "SimpleITKIO"
    normalization: str = "CTNormalization"
    intensity: dict[str, float] = field(default_factory=lambda: {
        "max": 3000.0, "mean": 40.0, "median": 30.0, "min": -1024.0, "percentile_00_5": -1000.0,
        "percentile_99_5": 1500.0, "std": 300.0})


# Roughly TotalSegmentator's 3 mm model (nnU-Net's default 3d_fullres plan for a 3 mm isotropic dataset): six
# stages of 32..320 features, a 128^3 patch. The real plans.json ships with the weights, which are not here.
TOTALSEG_3MM = NnUNetArch(features=(32, 64, 128, 256, 320, 320),
                          strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
                          patch=(128, 128, 128), spacing=(3.0, 3.0, 3.0), convs_per_stage=2)


def _plans(arch: NnUNetArch, dataset_name: str, configuration: str) -> dict[str, Any]:
    n = len(arch.features)
    arch_kwargs = {
        "n_stages": n, "features_per_stage": list(arch.features), "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n, "strides": [list(s) for s in arch.strides],
        "n_conv_per_stage": [arch.convs_per_stage] * n, "n_conv_per_stage_decoder": [arch.convs_per_stage] * (n - 1),
        "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": f"nnUNetPlans_{configuration}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": list(arch.patch), "median_image_size_in_voxels": [64, 128, 128],
        "spacing": list(arch.spacing), "normalization_schemes": [arch.normalization], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {"network_class_name": PLAIN_UNET, "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}
    return {
        "dataset_name": dataset_name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(arch.spacing),
        "original_median_shape_after_transp": [64, 128, 128], "image_reader_writer": arch.reader,
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {configuration: config}, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(arch.intensity)}}


def nnunet_model_folder(folder: Path, labels: dict[str, int], *, arch: NnUNetArch = NnUNetArch(),
                        folds: tuple[int, ...] = (0,), seed: int = 0, trainer: str = "nnUNetTrainer",
                        configuration: str = "3d_fullres", dataset_name: str = "Dataset999_Tiny",
                        mirror_axes: tuple[int, ...] | None = (0, 1, 2), init_std: float = 0.1,
                        plans: dict[str, Any] | None = None, in_channels: int = 1) -> Path:
    """Write an nnU-Net v2 model folder at ``folder`` (created) with random weights; ``labels`` maps names to
    values as in ``dataset.json`` (background 0 included or added). ``plans`` replaces the one-configuration
    plans made from ``arch`` (whose network the checkpoint holds, with ``in_channels`` inputs). Returns
    ``folder``."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    labels = {"background": 0, **labels}
    folder.mkdir(parents=True, exist_ok=True)
    plans = plans or _plans(arch, dataset_name, configuration)
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz",
               "name": dataset_name, "release": "1.0-test"}
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    n = len(arch.features)
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        net = PlainConvUNet(in_channels, n, list(arch.features), torch.nn.Conv3d, 3, [list(s) for s in arch.strides],
                            [arch.convs_per_stage] * n, len(labels), [arch.convs_per_stage] * (n - 1), True,
                            torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                            torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=False)
        for name, p in net.named_parameters():  # random but not degenerate: the image decides the class
            if name.endswith("bias"):
                torch.nn.init.zeros_(p)
            else:
                torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 else 0.0, std=init_std)
        checkpoint = {"network_weights": net.state_dict(), "trainer_name": trainer,
                      "init_args": {"configuration": configuration, "fold": fold},
                      "inference_allowed_mirroring_axes": mirror_axes, "current_epoch": 1}
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def nnunet_cascade(dataset: Path, labels: dict[str, int], *, low: NnUNetArch, full: NnUNetArch, seed: int = 0,
                   dataset_name: str = "Dataset998_TinyCascade") -> tuple[Path, Path]:
    """An nnU-Net v2 cascade in the dataset folder ``dataset``, as nnU-Net's planner and training leave it: one
    plans.json with ``3d_lowres`` (``next_stage``), ``3d_fullres`` and ``3d_cascade_fullres`` (inherits from
    3d_fullres, ``previous_stage`` 3d_lowres), and two trained-model folders: the low-resolution model and the
    cascade's full-resolution model, whose network takes the image plus one channel per foreground label (the
    previous stage's segmentation, one-hot). Returns (lowres folder, cascade folder)."""
    plans = _plans(low, dataset_name, "3d_lowres")
    plans["configurations"]["3d_lowres"]["next_stage"] = ["3d_cascade_fullres"]
    plans["configurations"]["3d_fullres"] = _plans(full, dataset_name, "3d_fullres")["configurations"]["3d_fullres"]
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    inner = "nnUNetTrainer__nnUNetPlans__"
    lowres = nnunet_model_folder(dataset / f"{inner}3d_lowres", labels, arch=low, seed=seed,
                                 configuration="3d_lowres", dataset_name=dataset_name, plans=plans, mirror_axes=None)
    cascade = nnunet_model_folder(dataset / f"{inner}3d_cascade_fullres", labels, arch=full, seed=seed + 1,
                                  configuration="3d_cascade_fullres", dataset_name=dataset_name, plans=plans,
                                  in_channels=1 + len(labels), mirror_axes=None)
    return lowres, cascade


def monai_inference_config(roi: tuple[int, int, int] = (32, 32, 16),
                           pixdim: tuple[float, float, float] = (4.0, 4.0, 5.0), out_channels: int = 4,
                           ) -> dict[str, Any]:
    """A MONAI bundle inference.json in the style of the model zoo's CT segmentation bundles: load, channel
    first, RAS, resample, intensity window, sliding-window inference (Gaussian), softmax, invert, arg-max, save."""
    return {
        "imports": ["$import glob", "$import os", "$import numpy"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": out_channels,
                        "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm": "batch"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(pixdim), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000, "a_max": 400, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi), "sw_batch_size": 2, "overlap": 0.25,
                    "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "resample": False, "separate_folder": False, "output_dtype": "$numpy.uint8"}]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }


def monai_bundle(folder: Path, labels: dict[int, str], *, seed: int = 0, version: str = "0.1.0",
                 inference: dict[str, Any] | None = None) -> Path:
    """A MONAI bundle at ``folder`` (must not exist) made by ``monai.bundle.init_bundle`` with a small UNet
    (random weights, batch norm with non-trivial statistics so the image decides the class), the zoo-style
    inference.json above and metadata naming the output channels (``labels``: channel -> name)."""
    from monai.bundle import init_bundle
    from monai.networks.nets import UNet

    config = inference or monai_inference_config(out_channels=len(labels) + 1)
    torch.manual_seed(seed)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=len(labels) + 1, channels=(8, 16, 32), strides=(2, 2),
               num_res_units=1, norm="batch")
    for name, buffer in net.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_(0.0, 0.2)
        elif name.endswith("running_var"):
            buffer.uniform_(0.05, 0.3)
    channels = {"0": "background", **{str(k): v for k, v in labels.items()}}
    metadata = {"name": "Tiny CT bundle", "version": version, "task": "test", "description": "random weights",
                "authors": "dicomnode tests", "copyright": "none", "changelog": {version: "test"},
                "monai_version": "1.4.0", "pytorch_version": "2.0.0", "numpy_version": "1.26.0",
                "required_packages_version": {},
                "network_data_format": {
                    "inputs": {"image": {"type": "image", "format": "hounsfield", "num_channels": 1,
                                         "spatial_shape": [32, 32, 16], "dtype": "float32", "value_range": [0, 1],
                                         "is_patch_data": True, "channel_def": {"0": "image"}}},
                    "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(channels),
                                         "spatial_shape": [32, 32, 16], "dtype": "float32", "value_range": [0, 1],
                                         "is_patch_data": True, "channel_def": channels}}}}
    init_bundle(folder, network=net, metadata_str=metadata, inference_str=config)
    return folder


def totalsegmentator_weights(weights: Path, task: str = "total", *, fast: bool = True, fastest: bool = False,
                             arch: NnUNetArch | None = None, seed: int = 0) -> list[Path]:
    """Random-weight nnU-Net models in a TotalSegmentator weights folder, under the dataset folder names and
    ``<trainer>__<plans>__<configuration>`` folders TotalSegmentator looks for (its own ``get_task_config`` and
    ``TASK_ID_WEIGHTS_CONFIGS``), labelled with its own class maps. Returns the model folders."""
    from totalsegmentator import map_to_binary
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.python_api import get_task_config

    config = get_task_config(task, fast=fast, fastest=fastest, quiet=True, plans="nnUNetPlans")
    ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
    resample = config.get("resample") or 1.5
    spacing = tuple(float(s) for s in (resample if isinstance(resample, list) else [resample] * 3))[::-1]
    arch = arch or NnUNetArch(patch=(32, 64, 64), spacing=(spacing[0], spacing[1], spacing[2]))
    inner = f"{config['trainer']}__{config.get('plans') or 'nnUNetPlans'}__{config.get('model') or '3d_fullres'}"
    parts = {"total": ("class_map_5_parts", "map_taskid_to_partname_ct")}.get(task)
    folders = []
    for i, tid in enumerate(ids):
        info = TASK_ID_WEIGHTS_CONFIGS[tid]
        if len(ids) > 1 and parts is not None:
            part = getattr(map_to_binary, parts[1])[tid]
            names = getattr(map_to_binary, parts[0])[part]
        else:
            names = map_to_binary.class_map[task]
        labels = {str(name): int(value) for value, name in names.items()}
        folder = weights / (info.get("rel_path") or "") / info["foldername"] / inner
        folders.append(nnunet_model_folder(folder, labels, arch=arch, seed=seed + i, trainer=config["trainer"],
                                           configuration=config.get("model") or "3d_fullres",
                                           dataset_name=info["foldername"], mirror_axes=None))
    return folders
