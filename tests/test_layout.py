"""The package layout is the architecture: one subpackage per stage, imports pointing down the data path only.

Every import in every module counts, also the lazy ones inside functions (they are how ops reaches the heavy
stages without importing torch), so a shortcut across the layers fails here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dicomnode"
TOP_LEVEL_FILES = {"__init__.py", "__main__.py", "errors.py", "py.typed"}
BASE_PACKAGES = {"config"}  # the configuration schema and loader: the base of the graph, beside errors.py

# What each stage may import besides itself, the package root (version, implementation UID), config and errors.
ALLOWED: dict[str, set[str]] = {
    "telemetry": set(),
    "state": set(),
    "receive": {"state", "telemetry"},
    "imaging": set(),
    "inference": {"imaging"},
    "outputs": {"imaging", "state", "telemetry"},
    "work": {"state", "imaging", "inference", "outputs", "telemetry"},
    "ops": {"state", "receive", "work", "imaging", "inference", "outputs", "telemetry"},
}
BASE = {"config", "errors"}


def _imported_modules(path: Path, module: str | None = None) -> set[str]:
    """Every ``dicomnode...`` module a file imports, absolute names (relative imports resolved against
    ``module``, the file's dotted name; by default its place in the package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = tuple(module.split(".")) if module else path.relative_to(PACKAGE.parent).with_suffix("").parts
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = parts[: len(parts) - node.level]
                base = ".".join(anchor + ((node.module,) if node.module else ()))
            else:
                base = node.module or ""
            if base == "dicomnode":  # from dicomnode import X: X may be a subpackage
                found.update(f"dicomnode.{alias.name}" for alias in node.names)
            else:
                found.add(base)
    return {name for name in found if name == "dicomnode" or name.startswith("dicomnode.")}


def test_top_level_holds_only_the_entry_files_and_the_stage_packages() -> None:
    files = {p.name for p in PACKAGE.iterdir() if p.is_file()}
    dirs = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert files == TOP_LEVEL_FILES
    assert dirs == set(ALLOWED) | BASE_PACKAGES
    for sub in dirs:
        init = PACKAGE / sub / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{sub}/__init__.py must say what the stage may import"


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_imports_point_down_the_data_path(stage: str) -> None:
    allowed = ALLOWED[stage] | BASE | {stage}
    wrong = []
    for path in sorted((PACKAGE / stage).rglob("*.py")):
        for name in _imported_modules(path):
            if name == "dicomnode" or name in {f"dicomnode.{m}" for m in ("__version__", "IMPLEMENTATION_CLASS_UID",
                                                                            "IMPLEMENTATION_VERSION_NAME")}:
                continue
            target = name.split(".")[1]
            if target not in allowed:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_base_modules_import_no_stage() -> None:
    for path in [PACKAGE / "errors.py", *sorted((PACKAGE / "config").rglob("*.py"))]:
        imported = {m.split(".")[1] for m in _imported_modules(path) if m != "dicomnode"}
        assert imported <= BASE, f"{path.relative_to(PACKAGE)} imports {imported - BASE}"


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The walk must find lazy and relative imports, or the layering tests above could not fail."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..outputs import scu\n    import dicomnode.imaging.volume\n"
                     "from dicomnode import work\n")
    found = _imported_modules(probe, "dicomnode.state.probe")
    assert found >= {"dicomnode.outputs", "dicomnode.imaging.volume", "dicomnode.work"}
