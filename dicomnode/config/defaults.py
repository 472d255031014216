"""The embedded default configuration: what the node runs without ``--config`` (the main job).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomnode.config.node import default_storage_path

DEFAULT_RESULTS = "results"  # the embedded default's folder destination
DEFAULT_PIPELINE = "lung"


def default_raw(storage: Path | None = None) -> dict[str, Any]:
    """The embedded default configuration (what the node runs without ``--config``), as YAML-shaped data.

    CT series whose ImageType has ORIGINAL and that hold at least 20 instances go through the classical lung
    pipeline (SEG, SR and Secondary Capture pictures), whose results are written to the ``results`` folder
    destination under the storage path (``<storage>/results/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``: UIDs
    only); every other series is recorded as IGNORED with the rule condition it failed. ``storage``: the
    storage path (default :func:`default_storage_path`).
    """
    storage = storage or default_storage_path()
    return {
        "destinations": [{"name": DEFAULT_RESULTS, "kind": "folder", "path": str(storage / "results")}],
        "pipelines": [{"name": DEFAULT_PIPELINE, "kind": "segment", "model": {"kind": "lung"},
                       "volume": {"min_slices": 20}, "destinations": [DEFAULT_RESULTS]}],
        "rules": [{"name": "ct-original", "pipelines": [DEFAULT_PIPELINE],
                   "match": {"modality": ["CT"], "image_type": ["ORIGINAL"], "min_instances": 20}}],
    }
