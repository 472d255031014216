"""Checks that a type cannot express, run once at start-up on the built :class:`~dicomnode.config.Config`:
AE titles, ports, paths, cross references between pipelines, rules and destinations, per-kind keys.
"""

from __future__ import annotations

import re

from dicomnode.config.destinations import _DESTINATION_KEYS, Destination, DestinationKind, HttpAuthKind
from dicomnode.config.node import (
    NodeConfig,
    RayPlacement,
    UiConfig,
    UserIdentityConfig,
    _check_port,
    check_ae_title,
    is_loopback,
)
from dicomnode.config.pipelines import CropStep, ModelConfig, PadStep, PipelineConfig, ResampleStep, SegmenterKind
from dicomnode.config.root import Config
from dicomnode.errors import ConfigError


def _validate_user_identity(identity: UserIdentityConfig) -> None:
    names = [user.username for user in identity.users]
    if identity.required and not names:
        raise ConfigError("node.user_identity.required: needs at least one entry in node.user_identity.users")
    for i, name in enumerate(names):
        if not name or len(name.encode("utf-8")) > 65535:
            raise ConfigError(f"node.user_identity.users[{i}].username: must be 1-65535 bytes")
        if name in names[:i]:
            raise ConfigError(f"node.user_identity.users[{i}].username: duplicate username {name!r}")


def _validate(cfg: Config) -> None:
    _validate_node(cfg.node)
    if cfg.storage.path.exists() and not cfg.storage.path.is_dir():
        raise ConfigError(f"storage.path: {cfg.storage.path} exists and is not a directory")
    _validate_work(cfg)
    _check_port(cfg.metrics.port, "metrics.port")
    _validate_ui(cfg.ui)
    _validate_ray(cfg)
    destinations = _validate_destinations(cfg)
    pipelines = _validate_pipelines(cfg, destinations)
    _validate_rules(cfg, pipelines)
    for dest_name in cfg.unmatched_destinations:
        if dest_name not in destinations:
            raise ConfigError(f"unmatched_destinations: unknown destination {dest_name!r}")


def _validate_node(node: NodeConfig) -> None:
    check_ae_title(node.ae_title, "node.ae_title")
    _check_port(node.port, "node.port")
    for i, aet in enumerate(node.allowed_calling_aets):
        check_ae_title(aet, f"node.allowed_calling_aets[{i}]")
    for name, value in (("max_associations", node.max_associations), ("receivers", node.receivers),
                        ("max_pending_connections", node.max_pending_connections)):
        if value < 1:
            raise ConfigError(f"node.{name}: must be at least 1, got {value}")
    if node.max_pdu_size < 0:
        raise ConfigError("node.max_pdu_size: must be 0 (unlimited) or positive")
    for name, seconds in (("acse_timeout", node.acse_timeout), ("network_timeout", node.network_timeout),
                          ("dimse_timeout", node.dimse_timeout)):
        if seconds <= 0:
            raise ConfigError(f"node.{name}: must be positive, got {seconds}")
    _validate_user_identity(node.user_identity)
    if node.tls.enabled and (node.tls.cert_file is None or node.tls.key_file is None):
        raise ConfigError("node.tls: cert_file and key_file are required when enabled")
    if node.tls.enabled and node.tls.require_client_cert and node.tls.ca_file is None:
        # Without trust anchors the SCP cannot verify a client certificate, so it would accept any caller.
        raise ConfigError("node.tls.require_client_cert: needs node.tls.ca_file (the CA that client certificates"
                          " must chain to); set require_client_cert: false to accept callers without one")


def _validate_work(cfg: Config) -> None:
    """The ``completion`` and ``worker`` sections."""
    if cfg.completion.quiet_seconds < 0:
        raise ConfigError("completion.quiet_seconds: must not be negative")
    if isinstance(cfg.completion.on_release, float) and cfg.completion.on_release < 0:
        raise ConfigError("completion.on_release: seconds must not be negative")
    if cfg.worker.workers < 0:
        raise ConfigError("worker.workers: must not be negative")
    if cfg.worker.max_attempts < 1:
        raise ConfigError("worker.max_attempts: must be at least 1")
    if not 0.0 <= cfg.worker.backoff_jitter <= 1.0:
        raise ConfigError("worker.backoff_jitter: must lie between 0 and 1")


def _validate_destinations(cfg: Config) -> set[str]:
    """Each destination; returns their names (unique)."""
    names: set[str] = set()
    for i, dest in enumerate(cfg.destinations):
        where = f"destinations[{i}]"
        if dest.name in names:
            raise ConfigError(f"{where}.name: duplicate destination name {dest.name!r}")
        names.add(dest.name)
        _validate_destination(dest, where, cfg.node)
    return names


def _validate_pipelines(cfg: Config, destinations: set[str]) -> set[str]:
    """Each pipeline and the destinations it names; returns the pipelines' names (unique)."""
    names: set[str] = set()
    for i, pipe in enumerate(cfg.pipelines):
        if pipe.name in names:
            raise ConfigError(f"pipelines[{i}].name: duplicate pipeline name {pipe.name!r}")
        names.add(pipe.name)
        for dest_name in pipe.destinations:
            if dest_name not in destinations:
                raise ConfigError(f"pipelines[{i}].destinations: unknown destination {dest_name!r}")
        if pipe.kind == "segment":
            _validate_segment(pipe, f"pipelines[{i}]")
    return names


def _validate_rules(cfg: Config, pipelines: set[str]) -> None:
    for i, rule in enumerate(cfg.rules):
        if not rule.pipelines:
            raise ConfigError(f"rules[{i}].pipelines: a rule must name at least one pipeline")
        for pipe_name in rule.pipelines:
            if pipe_name not in pipelines:
                raise ConfigError(f"rules[{i}].pipelines: unknown pipeline {pipe_name!r}")
        if rule.match.series_description is not None:
            try:
                re.compile(rule.match.series_description)
            except re.error as exc:
                raise ConfigError(f"rules[{i}].match.series_description: bad regular expression: {exc}") from None


def _validate_destination(dest: Destination, where: str, node: NodeConfig) -> None:
    default = Destination(name=dest.name)
    used = _DESTINATION_KEYS[dest.kind.value]
    for key in (k for keys in _DESTINATION_KEYS.values() for k in keys if k not in used):
        if getattr(dest, key) != getattr(default, key):
            raise ConfigError(f"{where}.{key}: not used by a {dest.kind.value!r} destination")
    if dest.kind is DestinationKind.DICOM:
        for key in ("ae_title", "host", "port"):
            if not getattr(dest, key):
                raise ConfigError(f"{where}.{key}: required key for a 'dicom' destination")
        check_ae_title(dest.ae_title, f"{where}.ae_title")
        _check_port(dest.port, f"{where}.port")
        if dest.tls and not node.tls.enabled:
            raise ConfigError(f"{where}.tls: needs node.tls (certificates) to be configured")
    elif dest.kind is DestinationKind.DICOMWEB:
        _validate_dicomweb(dest, where)
    elif dest.path is None:
        raise ConfigError(f"{where}.path: required key for a 'folder' destination")
    elif dest.path.exists() and not dest.path.is_dir():
        raise ConfigError(f"{where}.path: {dest.path} exists and is not a directory")


def _validate_dicomweb(dest: Destination, where: str) -> None:
    if not re.fullmatch(r"https?://[^/\s:]+(:[0-9]{1,5})?(/\S*)?", dest.url):
        raise ConfigError(f"{where}.url: expected http(s)://host[:port][/prefix], got {dest.url!r}")
    if dest.timeout_seconds <= 0:
        raise ConfigError(f"{where}.timeout_seconds: must be positive")
    if dest.ca_file is not None and not dest.ca_file.is_file():
        raise ConfigError(f"{where}.ca_file: {dest.ca_file} does not exist")
    auth, at = dest.auth, f"{where}.auth"
    given = {k for k in ("username", "password", "password_env", "token", "token_env") if getattr(auth, k)}
    wanted = {HttpAuthKind.NONE: set(), HttpAuthKind.BASIC: {"username", "password", "password_env"},
              HttpAuthKind.BEARER: {"token", "token_env"}}[auth.kind]
    if given - wanted:
        raise ConfigError(f"{at}.{sorted(given - wanted)[0]}: not used by auth kind {auth.kind.value!r}")
    secrets = given - {"username"}
    if auth.kind is not HttpAuthKind.NONE and len(secrets) != 1:
        names = "password or password_env" if auth.kind is HttpAuthKind.BASIC else "token or token_env"
        raise ConfigError(f"{at}: auth kind {auth.kind.value!r} needs exactly one of {names}")
    if auth.kind is HttpAuthKind.BASIC and not auth.username:
        raise ConfigError(f"{at}.username: required for basic auth")


def _validate_ui(ui: UiConfig) -> None:
    _check_port(ui.port, "ui.port")
    if ui.refresh_seconds < 0:
        raise ConfigError("ui.refresh_seconds: must not be negative")
    if ui.token is not None and len(ui.token) < 16:
        raise ConfigError("ui.token: use at least 16 characters")
    if ui.enabled and ui.token is None and not is_loopback(ui.host):
        raise ConfigError(f"ui.token: required when the status page listens beyond loopback (ui.host {ui.host})")


def _validate_segment(pipe: PipelineConfig, where: str) -> None:
    model = pipe.model
    _validate_model(model, f"{where}.model")
    if not 1 <= pipe.outputs.series_number_base <= 2**31 - 10:
        raise ConfigError(f"{where}.outputs.series_number_base: out of range")
    if pipe.volume.min_slices < 1:
        raise ConfigError(f"{where}.volume.min_slices: must be at least 1")


def _validate_model(model: ModelConfig, where: str) -> None:
    kind = model.kind
    if kind.needs_path and model.path is None:
        raise ConfigError(f"{where}.path: required for model kind {kind.value!r}")
    if model.path is not None:
        exists = model.path.is_dir() if kind.path_is_folder else model.path.is_file()
        if not exists:
            what = "folder" if kind.path_is_folder else "file"
            raise ConfigError(f"{where}.path: {model.path} does not exist or is not a {what}")
    if model.batch_size < 1 or not 0 <= model.overlap < 1:
        raise ConfigError(f"{where}: batch_size must be >= 1 and overlap in [0, 1)")
    geometric = [i for i, s in enumerate(model.preprocess) if isinstance(s, (ResampleStep, PadStep))]
    for i, step in enumerate(model.preprocess):
        if isinstance(step, CropStep) and geometric and geometric[0] < i:
            raise ConfigError(f"{where}.preprocess[{i}].crop: crop must come before resample and pad steps")
    if model.preprocess and not kind.takes_preprocess:
        raise ConfigError(f"{where}.preprocess: only for kinds lung-unet, unet, torchscript "
                          f"({kind.value!r} runs its framework's own preprocessing)")
    if not 0 < model.tile_step <= 1:
        raise ConfigError(f"{where}.tile_step: must be in (0, 1]")
    for i, fold in enumerate(model.folds):
        if not (fold.isdigit() or fold == "all"):
            raise ConfigError(f"{where}.folds[{i}]: {fold!r} is not a fold number or 'all'")
    if model.weights is not None and kind is SegmenterKind.TOTALSEGMENTATOR and not model.weights.is_dir():
        raise ConfigError(f"{where}.weights: {model.weights} is not a folder")
    labels = [c.label for c in model.codes]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}.codes: a label is coded twice")


_RAY_ADDRESS_RE = re.compile(r"auto|local|(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}")


def _validate_ray(cfg: Config) -> None:
    """The ``ray`` section and every pipeline's ``ray`` placement (checked whatever the engine)."""
    ray = cfg.ray
    if not _RAY_ADDRESS_RE.fullmatch(ray.address):
        raise ConfigError(f"ray.address: {ray.address!r} is not auto, local, host:port or ray://host:port")
    for name in ("replica_wait_seconds", "call_timeout_seconds", "connect_timeout_seconds"):
        if getattr(ray, name) <= 0:
            raise ConfigError(f"ray.{name}: must be positive")
    if ray.max_restarts < -1:
        raise ConfigError("ray.max_restarts: must be -1 (always) or at least 0")
    _check_placement(ray.placement(RayPlacement()), "ray")
    for i, pipe in enumerate(cfg.pipelines):
        _check_placement(ray.placement(pipe.ray), f"pipelines[{i}].ray")


def _check_placement(place: RayPlacement, where: str) -> None:
    if place.replicas is None or place.replicas < 1:
        raise ConfigError(f"{where}.replicas: must be at least 1")
    for name, amount in (("num_gpus", place.num_gpus), ("num_cpus", place.num_cpus)):
        if amount is None or amount < 0:
            raise ConfigError(f"{where}.{name}: must not be negative")
    for name, amount in (place.resources or {}).items():
        if not name or amount <= 0:
            raise ConfigError(f"{where}.resources.{name}: must be a named, positive amount")
