"""The Segmenter protocol, its classical and model-backed implementations, and a per-process cache.

Every segmenter maps a :class:`~dicomnode.imaging.volume.Volume` (z, y, x) to a
:class:`~dicomnode.imaging.labels.LabelVolume` on *exactly* the input's grid (same shape; the caller pairs it with
the volume's affine), with label values and names from :mod:`dicomnode.imaging.labels` (lung: 1 = right lung,
2 = left lung, 3 = airways; body: 1; brain: 1).

- :class:`ClassicalSegmenter` wraps :mod:`dicomnode.imaging.masks` (no weights): ``lung``, ``body``, ``brain``.
- :class:`ModelSegmenter` runs a network through :class:`~dicomnode.inference.runner.ModelRunner` with the
  preprocessing spec saved beside the weights; :class:`UNetSegmenter` (state-dict checkpoint of
  :class:`~dicomnode.inference.unet.UNet3D`, default: the shipped lung U-Net) and
  :class:`TorchScriptSegmenter` (any TorchScript archive) are its two loaders.
- :class:`SegmenterCache` builds each segmenter once per process (the model stays resident) and hands the
  same instance to every job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from dicomnode.config import CropStep, LabelCode, ModelConfig, PreprocessStep, SegmenterKind
from dicomnode.errors import PipelineError
from dicomnode.imaging import labels as label_defs
from dicomnode.imaging import masks
from dicomnode.imaging.chain import ChainError, check_chain, run_chain, undo_chain
from dicomnode.imaging.codes import coded_label
from dicomnode.imaging.labels import LabelInfo, LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.inference.frameworks import ModelInfo, weights_hash
from dicomnode.inference.loaders import LoadedModel, ModelLoadError, load_torchscript, load_unet
from dicomnode.inference.runner import ModelRunner, RunnerSettings, resolve_device
from dicomnode.inference.spec import Orientation, PreprocessSpec

_KNOWN_LABELS: dict[str, LabelInfo] = {
    info.name: info
    for info in (
        label_defs.LUNG_RIGHT,
        label_defs.LUNG_LEFT,
        label_defs.AIRWAYS,
        label_defs.BODY,
        label_defs.BRAIN,
    )
}


@runtime_checkable
class Segmenter(Protocol):
    """Anything with a name, a version, a :class:`~dicomnode.inference.frameworks.ModelInfo` and
    ``segment(volume) -> LabelVolume`` on the volume's grid."""

    name: str
    version: str
    info: ModelInfo

    def segment(self, volume: Volume) -> LabelVolume: ...


class ClassicalSegmenter:
    """A weight-free segmenter: a function of :mod:`dicomnode.imaging.masks`, named and versioned."""

    def __init__(self, name: str, function: Callable[[Volume], LabelVolume], version: str = masks.ALGORITHM_VERSION,
                 labels: tuple[LabelInfo, ...] = (), kind: str = "classical"):
        self.name = name
        self.version = version
        self._function = function
        self.info = ModelInfo(name, version, kind, "dicomnode.imaging.masks", {i.value: i.name for i in labels}, "cpu")

    def segment(self, volume: Volume) -> LabelVolume:
        result = self._function(volume)
        if result.data.shape != volume.shape:
            raise PipelineError(f"{self.name}: labels {result.data.shape} do not match volume {volume.shape}")
        return result

    @classmethod
    def lung(cls) -> ClassicalSegmenter:
        """Right lung 1, left lung 2 (and airways 3 where found) by thresholding: CT only."""
        return cls("dicomnode-classical-lung", masks.lung_mask, labels=(label_defs.LUNG_RIGHT, label_defs.LUNG_LEFT,
                                                                        label_defs.AIRWAYS), kind="lung")

    @classmethod
    def body(cls) -> ClassicalSegmenter:
        return cls("dicomnode-classical-body", masks.body_mask, labels=(label_defs.BODY,), kind="body")

    @classmethod
    def brain(cls) -> ClassicalSegmenter:
        return cls("dicomnode-classical-brain", masks.brain_mask, labels=(label_defs.BRAIN,), kind="brain")


def label_infos(spec: PreprocessSpec, codes: tuple[LabelCode, ...] = ()) -> tuple[LabelInfo, ...]:
    """The :mod:`dicomnode.imaging.labels` entries named by the spec (when value and name agree), else the
    label coded from its name (:func:`~dicomnode.imaging.codes.coded_label`, with the config's ``codes``)."""
    infos = []
    for value, name in zip(spec.label_values, spec.label_names, strict=True):
        info = _KNOWN_LABELS.get(name)
        if info is None or info.value != value or any(c.label == name for c in codes):
            info = coded_label(value, name, codes)
        infos.append(info)
    return tuple(infos)


class ModelSegmenter:
    """A network kept resident on its device; ``segment`` = canonical orientation -> preprocessing chain ->
    sliding window -> inverse chain -> labels on the volume's grid.

    The chain is the pipeline's ``model.preprocess`` when given, else the one embedded with the model
    (:attr:`~dicomnode.inference.spec.PreprocessSpec.steps`); it is checked here, at start-up.
    """

    def __init__(self, loaded: LoadedModel, settings: RunnerSettings | None = None,
                 preprocess: tuple[PreprocessStep, ...] = (), codes: tuple[LabelCode, ...] = (), kind: str = "unet",
                 ) -> None:
        self.name = loaded.name
        self.version = loaded.version if loaded.version != "unversioned" or loaded.path is None else \
            weights_hash([loaded.path])
        self.spec = loaded.spec
        self.metrics = loaded.metrics
        self.steps = preprocess or loaded.spec.steps
        try:
            check_chain(self.steps)
        except ChainError as error:
            raise ModelLoadError(f"{self.name}: {error}") from error
        self._labels = label_infos(loaded.spec, codes)
        self._lut = np.array([0, *loaded.spec.label_values], dtype=np.uint8)
        self.runner = ModelRunner(loaded.module, loaded.spec.patch_size, settings, loaded.spec.pad_value)
        self.info = ModelInfo(self.name, self.version, kind, str(loaded.path or ""),
                              {i.value: i.name for i in self._labels}, str(self.runner.device))

    def segment(self, volume: Volume) -> LabelVolume:
        """Labels (z, y, x) uint8 on the volume's grid; values from the spec (e.g. 1 right, 2 left lung)."""
        if self.spec.modality and volume.modality != self.spec.modality:
            raise PipelineError(f"{self.name}: model expects {self.spec.modality}, got {volume.modality}")
        orientation = Orientation.of(volume.affine)
        data = orientation.apply(volume.data)
        body = None
        if any(isinstance(step, CropStep) for step in self.steps):
            body = np.asarray(orientation.apply(masks.body_mask(volume).data) > 0)
        try:
            prepared = run_chain(data, orientation.spacing(volume.spacing), self.steps, units=volume.units,
                                 body=body)
        except ChainError as error:
            raise PipelineError(f"{self.name}: {error}") from error
        probs = self.runner.predict(prepared.image)
        shape = (int(data.shape[0]), int(data.shape[1]), int(data.shape[2]))
        classes = orientation.undo(undo_chain(prepared, probs, shape))
        return LabelVolume(
            data=self._lut[classes],
            labels=self._labels,
            algorithm_name=self.name,
            algorithm_version=self.version,
        )


class UNetSegmenter(ModelSegmenter):
    """A :class:`~dicomnode.inference.unet.UNet3D` state-dict checkpoint (default: the shipped lung U-Net)."""

    def __init__(self, path: Path | None = None, settings: RunnerSettings | None = None) -> None:
        super().__init__(load_unet(path), settings)


class TorchScriptSegmenter(ModelSegmenter):
    """Any TorchScript archive with a preprocessing spec (embedded or sidecar JSON)."""

    def __init__(self, path: Path, settings: RunnerSettings | None = None) -> None:
        super().__init__(load_torchscript(path), settings)


def _model(kind: SegmenterKind | str | ModelConfig, model_path: Path | None) -> ModelConfig:
    if isinstance(kind, ModelConfig):
        return kind
    try:
        member = SegmenterKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in SegmenterKind)
        raise PipelineError(f"unknown segmenter kind {kind!r}; known: {known}") from None
    return ModelConfig(kind=member, path=model_path)


def build_segmenter(kind: SegmenterKind | str | ModelConfig, model_path: Path | None = None,
                    settings: RunnerSettings | None = None) -> Segmenter:
    """Build a segmenter from a pipeline's :class:`~dicomnode.config.ModelConfig`, or from a kind
    (:class:`~dicomnode.config.SegmenterKind` or its value) and ``model_path``: ``lung``/``body``/``brain``
    (classical), ``lung-unet`` (shipped weights, or ``model_path``), ``unet`` (a checkpoint), ``torchscript``
    (an archive), ``nnunet`` (a model folder), ``totalsegmentator`` (a task, weights in ``model.weights``),
    ``monai-bundle`` (a bundle folder). The framework kinds import their framework here, not before.
    Raises PipelineError (ModelLoadError) when the model cannot be loaded: the pipeline fails at start-up."""
    model = _model(kind, model_path)
    settings = settings or RunnerSettings()
    if model.kind.needs_path and model.path is None:
        raise PipelineError(f"segmenter kind {model.kind.value!r} needs a model path")
    match model.kind:
        case SegmenterKind.LUNG:
            return ClassicalSegmenter.lung()
        case SegmenterKind.BODY:
            return ClassicalSegmenter.body()
        case SegmenterKind.BRAIN:
            return ClassicalSegmenter.brain()
        case SegmenterKind.LUNG_UNET | SegmenterKind.UNET:
            return ModelSegmenter(load_unet(model.path), settings, model.preprocess, model.codes, model.kind.value)
        case SegmenterKind.TORCHSCRIPT if model.path is not None:
            return ModelSegmenter(load_torchscript(model.path), settings, model.preprocess, model.codes,
                                  model.kind.value)
        case SegmenterKind.NNUNET:
            from dicomnode.inference.nnunet import NnUNetSegmenter

            return NnUNetSegmenter(model, resolve_device(settings.device))
        case SegmenterKind.TOTALSEGMENTATOR:
            from dicomnode.inference.totalseg import TotalSegmentatorSegmenter

            return TotalSegmentatorSegmenter(model, resolve_device(settings.device))
        case SegmenterKind.MONAI_BUNDLE:
            from dicomnode.inference.monai_bundle import MonaiBundleSegmenter

            return MonaiBundleSegmenter(model, resolve_device(settings.device))
    raise PipelineError(f"segmenter kind {model.kind.value!r} cannot be built")  # pragma: no cover


class SegmenterCache:
    """Builds each model configuration once and returns the same resident instance after.

    Create one per worker process (not a global): the model is loaded and moved to the device on the first
    request only. Thread-safe.
    """

    def __init__(self, settings: RunnerSettings | None = None) -> None:
        self.settings = settings or RunnerSettings()
        self._items: dict[ModelConfig, Segmenter] = {}
        self._lock = threading.Lock()

    def get(self, kind: SegmenterKind | str | ModelConfig, model_path: Path | None = None) -> Segmenter:
        """The resident segmenter of a ModelConfig (or of a kind and path), built on first use."""
        model = _model(kind, model_path)
        with self._lock:
            found = self._items.get(model)
            if found is None:
                found = build_segmenter(model, None, self.settings)
                self._items[model] = found
            return found

    def __len__(self) -> int:
        return len(self._items)
