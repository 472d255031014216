"""Configuration: one YAML file, validated at start-up, unknown keys named."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import Engine, LateInstancePolicy, RayPlacement, load_config, parse_config
from dicomnode.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid() -> None:
    cfg = parse_config(None)
    assert cfg.node.ae_title == "DICOMNODE" and cfg.node.port == 11112
    assert cfg.completion.on_late_instance is LateInstancePolicy.REPROCESS


def test_example_config_loads_and_documents_every_key() -> None:
    example = REPO / "config" / "dicomnode.example.yaml"
    cfg = load_config(example)
    assert {p.name for p in cfg.pipelines} >= {"lung-ct", "lung-ct-unet"}
    text = example.read_text()
    for key in ("ae_title", "allowed_calling_aets", "quiet_seconds", "on_late_instance", "min_free_mb",
                "lease_seconds", "max_attempts", "destinations", "pipelines", "rules", "unmatched",
                "url", "auth", "password_env", "token_env", "verify_tls", "ca_file", "timeout_seconds", "path",
                "engine", "replicas", "num_gpus", "num_cpus", "resources", "replica_wait_seconds",
                "call_timeout_seconds", "max_restarts", "connect_timeout_seconds", "namespace"):
        assert f"{key}:" in text


@pytest.mark.parametrize(("raw", "message"), [
    ({"node": {"ae_tilte": "X"}}, "unknown configuration key node.ae_tilte"),
    ({"bogus": 1}, "unknown configuration key bogus"),
    ({"node": {"ae_title": "THIS-IS-WAY-TOO-LONG"}}, "not a valid AE title"),
    ({"node": {"ae_title": "BACK\\SLASH"}}, "not a valid AE title"),
    # A final newline must not slip through a regular expression's "$" (matched whole, as UIDs are).
    ({"node": {"ae_title": "NODE\n"}}, "node.ae_title: 'NODE\\n' is not a valid AE title"),
    ({"node": {"allowed_calling_aets": ["CT1\n"]}}, "node.allowed_calling_aets[0]: 'CT1\\n' is not a valid"),
    ({"destinations": [{"name": "a", "ae_title": "PACS\n", "host": "h", "port": 104}]},
     "destinations[0].ae_title: 'PACS\\n' is not a valid AE title"),
    ({"node": {"port": 70000}}, "port 70000 is outside 1-65535"),
    ({"node": {"port": "eleven"}}, "expected an integer"),
    ({"completion": {"on_late_instance": "maybe"}}, "is not one of 'reprocess', 'ignore'"),
    ({"destinations": [{"name": "a", "ae_title": "A", "host": "h"}]}, "destinations[0].port: required key"),
    ({"destinations": [{"name": "a", "kind": "ftp"}]}, "'ftp' is not one of 'dicom', 'dicomweb', 'folder'"),
    ({"destinations": [{"name": "a", "kind": "folder"}]}, "destinations[0].path: required key"),
    ({"destinations": [{"name": "a", "kind": "folder", "path": "/x", "port": 104}]},
     "destinations[0].port: not used by a 'folder' destination"),
    ({"destinations": [{"name": "a", "kind": "dicomweb", "url": "pacs.example.org/dicom-web"}]},
     "destinations[0].url: expected http(s)://host[:port][/prefix]"),
    ({"destinations": [{"name": "a", "kind": "dicomweb", "url": "https://pacs", "auth": {"kind": "basic",
                                                                                       "password_env": "P"}}]},
     "destinations[0].auth.username: required for basic auth"),
    ({"destinations": [{"name": "a", "kind": "dicomweb", "url": "https://pacs",
                        "auth": {"kind": "bearer", "token": "t", "token_env": "T"}}]},
     "auth kind 'bearer' needs exactly one of token or token_env"),
    ({"destinations": [{"name": "a", "kind": "dicomweb", "url": "https://pacs",
                        "auth": {"kind": "bearer", "username": "u", "token_env": "T"}}]},
     "destinations[0].auth.username: not used by auth kind 'bearer'"),
    ({"pipelines": [{"name": "p", "destinations": ["nowhere"]}]}, "unknown destination 'nowhere'"),
    ({"rules": [{"name": "r", "pipelines": ["nope"]}]}, "unknown pipeline 'nope'"),
    ({"pipelines": [{"name": "p"}], "rules": [{"name": "r", "pipelines": ["p"],
                                              "match": {"series_description": "("}}]}, "bad regular expression"),
    ({"pipelines": [{"name": "p", "kind": "segment", "model": {"kind": "unet"}}]}, "model.path: required"),
    ({"pipelines": [{"name": "p", "kind": "segment", "outputs": {"kinds": ["sr"]}}]}, "needs 'seg' too"),
    ({"worker": {"engine": "dask"}}, "worker.engine: 'dask' is not one of 'local', 'ray'"),
    ({"ray": {"address": "http://head:8265"}}, "ray.address: 'http://head:8265' is not auto, local, host:port"),
    ({"ray": {"address": "auto\n"}}, "ray.address: 'auto\\n' is not auto, local, host:port"),
    ({"ray": {"replicas": 0}}, "ray.replicas: must be at least 1"),
    ({"ray": {"resources": ["gpu_slot"]}}, "ray.resources: expected a mapping, got list"),
    ({"ray": {"resources": {"gpu_slot": "one"}}}, "ray.resources.gpu_slot: expected a number"),
    ({"pipelines": [{"name": "p", "ray": {"num_gpus": -1}}]}, "pipelines[0].ray.num_gpus: must not be negative"),
    ({"pipelines": [{"name": "p", "ray": {"resources": {"gpu_slot": 0}}}]},
     "pipelines[0].ray.resources.gpu_slot: must be a named, positive amount"),
    ({"ray": {"call_timeout_seconds": 0}}, "ray.call_timeout_seconds: must be positive"),
])
def test_invalid_configs_are_rejected_with_the_key_named(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(raw)
    assert message in str(info.value)


def test_the_ray_engine_is_off_by_default_and_pipelines_override_the_ray_section() -> None:
    assert parse_config(None).worker.engine is Engine.LOCAL
    cfg = parse_config({"worker": {"engine": "ray"},
                        "ray": {"address": "ray://head.example:10001", "replicas": 2, "num_gpus": 1,
                                "resources": {"gpu_slot": 1}},
                        "pipelines": [{"name": "a", "kind": "segment"},
                                      {"name": "b", "kind": "segment",
                                       "ray": {"replicas": 4, "num_gpus": 0.5, "resources": {"a100": 1}}}]})
    assert cfg.worker.engine is Engine.RAY
    a, b = (cfg.ray.placement(p.ray) for p in cfg.pipelines)
    assert a == RayPlacement(replicas=2, num_gpus=1.0, num_cpus=1.0, resources={"gpu_slot": 1.0})
    assert b == RayPlacement(replicas=4, num_gpus=0.5, num_cpus=1.0, resources={"gpu_slot": 1.0, "a100": 1.0})


def test_relative_storage_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "node.yaml"
    cfg_file.write_text("storage:\n  path: data\n")
    assert load_config(cfg_file).storage.path == (tmp_path / "data").resolve()


def test_bad_yaml_is_a_config_error(tmp_path: Path) -> None:
    cfg_file = tmp_path / "node.yaml"
    cfg_file.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(cfg_file)


def test_destination_secrets_stay_out_of_reprs_and_folder_paths_follow_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("destinations:\n"
                      "  - {name: web, kind: dicomweb, url: 'https://pacs/dicom-web',\n"
                      "     auth: {kind: basic, username: node, password: hunter2-secret}}\n"
                      "  - {name: results, kind: folder, path: results}\n")
    cfg = load_config(config)
    assert "hunter2-secret" not in repr(cfg) and cfg.destinations[0].auth.secret() == "hunter2-secret"
    assert cfg.destination("results").path == (tmp_path / "results").resolve()
