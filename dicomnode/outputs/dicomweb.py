"""The ``dicomweb`` destination: STOW-RS (PS3.18 10.5) with the ``dicomweb-client`` library.

Files go in batches (at most :data:`MAX_BATCH_FILES` files and about :data:`MAX_BATCH_BYTES` bytes per request)
to ``<url>/studies``, over one HTTP session per job and destination, with ``Accept: application/dicom+json``.
The library's own retrying is off: retries are the job's (backoff in the state store), like C-STORE's. The
library takes data sets: each file is read with pydicom and written back by the library, which for a file read
unchanged gives back its very bytes (elements are written as read, invalid values included; tested).

Statuses (PS3.18 Table 10.5.3-1 and 10.5.3-2), classified as the C-STORE ones are:

- 200 OK: every instance stored; 202 Accepted: the response's Failed SOP Sequence names the instances not
  stored, each with its Failure Reason (classified like a C-STORE status: 0xA7xx and 0x0110 retryable, others
  permanent), the Referenced SOP Sequence those stored (a Warning Reason is kept in the detail); an instance
  named in neither is retryable.
- 409 Conflict and other 4xx about the request's content (400, 413, 415, ...): those instances are refused
  (permanent), with the server's reasons where the body names them.
- 401, 403 (credentials), 404, 405 (wrong URL): the destination refuses everything; the job fails at once
  with the reason (:class:`~dicomnode.errors.DeliveryError`, not retryable), nothing else is sent.
- 408, 429, 5xx, connection refused or reset, timeouts: the destination may accept later; sending stops
  (retryable DeliveryError) and the job is retried with backoff. A failed TLS verification is permanent.

Credentials come from the config or, better, from an environment variable it names (read when sending);
TLS verification is on unless ``verify_tls: false``, with the system's CAs or ``ca_file``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from dicomnode.config import Destination, HttpAuthKind
from dicomnode.errors import ConfigError, DeliveryError
from dicomnode.outputs.delivery import OnResult, Outcome, Proceed, StoreResult, always, classify_status
from dicomnode.state.jobs import OutboundFile
from dicomnode.telemetry import metrics

log = logging.getLogger(__name__)

MAX_BATCH_FILES = 32
MAX_BATCH_BYTES = 32 * 2**20
_DESTINATION_REFUSALS = frozenset({401, 403, 404, 405})
_RETRYABLE_HTTP = frozenset({408, 429})


def _session(dest: Destination) -> requests.Session:
    """A requests session with the destination's TLS verification and credentials (DeliveryError if the
    credentials' environment variable is missing: permanent, the operator must set it)."""
    session = requests.Session()
    session.verify = str(dest.ca_file) if dest.ca_file is not None else dest.verify_tls
    if dest.ca_file is not None or not dest.verify_tls:
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's verify setting: the
        # configured one must win. Proxies from the environment still apply.
        session.trust_env = False
        session.proxies.update(requests.utils.get_environ_proxies(dest.url))
    session.headers["Accept"] = "application/dicom+json"
    try:
        secret = dest.auth.secret() if dest.auth.kind is not HttpAuthKind.NONE else ""
    except ConfigError as exc:
        session.close()
        raise DeliveryError(f"{dest.name}: {exc}", retryable=False) from None
    if dest.auth.kind is HttpAuthKind.BASIC:
        session.auth = (dest.auth.username or "", secret)
    elif dest.auth.kind is HttpAuthKind.BEARER:
        session.headers["Authorization"] = f"Bearer {secret}"
    return session


class StowSender:
    """The :class:`~dicomnode.outputs.delivery.Sender` of a ``dicomweb`` destination (module docstring)."""

    def __init__(self, dest: Destination) -> None:
        self.dest = dest
        self._session = _session(dest)
        self._response: requests.Response | None = None
        try:
            self._client = DICOMwebClient(dest.url.rstrip("/"), session=self._session, callback=self._capture,
                                          timeout=dest.timeout_seconds)
        except ValueError as exc:
            self._session.close()
            raise DeliveryError(f"{dest.name}: {exc}", retryable=False) from None
        self._client.set_http_retry_params(retry=False)

    def _capture(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        self._response = response
        return response

    def close(self) -> None:
        self._session.close()

    def send(self, files: Sequence[OutboundFile], *, on_result: OnResult | None = None,
             proceed: Proceed = always) -> list[StoreResult]:
        results: list[StoreResult] = []

        def report(result: StoreResult) -> None:
            results.append(result)
            metrics.send_outcome(result.outcome.value)
            if on_result is not None:
                on_result(result)

        with metrics.stage_timer("send"):
            for batch in _batches(files):
                if not proceed():
                    break
                datasets: list[Dataset] = []
                sent: list[OutboundFile] = []
                for f in batch:
                    try:
                        datasets.append(pydicom.dcmread(f.path))
                        sent.append(f)
                    except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
                        report(StoreResult(f, Outcome.PERMANENT, None, f"cannot read {f.path}: {exc}"))
                for result in self._store(sent, datasets):
                    report(result)
        return results

    def _store(self, files: list[OutboundFile], datasets: list[Dataset]) -> list[StoreResult]:
        """One STOW-RS request; results per file, or DeliveryError for a failure of the whole destination."""
        if not files:
            return []
        self._response = None
        try:
            self._client.store_instances(datasets)
        except requests.exceptions.SSLError as exc:
            raise DeliveryError(f"{self.dest.where()}: TLS verification failed: {_short(exc)}",
                                retryable=False) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise DeliveryError(f"{self.dest.where()}: {type(exc).__name__}: {_short(exc)}", retryable=True) from None
        except requests.exceptions.HTTPError as exc:
            if exc.response is None:
                raise DeliveryError(f"{self.dest.where()}: {_short(exc)}", retryable=True) from None
            return self._refused(files, exc.response)
        response = self._response
        status = response.status_code if response is not None else HTTPStatus.OK
        return _per_instance(files, _body(response), status)

    def _refused(self, files: list[OutboundFile], response: requests.Response) -> list[StoreResult]:
        code = response.status_code
        what = f"HTTP {code} {_reason(response)}"
        if code in _DESTINATION_REFUSALS:
            raise DeliveryError(f"{self.dest.where()} refused the request: {what}", retryable=False)
        if code in _RETRYABLE_HTTP or code >= 500:
            raise DeliveryError(f"{self.dest.where()}: {what}", retryable=True)
        return _per_instance(files, _body(response), code, default=(Outcome.PERMANENT, f"refused: {what}"))


def _per_instance(files: list[OutboundFile], body: Dataset, status: int,
                  default: tuple[Outcome, str] | None = None) -> list[StoreResult]:
    """Results of one STOW-RS response: Failed SOP Sequence, Referenced SOP Sequence, else ``default``
    (for 200: stored; for 202: retryable, the server did not say)."""
    failed = {str(item.get("ReferencedSOPInstanceUID", "")): item for item in body.get("FailedSOPSequence", [])}
    stored = {str(item.get("ReferencedSOPInstanceUID", "")): item for item in body.get("ReferencedSOPSequence", [])}
    if default is None:
        default = ((Outcome.STORED, f"stored (HTTP {status})") if status == HTTPStatus.OK
                   else (Outcome.RETRYABLE, f"HTTP {status}: not acknowledged in the STOW-RS response"))
    results = []
    for f in files:
        if f.sop_uid in failed:
            reason = failed[f.sop_uid].get("FailureReason")
            code = int(reason) if reason is not None else 0x0110
            outcome, detail = classify_status(code, f"STOW-RS HTTP {status}")
            results.append(StoreResult(f, outcome, code, detail))
        elif f.sop_uid in stored:
            warning = stored[f.sop_uid].get("WarningReason")
            detail = f"stored with warning 0x{int(warning):04X}" if warning is not None else f"stored (HTTP {status})"
            results.append(StoreResult(f, Outcome.STORED, None if warning is None else int(warning), detail))
        else:
            results.append(StoreResult(f, default[0], None, default[1]))
    return results


def _body(response: requests.Response | None) -> Dataset:
    """The response's DICOM JSON body as a dataset; empty when there is none or it is not DICOM JSON (some
    servers, Orthanc among them, send the JSON of a failed STOW-RS without a Content-Type)."""
    if response is None or not response.content:
        return Dataset()
    if "json" not in response.headers.get("Content-Type", "") and not response.content.lstrip().startswith(b"{"):
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, AttributeError):
        return Dataset()


def _reason(response: requests.Response) -> str:
    """HTTP reason phrase and the start of the body, on one line (servers explain refusals there)."""
    text = " ".join(response.text.split())[:200] if response.content else ""
    return f"{response.reason or ''}: {text}" if text else (response.reason or "")


def _short(exc: BaseException) -> str:
    return str(exc).split("\n")[0][:300]


def _batches(files: Sequence[OutboundFile]) -> Iterator[list[OutboundFile]]:
    """Files in request-sized batches (at most MAX_BATCH_FILES, about MAX_BATCH_BYTES each)."""
    batch: list[OutboundFile] = []
    size = 0
    for f in files:
        try:
            length = Path(f.path).stat().st_size
        except OSError:
            length = 0
        if batch and (len(batch) >= MAX_BATCH_FILES or size + length > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += length
    if batch:
        yield batch
