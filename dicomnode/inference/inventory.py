"""The models of a configuration: the start-up check ``serve`` runs and what ``dicomnode models`` reports.

- :func:`preflight` checks a model without loading its weights: the files and folders are there (for
  TotalSegmentator, the dataset folders of the task in its weights folder), the metadata names the labels.
  ``serve`` refuses to start when a pipeline's model fails it, with the reason (e.g. which TotalSegmentator
  folders it looked for and where to put them).
- :func:`check` loads every model as a worker would (:func:`~dicomnode.inference.segmenter.build_segmenter`)
  and reports its name, version (``dataset.json`` / ``metadata.json`` / the checkpoint, else a hash of the
  weights), label map, device, and whether it loads.

Heavy imports (torch, the frameworks) happen inside the functions, for the kinds that need them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from dicomnode.config import Config, ModelConfig, PipelineConfig, SegmenterKind
from dicomnode.errors import DicomNodeError

CLASSICAL = (SegmenterKind.LUNG, SegmenterKind.BODY, SegmenterKind.BRAIN)


def source(model: ModelConfig) -> str:
    """Where the model comes from, for people: its path, or the TotalSegmentator task and weights folder."""
    if model.kind is SegmenterKind.TOTALSEGMENTATOR:
        return f"task {model.task}{' (fast)' if model.fast else ''}, weights {model.weights or '(default)'}"
    if model.kind in CLASSICAL:
        return "classical (no weights)"
    return str(model.path) if model.path is not None else "(shipped)"


def preflight(model: ModelConfig) -> None:
    """Check ``model`` without loading weights; raises ModelLoadError (a PipelineError) with the reason."""
    if model.kind in CLASSICAL:
        return
    if model.kind is SegmenterKind.LUNG_UNET and model.path is None:
        from dicomnode.inference.loaders import DEFAULT_LUNG_UNET, ModelLoadError

        if not DEFAULT_LUNG_UNET.is_file():
            raise ModelLoadError(f"the shipped lung U-Net {DEFAULT_LUNG_UNET} is missing")
        return
    if model.kind is SegmenterKind.NNUNET and model.path is not None:
        from dicomnode.inference.nnunet import available_folds, dataset_labels, model_folder, read_json

        folder = model_folder(Path(model.path), model.configuration)
        dataset_labels(read_json(folder / "dataset.json"), folder)
        folds = model.folds or available_folds(folder, model.checkpoint)
        if not folds or any(not (folder / f"fold_{f}" / model.checkpoint).is_file() for f in folds):
            from dicomnode.inference.loaders import ModelLoadError

            raise ModelLoadError(f"{folder}: {model.checkpoint} missing for fold(s) {', '.join(folds) or 'any'}")
    elif model.kind is SegmenterKind.TOTALSEGMENTATOR:
        from dicomnode.inference.totalseg import model_folders, task_settings, weights_folder

        model_folders(weights_folder(model), task_settings(model.task, model.fast), model.task)
    elif model.kind is SegmenterKind.MONAI_BUNDLE and model.path is not None:
        import json

        from dicomnode.inference.loaders import ModelLoadError
        from dicomnode.inference.monai_bundle import channel_labels

        root = Path(model.path)
        if not (root / "configs" / "inference.json").is_file() or not (root / "configs" / "metadata.json").is_file():
            raise ModelLoadError(f"{root}: not a MONAI bundle (configs/inference.json, configs/metadata.json)")
        channel_labels(json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8")), root)
        if not any((root / "models" / name).is_file() for name in ("model.pt", "model.ts")):
            raise ModelLoadError(f"{root}: no models/model.pt or models/model.ts")


def segment_pipelines(cfg: Config) -> list[PipelineConfig]:
    return [p for p in cfg.pipelines if p.kind == "segment"]


def preflight_config(cfg: Config) -> None:
    """:func:`preflight` for every ``segment`` pipeline; the first failure names its pipeline."""
    for pipe in segment_pipelines(cfg):
        try:
            preflight(pipe.model)
        except DicomNodeError as error:
            raise type(error)(f"pipeline {pipe.name!r} cannot start: {error}") from error


def listing(cfg: Config) -> list[dict[str, Any]]:
    """Per segment pipeline: kind, source, and the preflight result (no weights loaded)."""
    rows = []
    for pipe in segment_pipelines(cfg):
        problem = None
        try:
            preflight(pipe.model)
        except DicomNodeError as error:
            problem = str(error)
        rows.append({"pipeline": pipe.name, "kind": pipe.model.kind.value, "source": source(pipe.model),
                     "ready": problem is None, "problem": problem})
    return rows


def check(cfg: Config) -> list[dict[str, Any]]:
    """Per segment pipeline: load the model as a worker would and report it (see the module docstring)."""
    from dicomnode.inference.frameworks import quiet_stdout
    from dicomnode.inference.runner import RunnerSettings
    from dicomnode.inference.segmenter import build_segmenter

    rows = []
    for pipe in segment_pipelines(cfg):
        row: dict[str, Any] = {"pipeline": pipe.name, "kind": pipe.model.kind.value, "source": source(pipe.model)}
        settings = RunnerSettings(device=cfg.worker.device.value, batch_size=pipe.model.batch_size,
                                  overlap=pipe.model.overlap, amp=pipe.model.amp)
        try:
            with quiet_stdout("dicomnode models check"):
                info = build_segmenter(pipe.model, None, settings).info
        except DicomNodeError as error:
            row.update(loads=False, error=str(error))
        else:
            described = asdict(info)
            described["labels"] = {str(k): v for k, v in sorted(info.labels.items())}
            row.update(model=described.pop("name"), **{k: v for k, v in described.items() if k not in row},
                       loads=True, error=None)
        rows.append(row)
    return rows
