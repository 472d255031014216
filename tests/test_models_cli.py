"""``dicomnode models [check] [--json]`` and the start-up check of ``serve``, on a configuration with one pipeline of
each kind of model source: classical, the shipped U-Net, a tiny nnU-Net folder, a tiny MONAI bundle, and
TotalSegmentator with an empty weights folder (which must stop ``serve`` and say where the weights go)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.tiny_models import NnUNetArch, monai_bundle, nnunet_model_folder


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models-cli")
    nnunet = nnunet_model_folder(root / "nnunet", {"liver": 1, "tumour": 2}, arch=NnUNetArch(patch=(16, 32, 32)))
    bundle = monai_bundle(root / "bundle", {1: "spleen"})
    (root / "empty-weights").mkdir()

    def pipe(name: str, model: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "kind": "segment", "model": model}

    raw = {"storage": {"path": str(root / "data")}, "worker": {"device": "cpu"},
           "pipelines": [pipe("lungs", {"kind": "lung"}), pipe("unet", {"kind": "lung-unet"}),
                         pipe("nn", {"kind": "nnunet", "path": str(nnunet)}),
                         pipe("bundle", {"kind": "monai-bundle", "path": str(bundle)}),
                         pipe("total", {"kind": "totalsegmentator", "task": "total", "fast": True,
                                        "weights": str(root / "empty-weights")})]}
    path = root / "dicomnode.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.slow
def test_models_lists_every_pipeline_and_what_is_missing(config: Path) -> None:
    out = _run("models", "-c", str(config), "--json")
    assert out.returncode == 1, out.stderr
    rows = {r["pipeline"]: r for r in json.loads(out.stdout)["models"]}
    assert [rows[n]["ready"] for n in ("lungs", "unet", "nn", "bundle", "total")] == [True, True, True, True, False]
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in rows["total"]["problem"]
    table = _run("models", "-c", str(config))
    assert "totalsegmentator" in table.stdout and "no: pipeline" not in table.stdout


@pytest.mark.slow
def test_models_check_loads_each_model_and_reports_it(config: Path) -> None:
    out = _run("models", "check", "-c", str(config), "--json")
    assert out.returncode == 1, out.stderr  # the TotalSegmentator pipeline does not load
    doc = json.loads(out.stdout)  # nothing but JSON on stdout, whatever the frameworks print
    rows = {r["pipeline"]: r for r in doc["models"]}
    assert doc["ok"] is False and not rows["total"]["loads"] and "never downloads" in rows["total"]["error"]
    nn = rows["nn"]
    assert nn["loads"] and nn["kind"] == "nnunet" and nn["version"] == "1.0-test" and nn["device"] == "cpu"
    assert nn["labels"] == {"1": "liver", "2": "tumour"}
    assert rows["bundle"]["labels"] == {"1": "spleen"} and rows["bundle"]["version"] == "0.1.0"
    assert rows["unet"]["labels"] == {"1": "Right lung", "2": "Left lung", "3": "Airways"}
    assert rows["lungs"]["model"] == "dicomnode-classical-lung" and rows["lungs"]["loads"]


@pytest.mark.slow
def test_serve_refuses_to_start_when_a_model_cannot_load(config: Path) -> None:
    out = _run("serve", "-c", str(config))
    assert out.returncode == 1
    assert "pipeline 'total' cannot start" in out.stderr and "weights not found in" in out.stderr
    assert "totalseg_download_weights -t total" in out.stderr


def test_example_config_documents_every_model_key() -> None:
    import dataclasses

    from dicomnode.config import PREPROCESS_STEPS, LabelCode, ModelConfig

    text = (Path(__file__).resolve().parents[1] / "config" / "dicomnode.example.yaml").read_text()
    keys = {f.name for f in dataclasses.fields(ModelConfig)} | {f.name for f in dataclasses.fields(LabelCode)}
    for step in PREPROCESS_STEPS.values():
        keys |= {f.name for f in dataclasses.fields(step)}
    missing = sorted(k for k in keys if f"{k}:" not in text)
    assert not missing and all(f"{{{name}:" in text for name in PREPROCESS_STEPS), missing


@pytest.mark.slow
def test_process_runs_an_nnunet_pipeline_to_seg_sr_and_pictures(config: Path, tmp_path: Path) -> None:
    from tests.conftest import series_dir

    out = _run("process", str(series_dir("P03")), "--pipeline", "nn", "--out", str(tmp_path), "-c", str(config))
    assert out.returncode == 0, out.stderr[-3000:]
    kinds = sorted({p.name.split("_")[0] for p in tmp_path.iterdir()})
    assert kinds == ["OT", "SEG", "SR"], kinds
    sr = subprocess.run(["dciodvfy", str(next(tmp_path.glob("SR_*.dcm")))], capture_output=True, text=True,
                        timeout=120, check=False)
    assert [line for line in (sr.stdout + sr.stderr).splitlines() if line.startswith("Error")] == []
