"""MONAI bundles behind the node: the bundle's own preprocessing, inferer and postprocessing, in memory.

A bundle folder holds ``configs/inference.json`` (parsed by MONAI's ``ConfigParser``), ``configs/metadata.json``
and ``models/model.pt`` (a state dict for the bundle's ``network_def``) or ``models/model.ts`` (TorchScript).
The adapter builds the bundle's ``preprocessing``, ``inferer`` and ``postprocessing`` components once and keeps
the network resident on the device. Per series:

1. ``LoadImaged`` of the bundle's preprocessing is kept, but reads the series' NIfTI from memory: the very
   ``nibabel`` image ``dicomnode convert`` would write (:func:`dicomnode.imaging.nifti.nifti_image`, through
   its serialised bytes so header and affine carry the file's float32 precision), given to MONAI's
   ``NibabelReader``. The MetaTensor therefore holds the array in NIfTI storage order with its RAS affine, as
   when the bundle loads a file; every later transform (orientation, spacing, intensity) is the bundle's.
2. The network runs through the bundle's inferer (e.g. ``SlidingWindowInferer``), in eval mode, without
   gradients, as the bundle's evaluator would.
3. The bundle's postprocessing runs on ``{"image", "pred"}`` except its savers (``SaveImaged``); the resulting
   ``pred`` (1, i, j, k) on the source grid (the bundle's ``Invertd`` undoes its spatial transforms) is mapped
   back onto the Volume's (z, y, x).

Label names come from ``metadata.json`` (``network_data_format.outputs.pred.channel_def``), the version from
its ``version``. Bundle configs are Python: ``$`` expressions and ``_target_`` components execute code when
parsed. Only load bundles from paths the operator configured and trusts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from dicomnode.config import ModelConfig, SegmenterKind
from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.nifti import nifti_image
from dicomnode.imaging.volume import Volume
from dicomnode.inference.frameworks import ModelInfo, from_nifti_view, label_infos, quiet_stdout, weights_hash
from dicomnode.inference.loaders import ModelLoadError

log = logging.getLogger(__name__)
MEMORY_NAME = "dicomnode-series.nii.gz"  # the file name MONAI records in the metadata of the in-memory image


def channel_labels(metadata: dict[str, Any], where: Path) -> dict[int, str]:
    """Foreground channel -> name from ``network_data_format.outputs.pred.channel_def`` (0 is background)."""
    outputs = dict(metadata.get("network_data_format", {}).get("outputs", {}))
    pred = outputs.get("pred") or (next(iter(outputs.values())) if len(outputs) == 1 else {})
    channels = dict(pred.get("channel_def", {})) if isinstance(pred, dict) else {}
    labels = {int(k): str(v) for k, v in channels.items() if str(k).isdigit() and int(k) != 0}
    if not labels:
        raise ModelLoadError(f"{where}: metadata.json names no output channels (network_data_format.outputs."
                             "pred.channel_def)")
    return labels


class _MemoryLoad:
    """Stands in for the bundle's ``LoadImaged``: calls it with a reader that returns the current image."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.image: Any = None

    def __call__(self, data: Any) -> Any:
        from monai.data import NibabelReader
        from monai.data.utils import correct_nifti_header_if_necessary

        image = self.image

        class Reader(NibabelReader):  # type: ignore[misc]
            def verify_suffix(self, filename: Any) -> bool:
                return True

            def read(self, data: Any, **kwargs: Any) -> Any:
                self.filenames = (MEMORY_NAME,)
                return correct_nifti_header_if_necessary(image)

        return self.original(data, reader=Reader())


class MonaiBundleSegmenter:
    """A MONAI bundle resident in this process (see the module docstring)."""

    def __init__(self, model: ModelConfig, device: torch.device) -> None:
        from monai.bundle import ConfigParser
        from monai.transforms import LoadImaged, SaveImage, SaveImaged

        if model.path is None:
            raise ModelLoadError("model kind 'monai-bundle' needs model.path")
        root = Path(model.path)
        configs = root / "configs"
        for needed in ("inference.json", "metadata.json"):
            if not (configs / needed).is_file():
                raise ModelLoadError(f"{root}: not a MONAI bundle (no configs/{needed})")
        metadata = json.loads((configs / "metadata.json").read_text(encoding="utf-8"))
        self._labels = label_infos(channel_labels(metadata, root), model.codes)
        parser = ConfigParser()
        parser.read_config(str(configs / "inference.json"))
        parser.read_meta(str(configs / "metadata.json"))
        parser["bundle_root"] = str(root)
        parser["device"] = f"$torch.device('{device}')"
        try:
            with quiet_stdout("monai bundle"):
                self.preprocessing = parser.get_parsed_content("preprocessing")
                self.inferer = parser.get_parsed_content("inferer")
                self.postprocessing = parser.get_parsed_content("postprocessing")
                self.network, weights = self._network(parser, root, device)
        except ModelLoadError:
            raise
        except Exception as error:  # bundle configs can fail in any way
            raise ModelLoadError(f"{root}: MONAI cannot build the bundle: {error}") from error
        loaders = [i for i, t in enumerate(self.preprocessing.transforms) if isinstance(t, LoadImaged)]
        if len(loaders) != 1:
            raise ModelLoadError(f"{root}: the bundle's preprocessing needs exactly one LoadImaged at its top level")
        self._load = _MemoryLoad(self.preprocessing.transforms[loaders[0]])
        self.preprocessing.transforms = tuple(self._load if i == loaders[0] else t
                                              for i, t in enumerate(self.preprocessing.transforms))
        self.postprocessing.transforms = tuple(t for t in self.postprocessing.transforms
                                               if not isinstance(t, (SaveImaged, SaveImage)))
        self.device = device
        self.name = str(metadata.get("name") or root.name)[:64]
        self.version = str(metadata.get("version") or weights_hash([weights]))
        self.info = ModelInfo(self.name, self.version, SegmenterKind.MONAI_BUNDLE.value, str(root),
                              {i.value: i.name for i in self._labels}, str(device))
        log.info("MONAI bundle %s %s resident on %s", self.name, self.version, device)

    @staticmethod
    def _network(parser: Any, root: Path, device: torch.device) -> tuple[torch.nn.Module, Path]:
        """The bundle's network on ``device`` in eval mode: ``models/model.ts`` (TorchScript) or
        ``network_def`` with the state dict of ``models/model.pt`` (weights only, loaded on the CPU first)."""
        script, state = root / "models" / "model.ts", root / "models" / "model.pt"
        if script.is_file():
            network: torch.nn.Module = torch.jit.load(str(script), map_location="cpu")  # type: ignore[no-untyped-call]
            return network.to(device).eval(), script
        if not state.is_file():
            raise ModelLoadError(f"{root}: no models/model.pt or models/model.ts")
        network = parser.get_parsed_content("network_def")
        weights = torch.load(state, map_location="cpu", weights_only=True)
        if isinstance(weights, dict) and isinstance(weights.get("model"), dict):
            weights = weights["model"]  # CheckpointLoader's {"model": state_dict} form
        network.load_state_dict(weights)
        return network.to(device).eval(), state

    @torch.inference_mode()
    def segment(self, volume: Volume) -> LabelVolume:
        """Labels (z, y, x) uint8 on the volume's grid: channel index of the bundle's output."""
        image: Any = nib.Nifti1Image.from_bytes(nifti_image(volume).to_bytes())
        self._load.image = image
        with quiet_stdout("monai bundle"):
            data = self.preprocessing({"image": MEMORY_NAME})
            batch = data["image"][None].to(self.device)
            pred = self.inferer(batch, self.network)[0]
            out = self.postprocessing({"image": data["image"], "pred": pred})
        labels = np.asarray(out["pred"].detach().cpu().numpy())
        if labels.ndim == 4:
            labels = labels[0]
        data_zyx = from_nifti_view(np.rint(labels).astype(np.uint8), volume.shape)
        return LabelVolume(data=data_zyx, labels=self._labels, algorithm_name=self.name,
                           algorithm_version=self.version)
