"""One Google Drive connection: credentials, a client per thread, retries, error mapping.

Credentials, in order: a user OAuth token file (`dicomflow auth` writes it, 0600; refreshed by google-auth
when it expires), a service account to impersonate (one Drive identity shared by every function, so users
share folders with a single account), or the ambient identity (Cloud Run's service account, or
`gcloud auth application-default login`).

httplib2 is not thread-safe: a thread borrows an idle client from a small pool for each call (or a whole
download or upload) and gives it back, so connections are reused and never shared.

Tests point the real client at the fake
Drive server with GCP_FACTS §3's recipe (a patched discovery document; `api_endpoint` would leave media
uploads on https).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Imported here, not lazily: clients are built in worker threads, and concurrent first imports through
# the `google` namespace package can fail (a KeyError in importlib's namespace path cache).
import google_auth_httplib2
import httplib2
from googleapiclient.discovery import build, build_from_document
from googleapiclient.discovery_cache import get_static_doc
from googleapiclient.errors import HttpError
from googleapiclient.http import build_http

from dicomflow.adapters.drive.errors import map_http_error, transport_error
from dicomflow.config import Settings
from dicomflow.domain.failures import ConfigError, DicomflowError
from dicomflow.ports import ChangePage, DriveChange, FileInfo

SCOPES = ["https://www.googleapis.com/auth/drive"]
NUM_RETRIES = 6  # googleapiclient's own retry of 429/5xx/rate-limit 403, with random() * 2**n s sleeps
# What a dropped or stalled connection raises. http.client.HTTPException covers IncompleteRead: a
# connection closed cleanly (FIN) in the middle of a body, which neither httplib2 nor googleapiclient
# retries (their retry loops catch socket errors only); a reset (RST) or a stall is an OSError.
TRANSPORT_ERRORS = (OSError, httplib2.HttpLib2Error, TimeoutError, ConnectionError, http.client.HTTPException)
TRANSPORT_ATTEMPTS = 4
HTTP_TIMEOUT_SECONDS = 60.0  # googleapiclient's default socket timeout: a stalled response fails after it


def load_user_credentials(path: Path) -> Any:
    """A user's OAuth token file; refreshed now if expired, and saved back with 0600 permissions."""
    from google.auth.transport.requests import Request  # noqa: PLC0415
    from google.oauth2.credentials import Credentials  # noqa: PLC0415

    if not path.exists():
        raise ConfigError(f"no Drive token at {path}: run `dicomflow auth --client-secrets FILE` first")
    credentials = Credentials.from_authorized_user_file(str(path), SCOPES)  # type: ignore[no-untyped-call]
    if not credentials.valid and credentials.refresh_token:
        credentials.refresh(Request())
        save_user_credentials(path, credentials)
    return credentials


def save_user_credentials(path: Path, credentials: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(credentials.to_json())
    path.with_suffix(".tmp").replace(path)
    path.chmod(0o600)


def _credentials(settings: Settings) -> tuple[Any, str]:
    """(credentials, the identity named in error messages)."""
    if settings.drive_endpoint:
        from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415

        return AnonymousCredentials(), settings.drive_identity or "the test identity"  # type: ignore[no-untyped-call]
    if settings.drive_credentials:
        credentials = load_user_credentials(Path(settings.drive_credentials).expanduser())
        return credentials, settings.drive_identity or "your Google account"
    import google.auth  # noqa: PLC0415

    credentials, _project = google.auth.default(scopes=SCOPES)
    if settings.drive_service_account:
        from google.auth import impersonated_credentials  # noqa: PLC0415

        credentials = impersonated_credentials.Credentials(  # type: ignore[no-untyped-call]
            source_credentials=credentials, target_principal=settings.drive_service_account, target_scopes=SCOPES
        )
        return credentials, settings.drive_service_account
    identity = settings.drive_identity or str(getattr(credentials, "service_account_email", "") or "")
    return credentials, identity or "the service account dicomflow runs as"


class DriveConnection:
    def __init__(
        self,
        credentials: Any,
        *,
        identity: str,
        endpoint: str = "",
        download_concurrency: int = 16,
        max_retry_sleep: float = 32.0,
        http_timeout: float = HTTP_TIMEOUT_SECONDS,
    ) -> None:
        self.credentials = credentials
        self.identity = identity
        self.endpoint = endpoint
        self.download_concurrency = download_concurrency
        self.max_retry_sleep = max_retry_sleep
        self.http_timeout = http_timeout
        self._idle: list[Any] = []
        self._all: list[Any] = []
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> DriveConnection:
        credentials, identity = _credentials(settings)
        return cls(
            credentials,
            identity=identity,
            endpoint=settings.drive_endpoint,
            download_concurrency=settings.download_concurrency,
            max_retry_sleep=settings.drive_max_retry_sleep_seconds,
        )

    # --- clients ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def client(self) -> Iterator[DriveClient]:
        """A Drive client for this thread's exclusive use until the block ends."""
        with self._lock:
            service = self._idle.pop() if self._idle else None
        if service is None:
            service = self._build()
            with self._lock:
                self._all.append(service)
        try:
            yield service
        except BaseException:
            # httplib2 keeps a socket in its pool after an answer cut short or a timeout (it closes it
            # only for errors before the status line); reusing it fails again, and dropping it unclosed
            # leaks it. Close this client's sockets: the next request opens a fresh connection.
            service.close()
            raise
        finally:
            with self._lock:
                self._idle.append(service)

    def close(self) -> None:
        with self._lock:
            services, self._all, self._idle = self._all, [], []
        for service in services:
            service.close()

    def _build(self) -> DriveClient:
        # build_http(), not httplib2.Http(): it leaves 308 out of redirect codes, which resumable uploads
        # need (GCP_FACTS gotcha 3).
        transport = build_http()
        transport.timeout = self.http_timeout  # each new socket gets it: a stalled answer raises TimeoutError
        http = google_auth_httplib2.AuthorizedHttp(self.credentials, http=transport)
        if self.endpoint:
            doc = json.loads(get_static_doc("drive", "v3") or "{}")
            root = self.endpoint if self.endpoint.endswith("/") else self.endpoint + "/"
            doc["rootUrl"] = doc["mtlsRootUrl"] = root
            doc["baseUrl"] = root + doc.get("servicePath", "drive/v3/")
            return DriveClient(build_from_document(doc, http=http))
        return DriveClient(build("drive", "v3", http=http, cache_discovery=False, static_discovery=True))

    def sleep(self, seconds: float) -> None:
        """A retry pause, capped (tests keep the cap short)."""
        time.sleep(min(seconds, self.max_retry_sleep))

    def execute(self, make: Callable[[Any], Any], *, what: str, writing: bool = False) -> Any:
        """Build a request with `make(client)` and run it with googleapiclient's retries; map what still
        fails to the taxonomy."""
        for attempt in range(TRANSPORT_ATTEMPTS):
            try:
                with self.client() as service:
                    request = make(service)
                    request._sleep = self.sleep  # GCP_FACTS §1: the documented hook for the retry sleep
                    return request.execute(num_retries=NUM_RETRIES)
            except HttpError as exc:
                raise map_http_error(exc, what=what, identity=self.identity, writing=writing) from exc
            except TRANSPORT_ERRORS as exc:
                # A dropped connection the client did not retry itself (GCP_FACTS §1): try again.
                if attempt == TRANSPORT_ATTEMPTS - 1:
                    raise transport_error(exc) from exc
                self.sleep(random.uniform(0.1, 1.0) * 2**attempt)  # noqa: S311 - jitter
        raise AssertionError("unreachable")  # pragma: no cover

    def guard(self, call: Callable[[], Any], *, what: str, writing: bool = False) -> Any:
        """Map errors of a multi-request operation (downloads, resumable uploads) to the taxonomy."""
        try:
            return call()
        except DicomflowError:
            raise
        except HttpError as exc:
            raise map_http_error(exc, what=what, identity=self.identity, writing=writing) from exc
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc) from exc

    # --- adapters -------------------------------------------------------------------------------------

    def source(self) -> Any:
        from dicomflow.adapters.drive.source import DriveSource  # noqa: PLC0415

        return DriveSource(self)

    def sink(self) -> Any:
        from dicomflow.adapters.drive.sink import DriveSink  # noqa: PLC0415

        return DriveSink(self)

    def change_feed(self) -> DriveChangeFeed:
        return DriveChangeFeed(self)


class DriveClient:
    """A Drive service with its collections built once: `service.files` builds a new Resource (every
    method parsed from the discovery document) on each call, which cost ~5 ms per downloaded file."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.files = service.files()
        self.changes = service.changes()
        self.channels = service.channels()

    def close(self) -> None:
        self.service.close()


_ALL_DRIVES = {"supportsAllDrives": True}


class DriveChangeFeed:
    """Drive's changes feed and push channels (GCP_FACTS §1 'changes', §2)."""

    def __init__(self, drive: DriveConnection) -> None:
        self._drive = drive

    def start_page_token(self) -> str:
        data = self._drive.execute(lambda s: s.changes.getStartPageToken(**_ALL_DRIVES), what="the changes feed")
        return str(data["startPageToken"])

    def changes(self, page_token: str) -> ChangePage:
        data = self._drive.execute(
            lambda s: s.changes.list(
                pageToken=page_token,
                pageSize=1000,
                includeRemoved=True,
                includeItemsFromAllDrives=True,
                spaces="drive",
                fields="nextPageToken,newStartPageToken,changes(fileId,removed,file(mimeType,parents,trashed))",
                **_ALL_DRIVES,
            ),
            what="the changes feed",
        )
        changes = []
        for raw in data.get("changes") or ():
            file = raw.get("file") or {}
            changes.append(
                DriveChange(
                    file_id=str(raw.get("fileId", "")),
                    removed=bool(raw.get("removed", False)),
                    trashed=bool(file.get("trashed", False)),
                    mime_type=str(file.get("mimeType", "")),
                    parents=tuple(file.get("parents") or ()),
                )
            )
        return ChangePage(
            tuple(changes), str(data.get("nextPageToken") or ""), str(data.get("newStartPageToken") or "")
        )

    def file_info(self, file_id: str) -> FileInfo:
        data = self._drive.execute(
            lambda s: s.files.get(fileId=file_id, fields="id,name,mimeType,parents,trashed", **_ALL_DRIVES),
            what=f"file {file_id}",
        )
        return FileInfo(file_id, str(data.get("name", "")), str(data.get("mimeType", "")),
                        tuple(data.get("parents") or ()), bool(data.get("trashed", False)))  # fmt: skip

    def watch(self, channel_id: str, address: str, token: str, page_token: str, expires_at: float) -> tuple[str, float]:
        body = {
            "id": channel_id,
            "type": "web_hook",
            "address": address,
            "token": token,
            "expiration": str(int(expires_at * 1000)),  # Unix milliseconds (GCP_FACTS §1)
        }
        data = self._drive.execute(
            lambda s: s.changes.watch(
                pageToken=page_token, body=body, includeItemsFromAllDrives=True, includeRemoved=True, **_ALL_DRIVES
            ),
            what="a changes channel",
        )
        return str(data["resourceId"]), int(data.get("expiration", 0)) / 1000.0

    def stop(self, channel_id: str, resource_id: str) -> None:
        self._drive.execute(
            lambda s: s.channels.stop(body={"id": channel_id, "resourceId": resource_id}),
            what=f"channel {channel_id}",
        )
