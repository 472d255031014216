"""Where results go: ``destinations[]`` of kind ``dicom`` (C-STORE), ``dicomweb`` (STOW-RS) or ``folder``.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.errors import ConfigError


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
