"""From YAML to a validated :class:`~dicomnode.config.Config`: the loader walks the dataclass fields (the
dataclasses *are* the schema), converts each value to its annotated type, names unknown keys with their
dotted path, applies ``--set`` overrides, resolves relative paths against the configuration file.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from dicomnode.config.defaults import default_raw
from dicomnode.config.node import default_storage_path
from dicomnode.config.pipelines import PREPROCESS_STEPS, OutputKind, PreprocessStep, _check_step, output_kinds
from dicomnode.config.root import Config
from dicomnode.config.validate import _validate
from dicomnode.errors import ConfigError

# --------------------------------------------------------------------------------------------- loading

T = TypeVar("T")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` (from YAML) as the annotated type ``tp``; a ConfigError naming ``where`` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(args, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        return _convert_list(args[0], value, where)
    if origin is Mapping:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {_convert(args[0], k, where): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type[Any], tp), value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}") from None
    return _convert_scalar(tp, value, where)


def _convert_union(args: tuple[Any, ...], value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    for alternative in inner[:-1]:  # the first alternative that takes the value
        try:
            return _convert(alternative, value, where)
        except ConfigError:
            continue
    return _convert(inner[-1], value, where)


def _convert_list(item_type: Any, value: Any, where: str) -> tuple[Any, ...]:
    """A YAML list (or nothing) as a tuple of ``item_type``; preprocessing steps and output kinds by their own
    parsers."""
    if value is None:
        return ()
    if isinstance(value, (str, dict)) or not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    if item_type == PreprocessStep:
        return tuple(_parse_step(item, f"{where}[{i}]") for i, item in enumerate(value))
    if item_type is OutputKind:
        try:
            return output_kinds(_convert(str, item, f"{where}[{i}]") for i, item in enumerate(value))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return tuple(_convert(item_type, item, f"{where}[{i}]") for i, item in enumerate(value))


def _convert_scalar(tp: Any, value: Any, where: str) -> Any:
    """bool, int, float, str and Path; YAML's booleans are not numbers, numbers are strings where one is asked."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value).expanduser()
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover - schema error


def _build(cls: type[T], raw: Any, where: str) -> T:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown configuration key {prefix}{unknown[0]}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required key is missing")
    return cls(**kwargs)




def _parse_step(value: Any, where: str) -> Any:
    """One item of ``model.preprocess``: a mapping with exactly one key, the step name, to its settings."""
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{where}: expected one step such as {{window: {{center: -600, width: 1500}}}}")
    name, settings = next(iter(value.items()))
    if name not in PREPROCESS_STEPS:
        raise ConfigError(f"{where}: unknown preprocessing step {name!r}; known: {', '.join(PREPROCESS_STEPS)}")
    if name == "resample" and isinstance(settings, dict) and isinstance(settings.get("spacing"), (int, float)):
        settings = {**settings, "spacing": [settings["spacing"]]}
    step = _build(PREPROCESS_STEPS[name], settings, f"{where}.{name}")
    _check_step(step, where)
    return step



def parse_config(raw: Any) -> Config:
    """Build and validate a :class:`Config` from already-parsed YAML (``None``: every key at its default,
    which has no pipelines; the node's embedded default is :func:`default_raw`)."""
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg




def apply_overrides(raw: Any, overrides: Iterable[str]) -> Any:
    """``raw`` with each ``dotted.key=VALUE`` of ``overrides`` set (VALUE read as YAML: ``11113``, ``true``,
    ``[a, b]``); the configuration is then validated as usual. ConfigError for a malformed override."""
    doc: Any = dict(raw) if isinstance(raw, dict) else ({} if raw is None else raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. node.port=11113")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: invalid value: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError("--set: the configuration is not a mapping")
        node = doc
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return doc


def load_config(path: Path | None, overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (YAML) into a validated :class:`Config`; ``None`` gives the embedded default
    (:func:`default_raw`). ``overrides`` (``dotted.key=VALUE``) are applied before validation."""
    if path is None:
        overrides = list(overrides)
        asked = apply_overrides({}, overrides).get("storage", {}).get("path")  # --set storage.path=...
        home = Path(str(asked)).expanduser().resolve() if asked else default_storage_path()
        cfg = parse_config(apply_overrides(default_raw(home), overrides))
        return dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, path=home))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    cfg = _folder_paths_relative_to(parse_config(apply_overrides(raw, overrides)), Path(path).parent)
    if not cfg.storage.path.is_absolute():
        # Relative storage paths are relative to the config file, not to wherever the node was started.
        cfg = dataclasses.replace(
            cfg, storage=dataclasses.replace(cfg.storage, path=(Path(path).parent / cfg.storage.path).resolve())
        )
    return cfg


def _folder_paths_relative_to(cfg: Config, base: Path) -> Config:
    """``cfg`` with relative ``folder`` destination paths made relative to ``base`` (the config file's folder)."""
    dests = tuple(dataclasses.replace(d, path=(base / d.path).resolve())
                  if d.path is not None and not d.path.is_absolute() else d for d in cfg.destinations)
    return dataclasses.replace(cfg, destinations=dests)
