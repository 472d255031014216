"""The configuration as YAML: ``dicomnode config`` prints the effective configuration, ``--print-defaults``
the embedded default, each complete (every key, with its value) and ready to edit.

Contract: ``parse_config(yaml.safe_load(config_yaml(cfg))) == cfg`` for every validated ``cfg`` (paths are
written as they are held, absolute after loading; enums as their values; tuples as lists; unset optional
values as ``null``).
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

import yaml

from dicomnode.config import HOME_ENV, Config

HEADER = f"""\
# dicomnode configuration: every key with its value. Edit, then run
#   dicomnode serve --config THIS_FILE
# config/dicomnode.example.yaml explains every key. Unknown keys are errors. storage.path below is where
# this node keeps its data ({HOME_ENV} when set, else ~/.local/share/dicomnode, unless a file sets it).
"""


def to_raw(value: Any) -> Any:
    """``value`` (a config dataclass or one of its field values) as plain YAML data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_raw(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [to_raw(v) for v in value]
    return value


def config_yaml(cfg: Config, *, header: str = HEADER) -> str:
    """``cfg`` as commented YAML, key order as in the dataclasses (sections in the order of :class:`Config`)."""
    body = yaml.safe_dump(to_raw(cfg), sort_keys=False, default_flow_style=False, width=100)
    return header + body
