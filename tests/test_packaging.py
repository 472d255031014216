"""The Docker image and the compose file stay in step with what the tests run (no Docker engine here, so they
are read, not built): the image's PyTorch is the version scripts/test.sh installs, its health check follows the
configuration, the compose file publishes only on loopback and its node configuration is valid."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from dicomnode.config import parse_config

REPO = Path(__file__).resolve().parents[1]


def _pinned_torch(text: str) -> set[str]:
    return set(re.findall(r"torch==([0-9.]+)", text)) | set(re.findall(r"TORCH_VERSION=([0-9.]+)", text))


def test_image_runs_the_torch_the_tests_run() -> None:
    tests = _pinned_torch((REPO / "scripts" / "test.sh").read_text())
    image = _pinned_torch((REPO / "Dockerfile").read_text())
    assert len(tests) == 1 and image == tests, (tests, image)


def test_image_health_check_follows_the_configuration() -> None:
    text = (REPO / "Dockerfile").read_text()
    (check,) = re.findall(r"^HEALTHCHECK .*CMD (.*)$", text, re.MULTILINE)
    assert '"dicomnode", "health"' in check and "9110" not in check and "curl" not in check


def test_compose_publishes_on_loopback_only_and_its_config_is_valid() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    content = compose["configs"]["dicomnode-config"]["content"]
    content = re.sub(r"\$\{DICOMNODE_UI_TOKEN:\?[^}]*\}", "a-token-of-32-characters-0123456", content)
    cfg = parse_config(yaml.safe_load(content))
    assert cfg.ui.host == "0.0.0.0" and cfg.ui.token is not None
    assert compose["services"]["dicomnode"]["environment"]["DICOMNODE_CONFIG"] == "/etc/dicomnode/dicomnode.yaml"
    orthanc = compose["services"]["orthanc"]["environment"]
    assert orthanc["ORTHANC__AUTHENTICATION_ENABLED"] == "true" or all(
        str(p).startswith("127.0.0.1:") for p in compose["services"]["orthanc"]["ports"])
