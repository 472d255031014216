"""Process-wide settings of the libraries the node uses, made once at the start of every node process.

The node never flips a library's global state per call (another thread of the same process could see the flip).
Each entry point calls :func:`configure_libraries` once before any work: the CLI's ``main`` (every verb, the
``serve`` supervisor included) and each receiver and worker process (spawned, so fresh interpreters). The
test suite calls it too, so in-process tests run under the node's settings. What it sets, and why:

- pydicom ``writing_validation_mode = RAISE``: every value the node creates in a derived object is checked
  when it is set, so an invalid value fails the job with the attribute's name instead of reaching a PACS.
- pydicom ``reading_validation_mode = IGNORE``: received instances are taken as the modality wrote them (a
  sloppy value must not fail a series), and pydicom does not log warnings that quote values, which can be
  patient names. Derived objects are still read back strictly, element by element
  (:func:`dicomnode.outputs.validate.encode_strict`).
- pynetdicom ``STORE_SEND_CHUNKED_DATASET = True``: C-STORE streams each data set from its file as stored,
  so the bytes sent are the bytes kept (no decode and re-encode).

Torch's flags (deterministic algorithms, cuDNN benchmark off) are set by the worker's model stage itself, once
per process (:func:`dicomnode.inference.runner.configure_torch`): processes that run no model never import torch.
"""

from __future__ import annotations

from pydicom import config as pydicom_config
from pynetdicom import _config as pynetdicom_config


def configure_libraries() -> None:
    """Set the node's process-wide library settings (idempotent; see the module doc)."""
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
