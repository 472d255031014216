"""Runs a resident model over a volume: device choice, sliding window with blending, AMP, OOM fallback.

Contract of :meth:`ModelRunner.predict`: input a float32 tensor (Z, Y, X) already normalised (see
:mod:`dicomnode.imaging.chain`), output class probabilities (C, Z, Y, X) float32 on the CPU, on the same
grid. The model is any ``torch.nn.Module`` (a TorchScript module included) mapping ``(N, 1, pz, py, px)``
to logits ``(N, C, pz, py, px)``.

- Device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` (an error when CUDA is absent).
  The model is moved to the device once, at construction, and stays there.
- Sliding window: MONAI's ``sliding_window_inference`` with patches of ``patch_size`` voxels, ``overlap``
  (fraction of the patch), ``batch_size`` patches per forward pass, softmax probabilities blended with a
  Gaussian importance map (sigma = patch/8, as nnU-Net) or uniformly, stitched on the CPU. Volumes smaller
  than a patch are padded with ``pad_value``. Measured against the hand-written window it replaced (P01,
  shipped lung U-Net, CPU): the same arg-max everywhere, probabilities within 1.2e-3, time within the noise.
- Mixed precision (``torch.autocast``, bfloat16 where the GPU supports it, else float16) on CUDA only.
- Out of memory, per job: the job is retried with half the batch size, down to 1, then on the CPU; each step
  is logged at WARNING. The next job starts again from the configured batch size and device (the model goes
  back to it). Out of memory on the CPU at batch size 1 raises :class:`InferenceOutOfMemory` (retryable).
- Determinism: :func:`configure_torch` sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` and
  cuDNN benchmark off once per process, before the first model is built (torch's flags are process-wide: they
  are never flipped per call); with a fixed patch order and accumulation order the same input gives the same
  output on one device.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dicomnode.errors import PipelineError, TransientError

log = logging.getLogger(__name__)

class DeviceUnavailableError(PipelineError):
    """The configured device does not exist on this machine (e.g. ``cuda`` without a GPU). Final."""


class InferenceOutOfMemory(TransientError):
    """Out of memory even at batch size 1 on the CPU; retrying later (with more free memory) may work."""


@dataclass(frozen=True)
class RunnerSettings:
    """How to run a model. ``device``: "auto" | "cpu" | "cuda"; ``overlap`` in [0, 1) of the patch size."""

    device: str = "auto"
    batch_size: int = 2
    overlap: float = 0.5
    blend: Literal["gaussian", "constant"] = "gaussian"
    amp: bool = True  # autocast on CUDA only; ignored on the CPU

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError("overlap must be in [0, 1)")


def resolve_device(setting: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; ``"cpu"``; ``"cuda"`` or ``"cuda:N"`` (must be available)."""
    value = str(getattr(setting, "value", setting)).lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {value!r} requested but CUDA is not available")
        return torch.device(value)
    raise DeviceUnavailableError(f"unknown device setting {setting!r} (use auto, cpu or cuda)")


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices along one axis of the patches covering ``size`` (>= patch) with the overlap: the same
    count as MONAI's sliding window (interval int(patch x (1 - overlap)), the last patch flush with the end)."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch, step))
    return starts + [size - patch]


def configure_torch() -> None:
    """Torch's process-wide flags for the node's models, set once per model-running process (idempotent):
    deterministic algorithms (warn only where an operation has no deterministic version), cuDNN benchmark off."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


class ModelRunner:
    """A model resident on one device, predicting class probabilities over whole volumes (see module doc)."""

    def __init__(
        self,
        model: nn.Module,
        patch_size: tuple[int, int, int],
        settings: RunnerSettings | None = None,
        pad_value: float = 0.0,
    ) -> None:
        configure_torch()  # process-wide, idempotent: set when the process loads its first model
        self.settings = settings or RunnerSettings()
        self.device = resolve_device(self.settings.device)
        self.patch_size = patch_size
        self.pad_value = pad_value
        self.batch_size = self.settings.batch_size  # what each job starts with
        self.model = model.eval().to(self.device)
        log.info("model resident on %s (batch %d, patch %s)", self.device, self.batch_size, patch_size)

    @torch.inference_mode()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Probabilities (C, Z, Y, X) float32 on the CPU for a normalised image (Z, Y, X)."""
        if image.dim() != 3:
            raise ValueError(f"expected a (Z, Y, X) image, got shape {tuple(image.shape)}")
        batch, device = self.batch_size, self.device
        try:
            while True:
                try:
                    return self._window(image.float().cpu(), batch, device)
                except torch.OutOfMemoryError as error:
                    batch, device = self._step_down(error, batch, device)
        finally:
            if device != self.device:  # this job fell back to the CPU: the next one starts on the device again
                self.model = self.model.to(self.device)

    def patch_count(self, shape: tuple[int, int, int]) -> int:
        """Number of sliding-window patches for an image of ``shape`` (z, y, x) on the model's grid."""
        counts = [len(window_starts(max(s, p), p, self.settings.overlap)) for s, p in zip(shape, self.patch_size,
                                                                                         strict=True)]
        return counts[0] * counts[1] * counts[2]

    def _window(self, image: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        out = sliding_window_inference(
            image[None, None], roi_size=self.patch_size, sw_batch_size=batch,
            predictor=lambda x: self._forward(x, device), overlap=self.settings.overlap,
            mode=self.settings.blend, sigma_scale=0.125, padding_mode="constant", cval=self.pad_value,
            sw_device=device, device=torch.device("cpu"), progress=False)
        result: torch.Tensor = torch.as_tensor(out)[0].float().contiguous()
        return result

    def _step_down(self, error: BaseException, batch: int, device: torch.device) -> tuple[int, torch.device]:
        """The next rung of the out-of-memory ladder for this job: half the batch, then the CPU."""
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if batch > 1:
            batch = max(1, batch // 2)
            log.warning("out of memory on %s; retrying this job with batch size %d", device, batch)
            return batch, device
        if device.type != "cpu":
            log.warning("out of memory on %s at batch size 1; running this job on the CPU", device)
            self.model = self.model.to(torch.device("cpu"))
            return 1, torch.device("cpu")
        log.error("out of memory on the CPU at batch size 1; giving up")
        raise InferenceOutOfMemory(f"inference out of memory at batch size 1 on the CPU: {error}") from error

    def _forward(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = batch.to(device, non_blocking=False)
        amp = self.settings.amp and device.type == "cuda"
        dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
        ctx = torch.autocast(device_type="cuda", dtype=dtype) if amp else nullcontext()
        with ctx:
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1)
