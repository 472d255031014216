"""Segmentation inference: the Segmenter protocol, classical and model-backed segmenters, the model runner.

Typical use in a worker process (build once, segment many)::

    cache = SegmenterCache(RunnerSettings(device="auto", batch_size=2))
    labels = cache.get("lung-unet").segment(volume)   # LabelVolume on volume's grid: 1 right, 2 left lung

See :mod:`dicomnode.inference.segmenter` for the kinds, :mod:`dicomnode.inference.runner` for device, sliding
window, mixed precision and out-of-memory handling, :mod:`dicomnode.inference.spec` for a model's embedded
preprocessing; the framework adapters :mod:`.nnunet`, :mod:`.totalseg`, :mod:`.monai_bundle` (sharing
:mod:`.frameworks`) import their framework only when such a model is built; :mod:`.inventory` is what
``dicomnode models`` and ``serve``'s start-up check use, and
:mod:`dicomnode.inference.remote` is the Ray engine (segmenters resident in Ray actors; not imported here, so
the local engine never imports Ray).
The stage that runs models; may import :mod:`dicomnode.imaging`, ``config`` and ``errors``.
"""

from dicomnode.inference.loaders import LoadedModel, ModelLoadError, load_torchscript, load_unet
from dicomnode.inference.runner import (
    DeviceUnavailableError,
    InferenceOutOfMemory,
    ModelRunner,
    RunnerSettings,
    resolve_device,
)
from dicomnode.inference.segmenter import (
    ClassicalSegmenter,
    ModelSegmenter,
    Segmenter,
    SegmenterCache,
    TorchScriptSegmenter,
    UNetSegmenter,
    build_segmenter,
)
from dicomnode.inference.spec import PreprocessSpec

__all__ = [
    "ClassicalSegmenter",
    "DeviceUnavailableError",
    "InferenceOutOfMemory",
    "LoadedModel",
    "ModelLoadError",
    "ModelRunner",
    "ModelSegmenter",
    "PreprocessSpec",
    "RunnerSettings",
    "Segmenter",
    "SegmenterCache",
    "TorchScriptSegmenter",
    "UNetSegmenter",
    "build_segmenter",
    "load_torchscript",
    "load_unet",
    "resolve_device",
]
