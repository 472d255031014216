"""The preprocessing spec saved beside a model's weights, and the transforms it defines (and their inverse).

A :class:`PreprocessSpec` is model-agnostic: it says how a :class:`~dicomnode.imaging.volume.Volume` becomes the
network's input and how the network's output goes back onto the source grid. Its intensity and resampling
fields are one declarative chain (:attr:`PreprocessSpec.steps`, run by :mod:`dicomnode.imaging.chain`; a
pipeline's ``model.preprocess`` replaces it). Training (``scripts/train_lung_unet.py``) and inference call the
*same* functions below, so inference reproduces the training input exactly.

Normalisation (the seed tutorial 003 convention, "clip then min-max"): values (HU for CT) are clipped to
``[window_low, window_high]`` and scaled linearly to ``[0, 1]`` (``window_low`` -> 0, ``window_high`` -> 1).
Resampling: trilinear (``align_corners=False``, i.e. voxel centres of the first and last voxel are not pinned;
the extent of the volume is kept) from the source spacing to ``target_spacing_mm``; the inverse maps class
probabilities back to the exact source shape with the same interpolation, then takes the arg-max.
Orientation: the model sees every volume in one canonical orientation (:class:`Orientation`: axis 0 towards
Superior, 1 Posterior, 2 patient Left, by exact transposes/flips), so left and right stay right whatever the
series' storage order. All arrays are (z, y, x); spacings are in millimetres along (z, y, x).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from dicomnode.config import PreprocessStep, ResampleStep, WindowStep
from dicomnode.imaging.chain import extent_shape, restore_extent, run_chain
from dicomnode.imaging.volume import Volume

SPEC_FORMAT = "dicomnode-preprocess/1"


@dataclass(frozen=True)
class PreprocessSpec:
    """How to turn a Volume into model input and model output into labels.

    ``label_values[i - 1]`` is the :class:`~dicomnode.imaging.labels.LabelInfo` value of output class ``i``
    (class 0 is background) and ``label_names[i - 1]`` its name, which must match a LabelInfo in
    :mod:`dicomnode.imaging.labels`.
    ``patch_size`` is the sliding-window patch (z, y, x) in voxels of the resampled grid.
    """

    target_spacing_mm: tuple[float, float, float]
    window_low: float
    window_high: float
    patch_size: tuple[int, int, int]
    label_values: tuple[int, ...]
    label_names: tuple[str, ...]
    modality: str = "CT"
    normalisation: str = "clip-minmax-0-1"

    def __post_init__(self) -> None:
        if self.normalisation != "clip-minmax-0-1":
            raise ValueError(f"unsupported normalisation {self.normalisation!r}")
        if not self.window_high > self.window_low:
            raise ValueError("window_high must exceed window_low")
        if len(self.label_values) != len(self.label_names):
            raise ValueError("label_values and label_names differ in length")
        if any(s <= 0 for s in self.target_spacing_mm) or any(p <= 0 for p in self.patch_size):
            raise ValueError("spacings and patch sizes must be positive")

    @property
    def num_classes(self) -> int:
        """Output channels including background."""
        return len(self.label_values) + 1

    @property
    def steps(self) -> tuple[PreprocessStep, ...]:
        """The spec as a declarative chain: window [window_low, window_high] to [0, 1], then resample to
        ``target_spacing_mm`` keeping the extent (trilinear, align_corners=False)."""
        width = self.window_high - self.window_low
        return (WindowStep(center=self.window_low + width / 2.0, width=width),
                ResampleStep(spacing=self.target_spacing_mm, grid="extent"))

    @property
    def pad_value(self) -> float:
        """The normalised value of ``window_low`` (air for a CT lung window): what padding uses."""
        return 0.0

    def to_json(self) -> str:
        raw = asdict(self)
        raw["format"] = SPEC_FORMAT
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        raw: dict[str, Any] = json.loads(text)
        if raw.pop("format", None) != SPEC_FORMAT:
            raise ValueError(f"not a {SPEC_FORMAT} spec")
        return cls(
            target_spacing_mm=_triple(raw["target_spacing_mm"], float),
            window_low=float(raw["window_low"]),
            window_high=float(raw["window_high"]),
            patch_size=_triple(raw["patch_size"], int),
            label_values=tuple(int(v) for v in raw["label_values"]),
            label_names=tuple(str(n) for n in raw["label_names"]),
            modality=str(raw.get("modality", "CT")),
            normalisation=str(raw.get("normalisation", "clip-minmax-0-1")),
        )


def _triple(values: Any, kind: type[Any]) -> Any:
    out = tuple(kind(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"expected three values, got {values!r}")
    return out


def resampled_shape(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], target: tuple[float, float, float]
) -> tuple[int, int, int]:
    """Shape (z, y, x) of the grid covering the same extent at ``target`` spacing (mm), at least 1 voxel."""
    return extent_shape(shape, spacing, target)


def prepare_array(
    data: npt.NDArray[np.float32], spacing: tuple[float, float, float], spec: PreprocessSpec
) -> torch.Tensor:
    """Model input (Z', Y', X') float32 on the CPU: the spec's chain (window, then resample to its spacing)."""
    return run_chain(data, spacing, spec.steps, units="").image


@dataclass(frozen=True)
class Orientation:
    """How a volume's array axes map onto the canonical model orientation, and back.

    Canonical: array axis 0 runs towards patient Superior (+z LPS), axis 1 towards Posterior (+y), axis 2
    towards patient Left (+x), i.e. an axial head-first-supine-like stack as the training data. ``perm[i]`` is
    the source axis that becomes canonical axis ``i`` (each source axis goes to the LPS axis it is most
    parallel to), ``flip[i]`` whether it is reversed. Only transposes and flips: no interpolation, exact.
    Without it a model would swap right and left on, say, a series stored with the x axis reversed.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @classmethod
    def of(cls, affine: npt.NDArray[np.float64]) -> Orientation:
        direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        lps_to_canonical = {2: 0, 1: 1, 0: 2}  # S -> axis 0, P -> axis 1, L -> axis 2
        perm, flip = [0, 0, 0], [False, False, False]
        used_axes: set[int] = set()
        used_lps: set[int] = set()
        order = sorted(((abs(direction[c, a]), c, a) for c in range(3) for a in range(3)), reverse=True)
        for _, c, a in order:
            if c in used_lps or a in used_axes:
                continue
            used_lps.add(c)
            used_axes.add(a)
            perm[lps_to_canonical[c]] = a
            flip[lps_to_canonical[c]] = bool(direction[c, a] < 0)
        return cls((perm[0], perm[1], perm[2]), (flip[0], flip[1], flip[2]))

    def apply(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Source (z, y, x) array -> canonical array (a view where possible)."""
        out = np.transpose(array, self.perm)
        return out[tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)]

    def undo(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Canonical array -> source axes; the exact inverse of :meth:`apply`."""
        out = array[tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)]
        return np.ascontiguousarray(np.transpose(out, np.argsort(self.perm)))

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        return (spacing[self.perm[0]], spacing[self.perm[1]], spacing[self.perm[2]])


def prepare(volume: Volume, spec: PreprocessSpec) -> torch.Tensor:
    """Model input for a Volume: re-oriented to the canonical orientation (:class:`Orientation`), then
    :func:`prepare_array` (the spec's chain). Modality must match the spec."""
    if spec.modality and volume.modality != spec.modality:
        raise ValueError(f"model expects {spec.modality}, got {volume.modality}")
    orientation = Orientation.of(volume.affine)
    return prepare_array(orientation.apply(volume.data), orientation.spacing(volume.spacing), spec)


def restore(volume: Volume, probs: torch.Tensor) -> npt.NDArray[np.uint8]:
    """Class indices (z, y, x) uint8 on the volume's own grid from probabilities (C, Z', Y', X') on the
    model grid of :func:`prepare`: :func:`restore_labels`, then :meth:`Orientation.undo`."""
    orientation = Orientation.of(volume.affine)
    canonical = tuple(volume.shape[axis] for axis in orientation.perm)
    classes = restore_labels(probs, (int(canonical[0]), int(canonical[1]), int(canonical[2])))
    return np.asarray(orientation.undo(classes), dtype=np.uint8)


restore_labels = restore_extent  # the inverse of the spec's resampling (trilinear back, then arg-max)
