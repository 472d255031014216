"""Loading (and saving) models with their preprocessing spec; everything loads onto the CPU first.

Two formats:

- **U-Net checkpoint** (``.pt``, written by :func:`save_unet_checkpoint`): a plain ``torch.save`` dict
  ``{"format", "name", "version", "arch" (UNetConfig dict), "spec" (PreprocessSpec JSON), "state_dict",
  "metrics"}``, read with ``torch.load(map_location="cpu", weights_only=True)`` (no pickled code runs).
- **TorchScript** (any architecture): the spec travels inside the archive as the extra file
  ``preprocess.json`` (``torch.jit.save(..., _extra_files=...)``, see :func:`save_torchscript`), or in a
  sidecar ``<model>.json`` next to it; name and version likewise as ``model.json`` / from the file name.

Moving the model to its device happens once, in :class:`~dicomnode.inference.runner.ModelRunner`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dicomnode.errors import PipelineError
from dicomnode.inference.spec import PreprocessSpec
from dicomnode.inference.unet import UNet3D, UNetConfig

CHECKPOINT_FORMAT = "dicomnode-unet/1"
SPEC_FILE = "preprocess.json"
META_FILE = "model.json"
DEFAULT_LUNG_UNET = Path(__file__).resolve().parent / "models" / "lung_unet.pt"


class ModelLoadError(PipelineError):
    """A model file is missing, unreadable, or lacks its preprocessing spec. Final."""


@dataclass(frozen=True)
class LoadedModel:
    """A model on the CPU, in eval mode, with what is needed to run it and to stamp its outputs."""

    module: nn.Module
    spec: PreprocessSpec
    name: str
    version: str
    metrics: dict[str, float]
    path: Path | None = None  # where it was loaded from


def save_unet_checkpoint(
    path: Path,
    model: UNet3D,
    spec: PreprocessSpec,
    *,
    name: str,
    version: str,
    metrics: dict[str, float] | None = None,
) -> None:
    """Write weights (moved to the CPU), architecture, spec, name/version and metrics to ``path``."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "name": name,
        "version": version,
        "arch": model.config.to_dict(),
        "spec": spec.to_json(),
        "state_dict": state,
        "metrics": dict(metrics or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def load_unet(path: Path | None = None) -> LoadedModel:
    """Load a :func:`save_unet_checkpoint` file (default: the shipped lung U-Net) onto the CPU, eval mode."""
    path = Path(path) if path is not None else DEFAULT_LUNG_UNET
    if not path.is_file():
        raise ModelLoadError(f"model file {path} not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise ModelLoadError(f"cannot read model {path}: {error}") from error
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise ModelLoadError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    spec = PreprocessSpec.from_json(str(raw["spec"]))
    config = UNetConfig.from_dict(raw["arch"])
    if config.num_classes != spec.num_classes:
        raise ModelLoadError(f"{path}: {config.num_classes} classes in the network, {spec.num_classes} in the spec")
    if any(p % (2**config.depth) for p in spec.patch_size):
        raise ModelLoadError(f"{path}: patch {spec.patch_size} not divisible by 2**{config.depth}")
    model = UNet3D(config)
    model.load_state_dict(raw["state_dict"])
    metrics = {str(k): float(v) for k, v in dict(raw.get("metrics", {})).items()}
    return LoadedModel(model.eval(), spec, str(raw["name"]), str(raw["version"]), metrics, path)


def save_torchscript(
    path: Path, module: torch.jit.ScriptModule, spec: PreprocessSpec, *, name: str, version: str
) -> None:
    """Save a scripted/traced module with its spec and name/version embedded as extra files."""
    meta = json.dumps({"name": name, "version": version})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(module, str(path), _extra_files={SPEC_FILE: spec.to_json(), META_FILE: meta})


def load_torchscript(path: Path) -> LoadedModel:
    """Load a TorchScript archive onto the CPU with its spec (embedded, else the sidecar ``<path>.json``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} not found")
    extra = {SPEC_FILE: "", META_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)  # type: ignore[no-untyped-call]
    except Exception as error:
        raise ModelLoadError(f"cannot read TorchScript model {path}: {error}") from error
    spec_text = _text(extra[SPEC_FILE])
    sidecar = path.with_suffix(".json")
    if not spec_text and sidecar.is_file():
        spec_text = sidecar.read_text(encoding="utf-8")
    if not spec_text:
        raise ModelLoadError(f"{path} has no {SPEC_FILE} inside and no sidecar {sidecar.name}")
    meta_text = _text(extra[META_FILE])
    meta: dict[str, Any] = json.loads(meta_text) if meta_text else {}
    name = str(meta.get("name", path.stem))
    version = str(meta.get("version", "unversioned"))
    return LoadedModel(module.eval(), PreprocessSpec.from_json(spec_text), name, version, {}, path)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
