"""The CLI as a new user meets it: wrong ports, missing paths, odd output names, a closed pipe. Each answers
with one message and an exit code, never a traceback; every ``--json`` document names its schema.

Runs ``python -m dicomnode`` as a user would, with ``DICOMNODE_HOME`` pointing into the test's folder (so no
verb touches the real user's data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.state.store import Store
from tests.conftest import series_dir
from tests.peers import StoreSCP


def run(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DICOMNODE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def no_traceback(out: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in out.stderr and "Error:" not in out.stderr.split("dicomnode:")[0], out.stderr


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_convert_missing_input_folder(home: Path, tmp_path: Path) -> None:
    out = run(home, "convert", str(tmp_path / "nowhere"), str(tmp_path / "out.nii.gz"))
    no_traceback(out)
    assert out.returncode == 1 and f"series folder {tmp_path / 'nowhere'} does not exist" in out.stderr


@pytest.mark.parametrize("target", ["/proc/dicomnode-test.nii.gz", "{tmp}/missing-folder/out.nii.gz"])
def test_convert_unwritable_output(home: Path, tmp_path: Path, target: str) -> None:
    out = run(home, "convert", str(series_dir("P03")), target.format(tmp=tmp_path))
    no_traceback(out)
    assert out.returncode == 1, out.stderr
    assert "cannot write" in out.stderr or "does not exist" in out.stderr


def test_convert_refuses_a_non_nifti_output_name(home: Path, tmp_path: Path) -> None:
    out = run(home, "convert", str(series_dir("P03")), str(tmp_path / "out.png"))
    no_traceback(out)
    assert out.returncode == 2 and "must be a NIfTI file name ending in .nii.gz or .nii" in out.stderr
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("verb", ["echo", "send"])
def test_port_out_of_range_is_a_usage_error(home: Path, verb: str) -> None:
    paths = [str(series_dir("P03"))] if verb == "send" else []
    out = run(home, verb, *paths, "--host", "127.0.0.1", "--port", "99999", "--aet", "X")
    no_traceback(out)
    assert out.returncode == 2 and "port 99999 is outside 1-65535" in out.stderr


def test_status_into_a_closed_pipe(home: Path) -> None:
    Store(home / "dicomnode.sqlite3").close()
    env = {**os.environ, "DICOMNODE_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "status", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # what `head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("verb", ["send", "process"])
def test_missing_input_path_is_named(home: Path, tmp_path: Path, verb: str) -> None:
    missing = tmp_path / "no-such-series"
    extra = ["--to", "x"] if verb == "send" else ["--out", str(tmp_path / "out")]
    out = run(home, verb, str(missing), *extra)
    no_traceback(out)
    assert out.returncode == 1 and f"{missing} does not exist" in out.stderr


def test_process_names_the_pipelines_available(home: Path, tmp_path: Path) -> None:
    out = run(home, "process", str(series_dir("P03")), "--pipeline", "nope", "--out", str(tmp_path / "o"))
    no_traceback(out)
    assert out.returncode == 2 and "unknown pipeline 'nope'; pipelines available: lung" in out.stderr
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump({"pipelines": [{"name": "a"}, {"name": "b"}]}))
    out = run(home, "process", str(series_dir("P03")), "-c", str(cfg), "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "give --pipeline NAME; pipelines available: a, b" in out.stderr


def test_every_json_document_names_its_schema(home: Path, tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "scp")
    try:
        files = sorted(series_dir("P03").iterdir())[:3]
        out = run(home, "send", *map(str, files), "--host", "127.0.0.1", "--port", str(scp.port), "--aet",
                  "STORESCP", "--json")
        assert out.returncode == 0, out.stderr
        sent: dict[str, Any] = json.loads(out.stdout)
        assert sent["schema"] == "dicomnode.send/1" and sent["stored"] == 3
        echoed = json.loads(run(home, "echo", "--host", "127.0.0.1", "--port", str(scp.port), "--aet",
                                "STORESCP", "--json").stdout)
        assert echoed["schema"] == "dicomnode.echo/1" and echoed["ok"]
    finally:
        scp.stop()
    assert json.loads(run(home, "config", "--json").stdout)["schema"] == "dicomnode.config/1"


def test_print_defaults_parses_back_to_the_default(home: Path, tmp_path: Path) -> None:
    out = run(home, "config", "--print-defaults")
    assert out.returncode == 0, out.stderr
    raw = yaml.safe_load(out.stdout)
    assert raw["pipelines"][0]["name"] == "lung" and raw["rules"][0]["match"]["min_instances"] == 20
    saved = tmp_path / "edited.yaml"
    saved.write_text(out.stdout)
    env_cfg = dict(os.environ, DICOMNODE_HOME=str(home))
    code = ("import sys; from pathlib import Path; from dicomnode.config import load_config; "
            "sys.exit(load_config(None) != load_config(Path(sys.argv[1])))")
    assert subprocess.run([sys.executable, "-c", code, str(saved)], env=env_cfg).returncode == 0
    assert yaml.safe_load(run(home, "config", "-c", str(saved)).stdout) == raw


def test_storage_resolves_alike_from_any_folder_with_and_without_a_config(home: Path, tmp_path: Path) -> None:
    """DICOMNODE_HOME decides where data live: a verb run from another folder finds the same store, and a
    config without storage.path uses the same place."""
    Store(home / "dicomnode.sqlite3").close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"node": {"ae_title": "OTHER"}}))
    for args in ((), ("-c", str(plain))):
        out = run(home, "status", "--json", *args, cwd=elsewhere)
        assert out.returncode == 0, out.stderr
    for args in ((), ("-c", str(plain))):
        shown = yaml.safe_load(run(home, "config", *args, cwd=elsewhere).stdout)
        assert shown["storage"]["path"] == str(home.resolve())
    assert not (elsewhere / "dicomnode-data").exists()
    relative = run(home, "config", "--set", "storage.path=rel", cwd=elsewhere)
    assert yaml.safe_load(relative.stdout)["storage"]["path"] == str((elsewhere / "rel").resolve())


def test_config_file_from_the_environment(home: Path, tmp_path: Path) -> None:
    """DICOMNODE_CONFIG names the file when --config is not given (the Docker image's health check relies on it)."""
    cfg = tmp_path / "env.yaml"
    cfg.write_text(yaml.safe_dump({"node": {"ae_title": "FROMENV"}}))
    env = {**os.environ, "DICOMNODE_HOME": str(home), "DICOMNODE_CONFIG": str(cfg)}
    out = subprocess.run([sys.executable, "-m", "dicomnode", "config"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert yaml.safe_load(out.stdout)["node"]["ae_title"] == "FROMENV"
    given = tmp_path / "given.yaml"
    given.write_text(yaml.safe_dump({"node": {"ae_title": "GIVEN"}}))
    out = subprocess.run([sys.executable, "-m", "dicomnode", "config", "-c", str(given)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert yaml.safe_load(out.stdout)["node"]["ae_title"] == "GIVEN"


def test_start_script_puts_dicomnode_on_the_path(tmp_path: Path) -> None:
    """scripts/start.sh links the virtualenv's command into ~/.local/bin (scripts/link_cli.sh): a new login
    shell of a Debian user finds `dicomnode` there."""
    repo = Path(__file__).resolve().parents[1]
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "dicomnode").symlink_to(Path(sys.executable).parent / "python")  # stands in for the script
    user_bin = tmp_path / "user" / ".local" / "bin"
    env = {**os.environ, "HOME": str(tmp_path / "user"), "PATH": f"{user_bin}:/usr/bin:/bin"}
    out = subprocess.run(["bash", str(repo / "scripts" / "link_cli.sh"), str(venv_bin / "dicomnode")], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "dicomnode is on your PATH" in out.stdout, out.stderr
    found = subprocess.run(["bash", "-c", "command -v dicomnode"], env=env, capture_output=True, text=True)
    assert found.stdout.strip() == str(tmp_path / "user" / ".local" / "bin" / "dicomnode")
    assert Path(found.stdout.strip()).resolve() == (venv_bin / "dicomnode").resolve()
    assert "link_cli.sh .venv/bin/dicomnode" in (repo / "scripts" / "start.sh").read_text()
