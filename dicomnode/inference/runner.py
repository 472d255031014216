"""Runs a resident model over a volume: device choice, sliding window with blending, AMP, OOM fallback.

Contract of :meth:`ModelRunner.predict`: input a float32 tensor (Z, Y, X) already normalised (see
:mod:`dicomnode.inference.spec`), output class probabilities (C, Z, Y, X) float32 on the CPU, on the same
grid. The model is any ``torch.nn.Module`` (a TorchScript module included) mapping ``(N, 1, pz, py, px)``
to logits ``(N, C, pz, py, px)``.

- Device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` (an error when CUDA is absent).
  The model is moved to the device once, at construction, and stays there.
- Sliding window: patches of ``patch_size`` voxels with ``overlap`` (fraction of the patch) in a fixed order,
  batched ``batch_size`` at a time; softmax probabilities are blended with a Gaussian importance map
  (sigma = patch/8, as nnU-Net) or uniformly. Volumes smaller than a patch are padded with ``pad_value``.
- Mixed precision (``torch.autocast``, bfloat16 where the GPU supports it, else float16) on CUDA only.
- CUDA out-of-memory: the batch is retried with half the batch size, down to 1, then the model moves to the
  CPU for good and the batch is retried there; each step is logged at WARNING. Out of memory on the CPU at
  batch size 1 raises :class:`InferenceOutOfMemory` (retryable).
- Determinism: :func:`configure_torch` sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` and
  cuDNN benchmark off once per process, before the first model is built (torch's flags are process-wide: they
  are never flipped per call); with a fixed patch order and accumulation order the same input gives the same
  output on one device.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dicomnode.errors import PipelineError, TransientError

log = logging.getLogger(__name__)

Window = tuple[slice, slice, slice]


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
    """Start indices along one axis so patches of ``patch`` cover ``size`` (>= patch) with the overlap."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch, step))
    return starts + [size - patch]


def importance_map(patch: tuple[int, int, int], blend: str) -> torch.Tensor:
    """Blending weights (pz, py, px) float32, max 1 and strictly positive."""
    if blend == "constant":
        return torch.ones(patch, dtype=torch.float32)
    axes = []
    for n in patch:
        centre = (n - 1) / 2.0
        sigma = max(n / 8.0, 1e-3)
        idx = torch.arange(n, dtype=torch.float64)
        axes.append(torch.exp(-0.5 * ((idx - centre) / sigma) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    return weights.clamp_min(1e-3).to(torch.float32)


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
        self.batch_size = self.settings.batch_size
        self.model = model.eval().to(self.device)
        self._weights = importance_map(patch_size, self.settings.blend)
        log.info("model resident on %s (batch %d, patch %s)", self.device, self.batch_size, patch_size)

    @torch.inference_mode()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Probabilities (C, Z, Y, X) float32 on the CPU for a normalised image (Z, Y, X)."""
        if image.dim() != 3:
            raise ValueError(f"expected a (Z, Y, X) image, got shape {tuple(image.shape)}")
        shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
        padded = self._pad(image.float().cpu())
        windows = self._windows(tuple(int(s) for s in padded.shape))
        acc: torch.Tensor | None = None
        norm = torch.zeros(padded.shape, dtype=torch.float32)
        for probs, window in self._batches(padded, windows):
            if acc is None:
                acc = torch.zeros((probs.shape[0], *padded.shape), dtype=torch.float32)
            acc[(slice(None), *window)] += probs * self._weights
            norm[window] += self._weights
        if acc is None:  # cannot happen: _windows always yields at least one window
            raise RuntimeError("no window was predicted")
        out = acc / norm
        return out[:, : shape[0], : shape[1], : shape[2]].contiguous()

    def patch_count(self, shape: tuple[int, int, int]) -> int:
        """Number of sliding-window patches for an image of ``shape`` (z, y, x) on the model's grid."""
        padded = tuple(max(s, p) for s, p in zip(shape, self.patch_size, strict=True))
        return len(self._windows(padded))

    def _pad(self, image: torch.Tensor) -> torch.Tensor:
        pads = [max(0, p - int(s)) for p, s in zip(self.patch_size, image.shape, strict=True)]
        if not any(pads):
            return image
        # F.pad takes (x_before, x_after, y_before, y_after, z_before, z_after); pad after only.
        return F.pad(image, (0, pads[2], 0, pads[1], 0, pads[0]), value=self.pad_value)

    def _windows(self, shape: tuple[int, ...]) -> list[Window]:
        starts = [window_starts(s, p, self.settings.overlap) for s, p in zip(shape, self.patch_size, strict=True)]
        pz, py, px = self.patch_size
        return [(slice(z, z + pz), slice(y, y + py), slice(x, x + px)) for z, y, x in itertools.product(*starts)]

    def _batches(self, image: torch.Tensor, windows: list[Window]) -> Iterator[tuple[torch.Tensor, Window]]:
        """Yields (probabilities (C, pz, py, px) on the CPU, window) for every window, in order."""
        done = 0
        while done < len(windows):
            chunk = windows[done : done + self.batch_size]
            batch = torch.stack([image[w] for w in chunk])[:, None]
            probs = self._forward_with_fallback(batch)
            for i, window in enumerate(chunk):
                yield probs[i], window
            done += len(chunk)

    def _forward_with_fallback(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax of the model on ``batch`` (N, 1, pz, py, px), halving the batch / moving to CPU on OOM."""
        while True:
            try:
                parts = [self._forward(part) for part in torch.split(batch, self.batch_size)]
                return torch.cat(parts)
            except torch.OutOfMemoryError as error:
                self._on_out_of_memory(error)

    def _on_out_of_memory(self, error: BaseException) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            log.warning("out of memory on %s; retrying with batch size %d", self.device, self.batch_size)
            return
        if self.device.type != "cpu":
            log.warning("out of memory on %s at batch size 1; moving the model to the CPU", self.device)
            self.device = torch.device("cpu")
            self.model = self.model.to(self.device)
            return
        log.error("out of memory on the CPU at batch size 1; giving up")
        raise InferenceOutOfMemory(f"inference out of memory at batch size 1 on the CPU: {error}") from error

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=False)
        amp = self.settings.amp and self.device.type == "cuda"
        dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
        ctx = torch.autocast(device_type="cuda", dtype=dtype) if amp else nullcontext()
        with ctx:
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).cpu()
