"""The node-wide sections: the SCP (node, TLS, user identity), storage, completion, worker, Ray, metrics, the
status page (ui) and logging; AE title and port checks shared by the other modules.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dicomnode.errors import ConfigError

_AE_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # printable ASCII without backslash, matched whole


def check_ae_title(value: str, where: str) -> str:
    """Return ``value`` if it is a valid AE title (1-16 chars, no backslash/control chars, not blank)."""
    if not _AE_RE.fullmatch(value) or not value.strip():
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
