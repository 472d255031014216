"""Train the shipped lung U-Net (right lung 1, left lung 2, airways 3) on CPU, seeded, in a few minutes.

Data and split (by series; no series is in two splits):

- train: P12 (real chest CT, soft kernel) + phantoms 0-15 (generated chest-like volumes, below);
- validation: phantoms 16-19;
- test: P01 (real chest CT, lung kernel; same patient and slice positions as P12, so it tests the kernel
  change and the whole inference path, not generalisation to new anatomy) + phantoms 20-23.
  P10/P11 hold P01's pixels and are not used.

Labels (right lung 1, left lung 2, airways 3) come from the classical ``dicomnode.imaging.masks.lung_mask`` (the
model imitates it). Input normalisation,
resampling and label mapping come from :mod:`dicomnode.inference.spec`, the same code inference runs, and the
spec is saved in the checkpoint. Usage: ``python scripts/train_lung_unet.py [--steps N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy import ndimage

from dicomnode.imaging.labels import AIRWAYS, LUNG_LEFT, LUNG_RIGHT, LabelVolume
from dicomnode.imaging.masks import lung_mask
from dicomnode.imaging.volume import Volume, load_series_dir
from dicomnode.inference.loaders import DEFAULT_LUNG_UNET, save_unet_checkpoint
from dicomnode.inference.runner import RunnerSettings
from dicomnode.inference.segmenter import UNetSegmenter
from dicomnode.inference.spec import Orientation, PreprocessSpec, prepare
from dicomnode.inference.unet import UNet3D, UNetConfig, count_parameters

log = logging.getLogger("train_lung_unet")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SPEC = PreprocessSpec(
    target_spacing_mm=(5.0, 4.0, 4.0),
    window_low=-1000.0,
    window_high=400.0,
    patch_size=(32, 96, 96),
    label_values=(LUNG_RIGHT.value, LUNG_LEFT.value, AIRWAYS.value),
    label_names=(LUNG_RIGHT.name, LUNG_LEFT.name, AIRWAYS.name),
)
ARCH = UNetConfig(in_channels=1, num_classes=4, channels=(8, 16, 32, 64))
TRAIN_PHANTOMS, VAL_PHANTOMS, TEST_PHANTOMS = range(0, 16), range(16, 20), range(20, 24)


@dataclass(frozen=True)
class Sample:
    """One series at the model's grid: image (Z, Y, X) in [0, 1] and class targets (Z, Y, X) int64."""

    name: str
    image: torch.Tensor
    target: torch.Tensor


def series(prefix: str) -> Path:
    return next(DATA.glob(f"{prefix}_*"))


def classical_labels(volume: Volume) -> LabelVolume:
    """The teacher: the classical ``dicomnode.imaging.masks.lung_mask`` (1 right lung, 2 left lung, 3 airways)."""
    return lung_mask(volume)


def chest_phantom(seed: int) -> Volume:
    """A chest-like CT Volume (HU, (z, y, x), LPS affine, axial HFS): body ellipse with a fat rim, two lungs
    (air with noise and vessels; the left one notched by the heart), trachea and main bronchi, spine, table.
    Size, position, spacing and noise vary with ``seed``."""
    rng = np.random.default_rng(10_000 + seed)
    nz, n = int(rng.integers(44, 64)), 200
    sz, sxy = 5.0, float(rng.uniform(1.9, 2.3))
    z, y, x = np.meshgrid(np.arange(nz) * sz, (np.arange(n) - n / 2) * sxy, (np.arange(n) - n / 2) * sxy, indexing="ij")
    x = x - rng.uniform(-15, 15)
    y = y - rng.uniform(-15, 15)
    a, b = rng.uniform(140, 180), rng.uniform(95, 125)
    hu = np.full(z.shape, -1000.0)
    body = (x / a) ** 2 + (y / b) ** 2 <= 1
    hu[body] = -100.0
    hu[(x / (a - 12)) ** 2 + (y / (b - 12)) ** 2 <= 1] = 40.0
    hu[(y > b + 8) & (y < b + 20) & (np.abs(x) < 200)] = 150.0  # table
    z_base, z_apex = rng.uniform(0.15, 0.3) * nz * sz, rng.uniform(0.75, 0.95) * nz * sz
    lungs = np.zeros(z.shape, dtype=np.uint8)
    for side, value in ((-1, LUNG_RIGHT.value), (1, LUNG_LEFT.value)):
        cx, rx, ry = (
            side * a * rng.uniform(0.44, 0.5),
            a * rng.uniform(0.36, 0.42),
            b * rng.uniform(0.68, 0.8),
        )
        t = np.clip((z - z_base) / (z_apex - z_base), 0, 1)
        taper = np.sqrt(np.clip(1 - t**2, 0, 1)) * (z >= z_base) * (z <= z_apex)
        inside = ((x - cx) / (rx * taper + 1e-6)) ** 2 + ((y + 0.05 * b) / (ry * taper + 1e-6)) ** 2 <= 1
        lungs[inside] = value
    heart = ((x - 0.2 * a) / (0.32 * a)) ** 2 + ((y + 0.2 * b) / (0.4 * b)) ** 2 + ((z - z_base - 40) / 70) ** 2 <= 1
    lungs[heart] = 0
    hu[lungs > 0] = rng.uniform(-880, -800)
    hu[heart] = 45.0
    _vessels(hu, lungs, rng)
    _airways(hu, x, y, z, b, z_apex, nz * sz)
    hu[(x / 16) ** 2 + ((y - 0.72 * b) / 16) ** 2 <= 1] = 700.0  # spine
    hu += rng.normal(0.0, rng.uniform(8, 30), hu.shape)
    affine = np.array([[0, 0, sxy, -n / 2 * sxy], [0, sxy, 0, -n / 2 * sxy], [sz, 0, 0, -300.0], [0, 0, 0, 1]])
    return Volume(
        data=hu.astype(np.float32),
        affine=affine,
        modality="CT",
        units="HU",
        study_instance_uid="2.25.1",
        series_instance_uid=f"2.25.{seed + 2}",
        frame_of_reference_uid="2.25.3",
        slices=(),
        sources=(),
        headers=(),
    )


def _vessels(hu: npt.NDArray[np.float64], lungs: npt.NDArray[np.uint8], rng: np.random.Generator) -> None:
    """Bright branching tubes (about 2-5 mm) inside each lung, from its medial side outwards."""
    marks = np.zeros(lungs.shape, dtype=bool)
    for value in (LUNG_RIGHT.value, LUNG_LEFT.value):
        points = np.argwhere(lungs == value)
        if len(points) == 0:
            continue
        hilum = points.mean(axis=0)
        for end in points[rng.integers(0, len(points), 25)]:
            line = hilum[None] + np.linspace(0, 1, 60)[:, None] * (end - hilum)[None]
            idx = np.round(line).astype(int)
            marks[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    marks = ndimage.binary_dilation(marks, iterations=1) & (lungs > 0)
    hu[marks] = rng.uniform(0, 60)


def _airways(
    hu: npt.NDArray[np.float64],
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    z: npt.NDArray[np.float64],
    b: float,
    z_apex: float,
    z_top: float,
) -> None:
    """Trachea (air tube, radius 8 mm) from the top down to the carina, then two short main bronchi."""
    carina = z_apex - 90
    ty = y + 0.25 * b
    trachea = (x**2 + ty**2 <= 64) & (z >= carina)
    for side in (-1, 1):
        along = np.clip((carina - z) / 40, 0, 1)
        bronchus = ((x - side * 45 * along) ** 2 + ty**2 <= 36) & (z <= carina) & (z >= carina - 40)
        trachea |= bronchus
    hu[trachea & (z <= z_top)] = -1000.0


def to_classes(labels: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """Label values -> class indices of the spec (0 background, i for label_values[i - 1]); others -> 0."""
    out = np.zeros(labels.shape, dtype=np.int64)
    for index, value in enumerate(SPEC.label_values, start=1):
        out[labels == value] = index
    return out


def make_sample(name: str, volume: Volume) -> Sample:
    """Image through the inference preprocessing; targets resampled the same way (one-hot, arg-max)."""
    labels = Orientation.of(volume.affine).apply(classical_labels(volume).data)  # as prepare() orients
    classes = torch.from_numpy(to_classes(np.ascontiguousarray(labels)))
    image = prepare(volume, SPEC)
    onehot = F.one_hot(classes, SPEC.num_classes).permute(3, 0, 1, 2).float()[None]
    resized = F.interpolate(onehot, size=tuple(image.shape), mode="trilinear", align_corners=False)
    return Sample(name, image, resized[0].argmax(0))


def load_samples(indices: range, with_real: str | None) -> list[Sample]:
    samples = [make_sample(f"phantom{i}", chest_phantom(seed=i)) for i in indices]
    if with_real is not None:
        samples.insert(0, make_sample(with_real, load_series_dir(series(with_real))))
    return samples


def random_batch(samples: list[Sample], rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of the patch size (padded with air where a series is smaller) with intensity jitter."""
    images, targets = [], []
    for _ in range(size):
        sample = samples[int(rng.integers(len(samples)))]
        image, target = _pad_to_patch(sample.image, sample.target)
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape, SPEC.patch_size, strict=True)]
        window = tuple(slice(s, s + p) for s, p in zip(starts, SPEC.patch_size, strict=True))
        crop = image[window].clone()
        crop = crop * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.05, 0.05))
        crop = crop + float(rng.uniform(0.0, 0.03)) * torch.from_numpy(
            rng.standard_normal(crop.shape).astype(np.float32)
        )
        images.append(crop.clamp(0.0, 1.0))
        targets.append(target[window])
    return torch.stack(images)[:, None], torch.stack(targets)


def _pad_to_patch(image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pads = [max(0, p - int(s)) for p, s in zip(SPEC.patch_size, image.shape, strict=True)]
    if not any(pads):
        return image, target
    spec = (0, pads[2], 0, pads[1], 0, pads[0])
    return F.pad(image, spec, value=SPEC.pad_value), F.pad(target, spec, value=0)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (weighted per class) + soft Dice over the foreground classes."""
    ce = F.cross_entropy(logits, target, weight=class_weights)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, SPEC.num_classes).permute(0, 4, 1, 2, 3).float()[:, 1:]
    inter = (probs * onehot).sum(dim=(0, 2, 3, 4))
    denom = probs.sum(dim=(0, 2, 3, 4)) + onehot.sum(dim=(0, 2, 3, 4))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1.0 - dice.mean())


def train(samples: list[Sample], steps: int, seed: int, batch: int, airway_weight: float) -> UNet3D:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = UNet3D(ARCH)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    weights = torch.tensor([1.0, 1.0, 1.0, airway_weight])
    model.train()
    started = time.monotonic()
    for step in range(steps):
        images, targets = random_batch(samples, rng, batch)
        loss = loss_fn(model(images), targets, weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f (%.0f s)", step, steps, float(loss), time.monotonic() - started)
    return model.eval()


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def evaluate(segmenter: UNetSegmenter, names: list[tuple[str, Volume]]) -> dict[str, float]:
    """Per-lung Dice vs the classical mask on each volume's native grid, through the real inference path."""
    out: dict[str, float] = {}
    for name, volume in names:
        started = time.monotonic()
        predicted = segmenter.segment(volume)
        seconds = time.monotonic() - started
        reference = classical_labels(volume)
        for info in (LUNG_RIGHT, LUNG_LEFT, AIRWAYS):
            out[f"{name}_dice_{info.name.lower().replace(' ', '_')}"] = dice(
                predicted.mask(info.value), reference.mask(info.value)
            )
        out[f"{name}_seconds"] = seconds
        log.info("%s: %s", name, {k: round(v, 4) for k, v in out.items() if k.startswith(name)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=420)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20240917)
    parser.add_argument("--out", type=Path, default=DEFAULT_LUNG_UNET)
    parser.add_argument("--airway-weight", type=float, default=1.0, help="cross-entropy weight of airways")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    started = time.monotonic()
    train_samples = load_samples(TRAIN_PHANTOMS, with_real="P12")
    log.info("training data ready: %d series (%.0f s)", len(train_samples), time.monotonic() - started)
    model = train(train_samples, args.steps, args.seed, args.batch, args.airway_weight)
    train_seconds = time.monotonic() - started
    version = f"1.0.0+seed{args.seed}.steps{args.steps}"
    if args.airway_weight != 1.0:
        version += f".aw{args.airway_weight:g}"
    save_unet_checkpoint(args.out, model, SPEC, name="dicomnode-lung-unet", version=version)
    segmenter = UNetSegmenter(args.out, RunnerSettings(device="cpu"))
    val = evaluate(segmenter, [(f"val_phantom{i}", chest_phantom(seed=i)) for i in VAL_PHANTOMS])
    test_volumes = [("test_P01", load_series_dir(series("P01")))]
    test_volumes += [(f"test_phantom{i}", chest_phantom(seed=i)) for i in TEST_PHANTOMS]
    metrics = {**val, **evaluate(segmenter, test_volumes), "train_seconds": train_seconds}
    metrics["parameters"] = float(count_parameters(model))
    save_unet_checkpoint(args.out, model, SPEC, name="dicomnode-lung-unet", version=version, metrics=metrics)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1))


if __name__ == "__main__":
    main()
