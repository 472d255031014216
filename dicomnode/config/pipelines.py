"""What runs on a complete series: pipelines (forward or segment), their model (kinds, preprocessing steps,
label codes), volume and output options, and the rules that route a series to pipelines.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dicomnode.config.node import RayPlacement
from dicomnode.errors import ConfigError


class SegmenterKind(str, enum.Enum):
    """``model.kind`` of a ``segment`` pipeline: the closed set the segmenter factory builds."""

    LUNG = "lung"  # classical masks, no weights
    BODY = "body"
    BRAIN = "brain"
    LUNG_UNET = "lung-unet"  # the U-Net shipped with the package (or one at model.path)
    UNET = "unet"  # a state-dict checkpoint of the package's U-Net at model.path
    TORCHSCRIPT = "torchscript"  # a TorchScript archive at model.path with its preprocessing spec
    NNUNET = "nnunet"  # a trained nnU-Net v2 model folder at model.path
    TOTALSEGMENTATOR = "totalsegmentator"  # a TotalSegmentator task; weights in model.weights (never downloaded)
    MONAI_BUNDLE = "monai-bundle"  # a MONAI bundle folder at model.path

    @property
    def needs_path(self) -> bool:
        return self in (SegmenterKind.UNET, SegmenterKind.TORCHSCRIPT, SegmenterKind.NNUNET,
                        SegmenterKind.MONAI_BUNDLE)

    @property
    def path_is_folder(self) -> bool:
        """``model.path`` names a folder (nnU-Net model, MONAI bundle), not a file."""
        return self in (SegmenterKind.NNUNET, SegmenterKind.MONAI_BUNDLE)

    @property
    def takes_preprocess(self) -> bool:
        """Kinds whose preprocessing is the node's declarative chain (the frameworks bring their own)."""
        return self in (SegmenterKind.LUNG_UNET, SegmenterKind.UNET, SegmenterKind.TORCHSCRIPT)


# ------------------------------------------------------------------------------ preprocessing steps
@dataclass(frozen=True)
class HuStep:
    """``hu``: the volume must be CT in Hounsfield units (slope/intercept applied and padding turned to air at
    load); values are clipped to [``min``, ``max``] HU."""

    min: float = -1024.0
    max: float = 3071.0


@dataclass(frozen=True)
class WindowStep:
    """``window``: clip to [center - width/2, center + width/2] and scale linearly to [0, 1]; ``preset`` names
    one of dicomnode.imaging.preprocess.WINDOWS instead (lung, mediastinum, bone, brain, ...)."""

    center: float | None = None
    width: float | None = None
    preset: str | None = None


@dataclass(frozen=True)
class ResampleStep:
    """``resample``: to ``spacing`` mm along (z, y, x) (one number: isotropic), linear interpolation. ``grid``:
    ``extent`` keeps the volume's extent (n x spacing; trilinear, align_corners=False: the lung U-Net's
    training convention) or ``centres`` keeps the first voxel's centre (the fast banded resampler)."""

    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    grid: Literal["extent", "centres"] = "centres"


@dataclass(frozen=True)
class NormalizeStep:
    """``normalize``: ``zscore`` ((x - mean) / std over the volume, or over ``low <= x <= high`` when given) or
    ``minmax`` ([low, high], default the data's range, to [0, 1], clipped)."""

    mode: Literal["zscore", "minmax"] = "zscore"
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class CropStep:
    """``crop``: to the bounding box of the body (CT: the classical body mask) grown by ``margin`` voxels."""

    to: Literal["body"] = "body"
    margin: int = 2


@dataclass(frozen=True)
class PadStep:
    """``pad``: with ``value`` at the end of each axis up to a ``multiple`` of voxels and at least ``shape``."""

    multiple: int = 1
    shape: tuple[int, ...] = ()
    value: float = 0.0


PreprocessStep = HuStep | WindowStep | ResampleStep | NormalizeStep | CropStep | PadStep
PREPROCESS_STEPS: dict[str, type[Any]] = {"hu": HuStep, "window": WindowStep, "resample": ResampleStep,
                                          "normalize": NormalizeStep, "crop": CropStep, "pad": PadStep}


def _check_step(step: Any, where: str) -> None:
    """Start-up checks of one preprocessing step's values (types were checked by the loader)."""
    if isinstance(step, HuStep) and not step.max > step.min:
        raise ConfigError(f"{where}.hu: max must exceed min")
    if isinstance(step, WindowStep):
        if (step.preset is None) == (step.center is None or step.width is None):
            raise ConfigError(f"{where}.window: give center and width, or a preset")
        if step.width is not None and step.width <= 0:
            raise ConfigError(f"{where}.window.width: must be positive")
    if isinstance(step, ResampleStep) and (len(step.spacing) not in (1, 3) or min(step.spacing) <= 0):
        raise ConfigError(f"{where}.resample.spacing: one or three positive numbers (mm, z y x)")
    if isinstance(step, NormalizeStep) and None not in (step.low, step.high) and not step.high > step.low:  # type: ignore[operator]
        raise ConfigError(f"{where}.normalize: high must exceed low")
    if isinstance(step, CropStep) and step.margin < 0:
        raise ConfigError(f"{where}.crop.margin: must not be negative")
    if isinstance(step, PadStep) and (step.multiple < 1 or len(step.shape) not in (0, 3) or
                                      any(n < 1 for n in step.shape)):
        raise ConfigError(f"{where}.pad: multiple >= 1 and shape empty or three positive sizes")


@dataclass(frozen=True)
class LabelCode:
    """A SNOMED CT (or other scheme) code for a model's label name, adding to or overriding the package's
    table (dicomnode.imaging.codes). ``laterality``: left | right | null."""

    label: str
    code: str
    meaning: str
    scheme: str = "SCT"
    laterality: Literal["left", "right"] | None = None


class OutputKind(str, enum.Enum):
    """The kinds of derived object a ``segment`` pipeline makes, each its own series, in output order.

    ``outputs.kinds`` also accepts ``sc``, shorthand for the three picture kinds (:data:`OUTPUT_KIND_ALIASES`).
    """

    SEG = "seg"
    SR = "sr"
    RTSTRUCT = "rtstruct"
    SC_OVERLAY = "sc-overlay"
    SC_PLANES = "sc-planes"
    SC_SURFACE = "sc-surface"


OUTPUT_KIND_ALIASES: dict[str, tuple[OutputKind, ...]] = {
    "sc": (OutputKind.SC_OVERLAY, OutputKind.SC_PLANES, OutputKind.SC_SURFACE),
}


def output_kinds(names: Iterable[str | OutputKind]) -> tuple[OutputKind, ...]:
    """The output kinds named by ``names`` (values or the ``sc`` alias), once each, in output order.

    ValueError names the first unknown name; SR without SEG is refused (the SR references the SEG's segments).
    """
    wanted: set[OutputKind] = set()
    for name in names:
        if isinstance(name, OutputKind):
            wanted.add(name)
        elif name in OUTPUT_KIND_ALIASES:
            wanted.update(OUTPUT_KIND_ALIASES[name])
        else:
            try:
                wanted.add(OutputKind(name))
            except ValueError:
                allowed = ", ".join([k.value for k in OutputKind] + list(OUTPUT_KIND_ALIASES))
                raise ValueError(f"{name!r} is not one of {allowed}") from None
    if OutputKind.SR in wanted and OutputKind.SEG not in wanted:
        raise ValueError("'sr' references the SEG, so it needs 'seg' too")
    return tuple(k for k in OutputKind if k in wanted)


@dataclass(frozen=True)
class ModelConfig:
    """The segmenter of a ``segment`` pipeline.

    ``kind``: ``lung``/``body``/``brain`` (classical, no weights), ``lung-unet`` (the U-Net shipped with the
    package, or ``path``), ``unet`` (a state-dict checkpoint of the package's U-Net at ``path``),
    ``torchscript`` (a TorchScript archive at ``path`` with its preprocessing spec), ``nnunet`` (an nnU-Net v2
    model folder at ``path``: ``folds``, ``checkpoint``, ``configuration``, ``tile_step``, ``mirroring``),
    ``totalsegmentator`` (``task``, ``fast``, ``weights``), ``monai-bundle`` (a bundle folder at ``path``).
    ``preprocess`` (unet/torchscript kinds) replaces the chain embedded with the model. ``codes`` add to or
    override the label-name-to-SNOMED-CT table. Model folders, bundles and checkpoints can run code when
    loaded (pickles, bundle expressions): only configure paths you trust.
    """

    kind: SegmenterKind = SegmenterKind.LUNG
    path: Path | None = None
    batch_size: int = 2  # patches per forward pass; halved on CUDA out-of-memory
    overlap: float = 0.5  # sliding-window overlap, fraction of the patch
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    preprocess: tuple[PreprocessStep, ...] = ()
    folds: tuple[str, ...] = ()  # nnunet: fold numbers or "all"; empty = every fold with a checkpoint
    checkpoint: str = "checkpoint_final.pth"  # nnunet
    configuration: str | None = None  # nnunet: e.g. 3d_fullres; default: the checkpoint's
    tile_step: float = 0.5  # nnunet: sliding-window step, fraction of the patch
    mirroring: bool = True  # nnunet: test-time mirroring along the axes the model allows
    task: str = "total"  # totalsegmentator: the task name (total, lung_vessels, ...)
    fast: bool = False  # totalsegmentator: the task's 3 mm "fast" model
    weights: Path | None = None  # totalsegmentator: its weights folder; default as TotalSegmentator decides
    codes: tuple[LabelCode, ...] = ()


@dataclass(frozen=True)
class VolumeConfig:
    """How a series becomes a volume for this pipeline."""

    min_slices: int = 3
    irregular: Literal["resample", "reject"] = "resample"  # gantry tilt / unequal spacing


@dataclass(frozen=True)
class OutputsConfig:
    """Which derived objects a ``segment`` pipeline makes.

    Series numbers: base + 0 SEG, 1 SR, 2-4 SC (overlays, three planes, 3D surface), 5 RTSTRUCT."""

    kinds: tuple[OutputKind, ...] = output_kinds(("seg", "sr", "sc"))
    series_number_base: int = 9000
    series_description: str | None = None  # default: the pipeline name
    overlay_every: int = 4  # picture every n-th slice that contains the mask ...
    overlay_max: int = 24  # ... at most this many


@dataclass(frozen=True)
class PipelineConfig:
    """A named piece of work for a complete series.

    ``kind: forward`` sends the series unchanged; ``kind: segment`` builds a volume, runs ``model`` and sends
    the ``outputs`` (SEG, SR, Secondary Captures) to ``destinations``.
    """

    name: str
    kind: Literal["forward", "segment"] = "forward"
    destinations: tuple[str, ...] = ()
    dry_run: bool = False  # run, record what would be sent, send nothing
    model: ModelConfig = field(default_factory=ModelConfig)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    ray: RayPlacement = field(default_factory=RayPlacement)  # with worker.engine: ray


@dataclass(frozen=True)
class RuleMatch:
    """Conditions on a series, all of which must hold (an absent condition always holds).

    Strings compare case-insensitively; ``series_description`` is a regular expression searched in the
    description; ``image_type`` values must all be present in the series' ImageType.
    """

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    series_description: str | None = None
    sop_class_uid: tuple[str, ...] = ()
    image_type: tuple[str, ...] = ()
    calling_aet: tuple[str, ...] = ()
    min_instances: int | None = None
    max_instances: int | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    pipelines: tuple[str, ...]
    match: RuleMatch = field(default_factory=RuleMatch)
