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
import ipaddress
import os
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
    require_client_cert: bool = True  # needs ca_file when enabled (a configuration error otherwise)


@dataclass(frozen=True)
class UserCredential:
    """A username a requestor may present in User Identity negotiation, and its passcode ("" : the username
    alone suffices). Keep a config that holds passcodes readable by the node's user only."""

    username: str
    passcode: str = ""


@dataclass(frozen=True)
class UserIdentityConfig:
    """User Identity negotiation (PS3.7 D.3.3.7). With ``users`` empty, identities are not checked. With users,
    a presented username (and passcode) must match one of them; ``required`` also rejects requestors that
    present none (or one the node cannot verify: Kerberos, SAML, JWT)."""

    required: bool = False
    users: tuple[UserCredential, ...] = ()


@dataclass(frozen=True)
class NodeConfig:
    """The listening side: who we are, where we listen, whom we accept, and the limits a peer meets."""

    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()  # empty: accept any calling AE title
    allowed_hosts: tuple[str, ...] = ()  # empty: accept any peer address
    max_associations: int = 16  # per receiver process
    max_pending_connections: int = 64  # per receiver process: connections not associated (yet, or any more)
    max_pdu_size: int = 0  # 0 = unlimited
    receivers: int = 1  # receiver processes accepting from the node's one listening socket
    acse_timeout: float = 30.0  # deadline: TLS handshake + A-ASSOCIATE-RQ; and for the peer to close after
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0  # deadline for an association to make progress
    accept_unknown_sop_classes: bool = True  # storage SOP classes the registry does not know (private, newer)
    user_identity: UserIdentityConfig = field(default_factory=UserIdentityConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)


HOME_ENV = "DICOMNODE_HOME"


def default_storage_path() -> Path:
    """Where the node keeps its data when the configuration does not say (``storage.path`` absent).

    The rule, the same with and without a configuration file and from whichever folder a verb runs:
    ``$DICOMNODE_HOME`` when set (made absolute against the current folder at the moment it is read), else
    ``$XDG_DATA_HOME/dicomnode``, else ``~/.local/share/dicomnode``. Always an absolute path.
    """
    home = os.environ.get(HOME_ENV, "").strip()
    if home:
        return Path(home).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return (base / "dicomnode").resolve()


@dataclass(frozen=True)
class StorageConfig:
    """Where the spool, the outbox and the SQLite database live; the free-space floor for receiving.

    ``path`` defaults to :func:`default_storage_path`; a relative ``path`` in a file is relative to the file.
    """

    path: Path = field(default_factory=default_storage_path)
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
    backoff_jitter: float = 0.5  # fraction of each retry delay drawn at random (0 = none, 1 = anywhere up to it)
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


class DestinationKind(str, enum.Enum):
    """How a destination receives objects (``destinations[].kind``)."""

    DICOM = "dicom"  # C-STORE to a DICOM peer (ae_title, host, port, tls)
    DICOMWEB = "dicomweb"  # STOW-RS to a DICOMweb service (url, auth, verify_tls, ca_file, timeout_seconds)
    FOLDER = "folder"  # durable files under path, one folder per series named by its UID


class HttpAuthKind(str, enum.Enum):
    NONE = "none"
    BASIC = "basic"  # username and a password (or password_env)
    BEARER = "bearer"  # a token (or token_env), sent as "Authorization: Bearer <token>"


@dataclass(frozen=True)
class HttpAuth:
    """Credentials of a ``dicomweb`` destination. Prefer ``password_env`` / ``token_env`` (the name of an
    environment variable read when the node sends) over secrets written into the configuration file."""

    kind: HttpAuthKind = HttpAuthKind.NONE
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_env: str | None = None
    token: str | None = field(default=None, repr=False)
    token_env: str | None = None

    def secret(self) -> str:
        """The password (basic) or token (bearer), from the config or its environment variable.

        Raises ConfigError when the named environment variable is not set (or empty)."""
        value, env = ((self.password, self.password_env) if self.kind is HttpAuthKind.BASIC
                      else (self.token, self.token_env))
        if env is not None:
            value = os.environ.get(env)
            if not value:
                raise ConfigError(f"environment variable {env} (credentials of a dicomweb destination) is not set")
        return value or ""


# Keys each destination kind uses besides name and kind (the others must keep their defaults).
_DESTINATION_KEYS = {
    "dicom": ("ae_title", "host", "port", "tls"),
    "dicomweb": ("url", "auth", "verify_tls", "ca_file", "timeout_seconds"),
    "folder": ("path",),
}


@dataclass(frozen=True)
class Destination:
    """Where a pipeline's objects go: a C-STORE peer (``kind: dicom``, the default), a DICOMweb STOW-RS service
    (``kind: dicomweb``) or a folder (``kind: folder``). Only the keys of its kind may be set."""

    name: str
    kind: DestinationKind = DestinationKind.DICOM
    ae_title: str = ""  # dicom: the peer's AE title, host and port (required)
    host: str = ""
    port: int = 0
    tls: bool = False  # dicom: DICOM TLS with node.tls's certificates
    url: str = ""  # dicomweb: the service root (http[s]://host:port/prefix); STOW-RS posts to <url>/studies
    auth: HttpAuth = field(default_factory=HttpAuth)
    verify_tls: bool = True  # dicomweb: verify the server's certificate (https); false only for tests
    ca_file: Path | None = None  # dicomweb: CA bundle (PEM) to verify it with, instead of the system's
    timeout_seconds: float = 60.0  # dicomweb: connect and read timeout of each request
    path: Path | None = None  # folder: where the series folders are made

    def where(self) -> str:
        """Where this destination delivers, for messages (no credentials)."""
        if self.kind is DestinationKind.DICOMWEB:
            return f"{self.name} ({self.url})"
        if self.kind is DestinationKind.FOLDER:
            return f"{self.name} ({self.path})"
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


class SegmenterKind(str, enum.Enum):
    """``model.kind`` of a ``segment`` pipeline: the closed set the segmenter factory builds."""

    LUNG = "lung"  # classical masks, no weights
    BODY = "body"
    BRAIN = "brain"
    LUNG_UNET = "lung-unet"  # the U-Net shipped with the package (or one at model.path)
    UNET = "unet"  # a state-dict checkpoint of the package's U-Net at model.path
    TORCHSCRIPT = "torchscript"  # a TorchScript archive at model.path with its preprocessing spec
    NNUNET = "nnunet"  # a trained nnU-Net v2 model folder at model.path
    TOTALSEGMENTATOR = "totalsegmentator"  # a TotalSegmentator task; weights in model.weights (never downloaded)
    MONAI_BUNDLE = "monai-bundle"  # a MONAI bundle folder at model.path

    @property
    def needs_path(self) -> bool:
        return self in (SegmenterKind.UNET, SegmenterKind.TORCHSCRIPT, SegmenterKind.NNUNET,
                        SegmenterKind.MONAI_BUNDLE)

    @property
    def path_is_folder(self) -> bool:
        """``model.path`` names a folder (nnU-Net model, MONAI bundle), not a file."""
        return self in (SegmenterKind.NNUNET, SegmenterKind.MONAI_BUNDLE)

    @property
    def takes_preprocess(self) -> bool:
        """Kinds whose preprocessing is the node's declarative chain (the frameworks bring their own)."""
        return self in (SegmenterKind.LUNG_UNET, SegmenterKind.UNET, SegmenterKind.TORCHSCRIPT)


# ------------------------------------------------------------------------------ preprocessing steps
@dataclass(frozen=True)
class HuStep:
    """``hu``: the volume must be CT in Hounsfield units (slope/intercept applied and padding turned to air at
    load); values are clipped to [``min``, ``max``] HU."""

    min: float = -1024.0
    max: float = 3071.0


@dataclass(frozen=True)
class WindowStep:
    """``window``: clip to [center - width/2, center + width/2] and scale linearly to [0, 1]; ``preset`` names
    one of dicomnode.imaging.preprocess.WINDOWS instead (lung, mediastinum, bone, brain, ...)."""

    center: float | None = None
    width: float | None = None
    preset: str | None = None


@dataclass(frozen=True)
class ResampleStep:
    """``resample``: to ``spacing`` mm along (z, y, x) (one number: isotropic), linear interpolation. ``grid``:
    ``extent`` keeps the volume's extent (n x spacing; trilinear, align_corners=False: the lung U-Net's
    training convention) or ``centres`` keeps the first voxel's centre (the fast banded resampler)."""

    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    grid: Literal["extent", "centres"] = "centres"


@dataclass(frozen=True)
class NormalizeStep:
    """``normalize``: ``zscore`` ((x - mean) / std over the volume, or over ``low <= x <= high`` when given) or
    ``minmax`` ([low, high], default the data's range, to [0, 1], clipped)."""

    mode: Literal["zscore", "minmax"] = "zscore"
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class CropStep:
    """``crop``: to the bounding box of the body (CT: the classical body mask) grown by ``margin`` voxels."""

    to: Literal["body"] = "body"
    margin: int = 2


@dataclass(frozen=True)
class PadStep:
    """``pad``: with ``value`` at the end of each axis up to a ``multiple`` of voxels and at least ``shape``."""

    multiple: int = 1
    shape: tuple[int, ...] = ()
    value: float = 0.0


PreprocessStep = HuStep | WindowStep | ResampleStep | NormalizeStep | CropStep | PadStep
PREPROCESS_STEPS: dict[str, type[Any]] = {"hu": HuStep, "window": WindowStep, "resample": ResampleStep,
                                          "normalize": NormalizeStep, "crop": CropStep, "pad": PadStep}


def _check_step(step: Any, where: str) -> None:
    """Start-up checks of one preprocessing step's values (types were checked by the loader)."""
    if isinstance(step, HuStep) and not step.max > step.min:
        raise ConfigError(f"{where}.hu: max must exceed min")
    if isinstance(step, WindowStep):
        if (step.preset is None) == (step.center is None or step.width is None):
            raise ConfigError(f"{where}.window: give center and width, or a preset")
        if step.width is not None and step.width <= 0:
            raise ConfigError(f"{where}.window.width: must be positive")
    if isinstance(step, ResampleStep) and (len(step.spacing) not in (1, 3) or min(step.spacing) <= 0):
        raise ConfigError(f"{where}.resample.spacing: one or three positive numbers (mm, z y x)")
    if isinstance(step, NormalizeStep) and None not in (step.low, step.high) and not step.high > step.low:  # type: ignore[operator]
        raise ConfigError(f"{where}.normalize: high must exceed low")
    if isinstance(step, CropStep) and step.margin < 0:
        raise ConfigError(f"{where}.crop.margin: must not be negative")
    if isinstance(step, PadStep) and (step.multiple < 1 or len(step.shape) not in (0, 3) or
                                      any(n < 1 for n in step.shape)):
        raise ConfigError(f"{where}.pad: multiple >= 1 and shape empty or three positive sizes")


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


@dataclass(frozen=True)
class LabelCode:
    """A SNOMED CT (or other scheme) code for a model's label name, adding to or overriding the package's
    table (dicomnode.imaging.codes). ``laterality``: left | right | null."""

    label: str
    code: str
    meaning: str
    scheme: str = "SCT"
    laterality: Literal["left", "right"] | None = None


class OutputKind(str, enum.Enum):
    """The kinds of derived object a ``segment`` pipeline makes, each its own series, in output order.

    ``outputs.kinds`` also accepts ``sc``, shorthand for the three picture kinds (:data:`OUTPUT_KIND_ALIASES`).
    """

    SEG = "seg"
    SR = "sr"
    RTSTRUCT = "rtstruct"
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
    ``torchscript`` (a TorchScript archive at ``path`` with its preprocessing spec), ``nnunet`` (an nnU-Net v2
    model folder at ``path``: ``folds``, ``checkpoint``, ``configuration``, ``tile_step``, ``mirroring``),
    ``totalsegmentator`` (``task``, ``fast``, ``weights``), ``monai-bundle`` (a bundle folder at ``path``).
    ``preprocess`` (unet/torchscript kinds) replaces the chain embedded with the model. ``codes`` add to or
    override the label-name-to-SNOMED-CT table. Model folders, bundles and checkpoints can run code when
    loaded (pickles, bundle expressions): only configure paths you trust.
    """

    kind: SegmenterKind = SegmenterKind.LUNG
    path: Path | None = None
    batch_size: int = 2  # patches per forward pass; halved on CUDA out-of-memory
    overlap: float = 0.5  # sliding-window overlap, fraction of the patch
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    preprocess: tuple[PreprocessStep, ...] = ()
    folds: tuple[str, ...] = ()  # nnunet: fold numbers or "all"; empty = every fold with a checkpoint
    checkpoint: str = "checkpoint_final.pth"  # nnunet
    configuration: str | None = None  # nnunet: e.g. 3d_fullres; default: the checkpoint's
    tile_step: float = 0.5  # nnunet: sliding-window step, fraction of the patch
    mirroring: bool = True  # nnunet: test-time mirroring along the axes the model allows
    task: str = "total"  # totalsegmentator: the task name (total, lung_vessels, ...)
    fast: bool = False  # totalsegmentator: the task's 3 mm "fast" model
    weights: Path | None = None  # totalsegmentator: its weights folder; default as TotalSegmentator decides
    codes: tuple[LabelCode, ...] = ()


@dataclass(frozen=True)
class VolumeConfig:
    """How a series becomes a volume for this pipeline."""

    min_slices: int = 3
    irregular: Literal["resample", "reject"] = "resample"  # gantry tilt / unequal spacing


@dataclass(frozen=True)
class OutputsConfig:
    """Which derived objects a ``segment`` pipeline makes.

    Series numbers: base + 0 SEG, 1 SR, 2-4 SC (overlays, three planes, 3D surface), 5 RTSTRUCT."""

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
class UiConfig:
    """The read-only status page the node serves (``/``: queue, series, jobs, outputs, health).

    On by default, on loopback only. Bound to any other address it requires ``token`` (at least 16
    characters), sent as ``Authorization: Bearer TOKEN``, as the password of HTTP basic auth, or once as
    ``?token=TOKEN`` (the page then keeps it in a cookie). Patient names and IDs are shown only with
    ``show_patient_ids``. The page reloads itself every ``refresh_seconds`` (0: never).
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8110
    show_patient_ids: bool = False
    token: str | None = None
    refresh_seconds: int = 10


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for any other name."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    ui: UiConfig = field(default_factory=UiConfig)
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
        if args[0] == PreprocessStep:
            return tuple(_parse_step(item, f"{where}[{i}]") for i, item in enumerate(value))
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
    node = cfg.node
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
    if not 0.0 <= cfg.worker.backoff_jitter <= 1.0:
        raise ConfigError("worker.backoff_jitter: must lie between 0 and 1")
    _check_port(cfg.metrics.port, "metrics.port")
    _validate_ui(cfg.ui)
    _validate_ray(cfg)
    names: set[str] = set()
    for i, dest in enumerate(cfg.destinations):
        where = f"destinations[{i}]"
        if dest.name in names:
            raise ConfigError(f"{where}.name: duplicate destination name {dest.name!r}")
        names.add(dest.name)
        _validate_destination(dest, where, node)
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
    """Build and validate a :class:`Config` from already-parsed YAML (``None``: every key at its default,
    which has no pipelines; the node's embedded default is :func:`default_raw`)."""
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg


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
