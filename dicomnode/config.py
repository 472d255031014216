"""Configuration: one YAML file, parsed once into an immutable, validated :class:`Config`.

Every section is a frozen dataclass; the loader walks the dataclass fields, so the dataclasses below *are* the
schema. Unknown keys are errors that name the key with its dotted path (``node.ae_tilte``), and values are
checked at start-up: AE titles (1-16 characters of the DICOM default repertoire, no backslash), ports,
paths, cross references between pipelines, rules and destinations. ``config/dicomnode.example.yaml`` shows
every key with its default.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from dicomnode.errors import ConfigError

T = TypeVar("T")

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def check_ae_title(value: str, where: str) -> str:
    """Return ``value`` if it is a valid AE title (1-16 chars, no backslash/control chars, not blank)."""
    if not _AE_RE.match(value) or not value.strip():
        raise ConfigError(f"{where}: {value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


def _check_port(value: int, where: str) -> None:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{where}: port {value} is outside 1-65535")


class LateInstancePolicy(str, enum.Enum):
    """What to do when an instance arrives for a series that was already judged complete."""

    REPROCESS = "reprocess"  # reopen the series; it is completed and processed again
    IGNORE = "ignore"  # store the instance, record it, do not process again


class Engine(str, enum.Enum):
    """Where a worker's models run: in the worker process, or in Ray actors (``ray`` section)."""

    LOCAL = "local"  # resident in each worker process; needs no Ray
    RAY = "ray"  # resident in Ray actors on nodes with the resources asked for; the worker keeps the job


class DevicePreference(str, enum.Enum):
    AUTO = "auto"  # CUDA when available, else CPU
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS. All paths are PEM files; ``ca_file`` verifies the peer (mutual TLS when set on the SCP)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = True


@dataclass(frozen=True)
class NodeConfig:
    """The listening side: who we are, where we listen, whom we accept."""

    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()  # empty: accept any calling AE title
    allowed_hosts: tuple[str, ...] = ()  # empty: accept any peer address
    max_associations: int = 16  # per receiver process
    max_pdu_size: int = 0  # 0 = unlimited
    receivers: int = 1  # receiver processes accepting from the node's one listening socket
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class StorageConfig:
    """Where the spool, the outbox and the SQLite database live; the free-space floor for receiving."""

    path: Path = Path("./dicomnode-data")
    min_free_mb: int = 512  # below this, C-STORE answers 0xA700 (out of resources) and stores nothing
    fsync: bool = True  # fsync file and folder before answering success; only turn off for throwaway tests


@dataclass(frozen=True)
class CompletionConfig:
    """DICOM has no 'series complete' message: a series is complete after a quiet period, or sooner on evidence.

    ``on_release``: what the release of the association that sent a series' last instance means.
    ``"evidence"`` (default): complete at once when the received images form a complete volume (one
    orientation, evenly spaced positions with no gap, the count stated by ImagesInAcquisition; see
    :mod:`dicomnode.imaging.completeness`), else wait for the quiet period. A number: complete that many
    seconds after the release, whatever the images say. ``"off"``: only the quiet period counts (for senders
    that send every image over its own association).
    """

    quiet_seconds: float = 30.0
    on_release: float | Literal["evidence", "off"] = "evidence"
    on_late_instance: LateInstancePolicy = LateInstancePolicy.REPROCESS


@dataclass(frozen=True)
class WorkerConfig:
    workers: int = 1  # worker processes, each with its own resident model
    poll_seconds: float = 0.5
    lease_seconds: float = 900.0  # a RUNNING job whose lease expired is requeued (its worker died)
    max_attempts: int = 5
    backoff_seconds: float = 10.0  # first retry delay; doubles per attempt
    backoff_max_seconds: float = 1800.0
    device: DevicePreference = DevicePreference.AUTO
    engine: Engine = Engine.LOCAL


@dataclass(frozen=True)
class RayPlacement:
    """A pipeline's replicas on Ray: how many, and what each reserves. None takes the ``ray`` section's value.

    ``num_gpus`` and ``num_cpus`` are Ray's per-actor reservations (fractions allowed); ``resources`` are
    custom Ray resources by name (e.g. ``{gpu_slot: 1}``), merged over the ``ray`` section's.
    """

    replicas: int | None = None
    num_gpus: float | None = None
    num_cpus: float | None = None
    resources: Mapping[str, float] | None = None


@dataclass(frozen=True)
class RayConfig:
    """The Ray engine (``worker.engine: ray``); ignored, and Ray never imported, with the local engine.

    ``address``: ``auto`` (the cluster this machine belongs to: ``RAY_ADDRESS`` or the one ``ray start``
    recorded), ``local`` (each worker process starts a private single-machine Ray), ``host:port`` (the head's
    GCS) or ``ray://host:port`` (Ray Client). Replicas are named Ray actors in ``namespace`` shared by every
    worker process; at most ``replicas`` jobs per pipeline are in Ray at once. Seconds throughout.
    """

    address: str = "auto"
    namespace: str = "dicomnode"
    replicas: int = 1  # per pipeline, unless the pipeline's ``ray`` says otherwise
    num_gpus: float = 0.0  # per replica: 1 on a GPU cluster (Ray sets CUDA_VISIBLE_DEVICES for the actor)
    num_cpus: float = 1.0  # per replica
    resources: Mapping[str, float] = field(default_factory=dict)  # custom Ray resources per replica
    replica_wait_seconds: float = 300.0  # a job waits this long for a free replica, then retries later
    call_timeout_seconds: float = 600.0  # one inference on a replica; longer: the attempt fails, retryable
    max_restarts: int = -1  # Ray restarts a dead replica this often (-1: always)
    connect_timeout_seconds: float = 15.0  # to reach the cluster (start-up check and reconnects)

    def placement(self, pipe: RayPlacement) -> RayPlacement:
        """A pipeline's placement with every None filled from this section (resources merged)."""
        return RayPlacement(
            replicas=self.replicas if pipe.replicas is None else pipe.replicas,
            num_gpus=self.num_gpus if pipe.num_gpus is None else pipe.num_gpus,
            num_cpus=self.num_cpus if pipe.num_cpus is None else pipe.num_cpus,
            resources={**self.resources, **(pipe.resources or {})},
        )


@dataclass(frozen=True)
class Destination:
    """A C-STORE peer the node sends to."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False


class SegmenterKind(str, enum.Enum):
    """``model.kind`` of a ``segment`` pipeline: the closed set the segmenter factory builds."""

    LUNG = "lung"  # classical masks, no weights
    BODY = "body"
    BRAIN = "brain"
    LUNG_UNET = "lung-unet"  # the U-Net shipped with the package (or one at model.path)
    UNET = "unet"  # a state-dict checkpoint of the package's U-Net at model.path
    TORCHSCRIPT = "torchscript"  # a TorchScript archive at model.path with its preprocessing spec

    @property
    def needs_path(self) -> bool:
        return self in (SegmenterKind.UNET, SegmenterKind.TORCHSCRIPT)


class OutputKind(str, enum.Enum):
    """The kinds of derived object a ``segment`` pipeline makes, each its own series, in output order.

    ``outputs.kinds`` also accepts ``sc``, shorthand for the three picture kinds (:data:`OUTPUT_KIND_ALIASES`).
    """

    SEG = "seg"
    SR = "sr"
    SC_OVERLAY = "sc-overlay"
    SC_PLANES = "sc-planes"
    SC_SURFACE = "sc-surface"


OUTPUT_KIND_ALIASES: dict[str, tuple[OutputKind, ...]] = {
    "sc": (OutputKind.SC_OVERLAY, OutputKind.SC_PLANES, OutputKind.SC_SURFACE),
}


def output_kinds(names: Iterable[str | OutputKind]) -> tuple[OutputKind, ...]:
    """The output kinds named by ``names`` (values or the ``sc`` alias), once each, in output order.

    ValueError names the first unknown name; SR without SEG is refused (the SR references the SEG's segments).
    """
    wanted: set[OutputKind] = set()
    for name in names:
        if isinstance(name, OutputKind):
            wanted.add(name)
        elif name in OUTPUT_KIND_ALIASES:
            wanted.update(OUTPUT_KIND_ALIASES[name])
        else:
            try:
                wanted.add(OutputKind(name))
            except ValueError:
                allowed = ", ".join([k.value for k in OutputKind] + list(OUTPUT_KIND_ALIASES))
                raise ValueError(f"{name!r} is not one of {allowed}") from None
    if OutputKind.SR in wanted and OutputKind.SEG not in wanted:
        raise ValueError("'sr' references the SEG, so it needs 'seg' too")
    return tuple(k for k in OutputKind if k in wanted)


@dataclass(frozen=True)
class ModelConfig:
    """The segmenter of a ``segment`` pipeline.

    ``kind``: ``lung``/``body``/``brain`` (classical, no weights), ``lung-unet`` (the U-Net shipped with the
    package, or ``path``), ``unet`` (a state-dict checkpoint of the package's U-Net at ``path``),
    ``torchscript`` (a TorchScript archive at ``path`` with its preprocessing spec).
    """

    kind: SegmenterKind = SegmenterKind.LUNG
    path: Path | None = None
    batch_size: int = 2  # patches per forward pass; halved on CUDA out-of-memory
    overlap: float = 0.5  # sliding-window overlap, fraction of the patch
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)


@dataclass(frozen=True)
class VolumeConfig:
    """How a series becomes a volume for this pipeline."""

    min_slices: int = 3
    irregular: Literal["resample", "reject"] = "resample"  # gantry tilt / unequal spacing


@dataclass(frozen=True)
class OutputsConfig:
    """Which derived objects a ``segment`` pipeline makes. Series numbers: base + 0 SEG, 1 SR, 2-4 SC."""

    kinds: tuple[OutputKind, ...] = output_kinds(("seg", "sr", "sc"))
    series_number_base: int = 9000
    series_description: str | None = None  # default: the pipeline name
    overlay_every: int = 4  # picture every n-th slice that contains the mask ...
    overlay_max: int = 24  # ... at most this many


@dataclass(frozen=True)
class PipelineConfig:
    """A named piece of work for a complete series.

    ``kind: forward`` sends the series unchanged; ``kind: segment`` builds a volume, runs ``model`` and sends
    the ``outputs`` (SEG, SR, Secondary Captures) to ``destinations``.
    """

    name: str
    kind: Literal["forward", "segment"] = "forward"
    destinations: tuple[str, ...] = ()
    dry_run: bool = False  # run, record what would be sent, send nothing
    model: ModelConfig = field(default_factory=ModelConfig)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    ray: RayPlacement = field(default_factory=RayPlacement)  # with worker.engine: ray


@dataclass(frozen=True)
class RuleMatch:
    """Conditions on a series, all of which must hold (an absent condition always holds).

    Strings compare case-insensitively; ``series_description`` is a regular expression searched in the
    description; ``image_type`` values must all be present in the series' ImageType.
    """

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    series_description: str | None = None
    sop_class_uid: tuple[str, ...] = ()
    image_type: tuple[str, ...] = ()
    calling_aet: tuple[str, ...] = ()
    min_instances: int | None = None
    max_instances: int | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    pipelines: tuple[str, ...]
    match: RuleMatch = field(default_factory=RuleMatch)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9110


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json: bool = False


@dataclass(frozen=True)
class Config:
    """The whole node configuration. Build it with :func:`load_config` or :func:`parse_config`."""

    node: NodeConfig = field(default_factory=NodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    destinations: tuple[Destination, ...] = ()
    pipelines: tuple[PipelineConfig, ...] = ()
    rules: tuple[Rule, ...] = ()
    unmatched: Literal["ignore", "forward"] = "ignore"  # series matching no rule: record as ignored, or forward
    unmatched_destinations: tuple[str, ...] = ()  # where 'forward' sends unmatched series (default: all)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def spool_dir(self) -> Path:
        return self.storage.path / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.storage.path / "outbox"

    @property
    def db_path(self) -> Path:
        return self.storage.path / "dicomnode.sqlite3"

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise ConfigError(f"unknown destination {name!r}")

    def pipeline(self, name: str) -> PipelineConfig:
        for pipe in self.pipelines:
            if pipe.name == name:
                return pipe
        raise ConfigError(f"unknown pipeline {name!r}")


# --------------------------------------------------------------------------------------------- loading


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:  # the first alternative that takes the value
            try:
                return _convert(alternative, value, where)
            except ConfigError:
                continue
        return _convert(inner[-1], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if value is None:
            return ()
        if isinstance(value, (str, dict)) or not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if args[0] is OutputKind:
            try:
                return output_kinds(_convert(str, item, f"{where}[{i}]") for i, item in enumerate(value))
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return tuple(_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
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


def _validate(cfg: Config) -> None:
    node = cfg.node
    check_ae_title(node.ae_title, "node.ae_title")
    _check_port(node.port, "node.port")
    for i, aet in enumerate(node.allowed_calling_aets):
        check_ae_title(aet, f"node.allowed_calling_aets[{i}]")
    for name, value in (("max_associations", node.max_associations), ("receivers", node.receivers)):
        if value < 1:
            raise ConfigError(f"node.{name}: must be at least 1, got {value}")
    if node.max_pdu_size < 0:
        raise ConfigError("node.max_pdu_size: must be 0 (unlimited) or positive")
    if node.tls.enabled and (node.tls.cert_file is None or node.tls.key_file is None):
        raise ConfigError("node.tls: cert_file and key_file are required when enabled")
    if cfg.storage.path.exists() and not cfg.storage.path.is_dir():
        raise ConfigError(f"storage.path: {cfg.storage.path} exists and is not a directory")
    if cfg.completion.quiet_seconds < 0:
        raise ConfigError("completion.quiet_seconds: must not be negative")
    if isinstance(cfg.completion.on_release, float) and cfg.completion.on_release < 0:
        raise ConfigError("completion.on_release: seconds must not be negative")
    if cfg.worker.workers < 0:
        raise ConfigError("worker.workers: must not be negative")
    if cfg.worker.max_attempts < 1:
        raise ConfigError("worker.max_attempts: must be at least 1")
    _check_port(cfg.metrics.port, "metrics.port")
    _validate_ray(cfg)
    names: set[str] = set()
    for i, dest in enumerate(cfg.destinations):
        where = f"destinations[{i}]"
        if dest.name in names:
            raise ConfigError(f"{where}.name: duplicate destination name {dest.name!r}")
        names.add(dest.name)
        check_ae_title(dest.ae_title, f"{where}.ae_title")
        _check_port(dest.port, f"{where}.port")
        if dest.tls and not node.tls.enabled:
            raise ConfigError(f"{where}.tls: needs node.tls (certificates) to be configured")
    pipe_names: set[str] = set()
    for i, pipe in enumerate(cfg.pipelines):
        if pipe.name in pipe_names:
            raise ConfigError(f"pipelines[{i}].name: duplicate pipeline name {pipe.name!r}")
        pipe_names.add(pipe.name)
        for dest_name in pipe.destinations:
            if dest_name not in names:
                raise ConfigError(f"pipelines[{i}].destinations: unknown destination {dest_name!r}")
        if pipe.kind == "segment":
            _validate_segment(pipe, f"pipelines[{i}]")
    for i, rule in enumerate(cfg.rules):
        if not rule.pipelines:
            raise ConfigError(f"rules[{i}].pipelines: a rule must name at least one pipeline")
        for pipe_name in rule.pipelines:
            if pipe_name not in pipe_names:
                raise ConfigError(f"rules[{i}].pipelines: unknown pipeline {pipe_name!r}")
        if rule.match.series_description is not None:
            try:
                re.compile(rule.match.series_description)
            except re.error as exc:
                raise ConfigError(f"rules[{i}].match.series_description: bad regular expression: {exc}") from None
    for dest_name in cfg.unmatched_destinations:
        if dest_name not in names:
            raise ConfigError(f"unmatched_destinations: unknown destination {dest_name!r}")


def _validate_segment(pipe: PipelineConfig, where: str) -> None:
    model = pipe.model
    if model.kind.needs_path and model.path is None:
        raise ConfigError(f"{where}.model.path: required for model kind {model.kind.value!r}")
    if model.path is not None and not model.path.is_file():
        raise ConfigError(f"{where}.model.path: {model.path} does not exist")
    if model.batch_size < 1 or not 0 <= model.overlap < 1:
        raise ConfigError(f"{where}.model: batch_size must be >= 1 and overlap in [0, 1)")
    if not 1 <= pipe.outputs.series_number_base <= 2**31 - 10:
        raise ConfigError(f"{where}.outputs.series_number_base: out of range")
    if pipe.volume.min_slices < 1:
        raise ConfigError(f"{where}.volume.min_slices: must be at least 1")


_RAY_ADDRESS_RE = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5})$")


def _validate_ray(cfg: Config) -> None:
    """The ``ray`` section and every pipeline's ``ray`` placement (checked whatever the engine)."""
    ray = cfg.ray
    if not _RAY_ADDRESS_RE.match(ray.address):
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


def parse_config(raw: Any) -> Config:
    """Build and validate a :class:`Config` from already-parsed YAML (``None`` means all defaults)."""
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg


def load_config(path: Path | None) -> Config:
    """Read ``path`` (YAML) into a validated :class:`Config`; ``None`` gives the embedded defaults."""
    if path is None:
        return parse_config(None)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    cfg = parse_config(raw)
    if not cfg.storage.path.is_absolute():
        # Relative storage paths are relative to the config file, not to wherever the node was started.
        cfg = dataclasses.replace(
            cfg, storage=dataclasses.replace(cfg.storage, path=(Path(path).parent / cfg.storage.path).resolve())
        )
    return cfg
