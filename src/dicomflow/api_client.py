"""A small client of the batch API for the CLI (`dicomflow submit`, `status --api`, `dlq --api`, `smoke`).

Authentication: every request carries an ID token (Authorization: Bearer) with the API URL as audience —
DICOMFLOW_API_TOKEN if set, else one minted from the caller's Google credentials (a service account; people
use `gcloud auth print-identity-token`). A token is a password for an hour: it is never sent over plain
http except to this machine (the dev stack on loopback).

Submissions are recoverable: each carries an Idempotency-Key (a new random one unless the caller gives
one), and a 503 or a connection that failed is retried with the *same* key, so a submission whose answer
was lost creates one batch, never two.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicomflow.domain.failures import ConfigError, DicomflowError, ServiceUnavailable

SUBMIT_ATTEMPTS = 4
RETRY_PAUSE_SECONDS = 1.0  # doubled after each failed attempt (1, 2, 4 s), or the answer's Retry-After


class ApiError(DicomflowError):
    """The API answered with a problem (4xx): the message is its detail, with the field at fault."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        field = problem.get("field")
        detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        super().__init__(f"{field}: {detail}" if field else str(detail))
        self.status = status
        self.problem = problem


class ApiUnavailable(ServiceUnavailable):
    """The API answered 5xx (`status`; `retry_after` is its Retry-After header, or "")."""

    def __init__(self, reason: str, *, status: int, retry_after: str) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _id_token(audience: str) -> str:
    try:
        import google.auth.transport.requests  # noqa: PLC0415 - only needed against a real deployment
        import google.oauth2.id_token  # noqa: PLC0415

        request = google.auth.transport.requests.Request()
        token: str = google.oauth2.id_token.fetch_id_token(request, audience)  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ConfigError(
            "could not get an ID token for the batch API from your Google credentials; set "
            "DICOMFLOW_API_TOKEN=$(gcloud auth print-identity-token) or use a service account key"
        ) from exc
    return token


@dataclass
class ApiClient:
    base_url: str
    token: str = ""
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"the API URL must start with http:// or https:// (got {self.base_url!r})")

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.token or ("" if _is_loopback(self.base_url) else _id_token(self.base_url))
        if token:
            if self.base_url.startswith("http://") and not _is_loopback(self.base_url):
                # A bearer token is as good as a password until it expires (RFC 6750 §5.3: TLS).
                raise ConfigError(
                    f"refusing to send your token over plain http to {self.base_url}: use https:// "
                    "(plain http is allowed only to this machine, e.g. the dev stack)"
                )
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        all_headers = self._headers() | (headers or {})
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method, headers=all_headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - URL checked above
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                problem = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                problem = {"detail": raw.decode(errors="replace")[:300]}
            if not isinstance(problem, dict):
                problem = {}
            if exc.code >= 500:
                detail = f"the batch API answered {exc.code}: {problem.get('detail', '')}"
                raise ApiUnavailable(detail, status=exc.code, retry_after=exc.headers.get("Retry-After", "")) from None
            raise ApiError(exc.code, problem) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise ServiceUnavailable(f"cannot reach the batch API at {self.base_url}: {exc}") from None

    def submit(self, body: dict[str, Any], idempotency_key: str = "") -> dict[str, Any]:
        """POST /batches with an Idempotency-Key (a new one unless given); a 503 or a failed connection is
        tried again with the same key, up to SUBMIT_ATTEMPTS times in all."""
        key = idempotency_key or secrets.token_urlsafe(24)
        pause = RETRY_PAUSE_SECONDS
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                result: dict[str, Any] = self.request("POST", "/batches", body, {"Idempotency-Key": key})
            except ServiceUnavailable as exc:
                # 503 = not done, try again; a connection error may have lost the answer: the key makes the
                # repeat return the batch if it was created. Other 5xx (500: a bug) are not repeated.
                status = exc.status if isinstance(exc, ApiUnavailable) else 503
                if status != 503 or attempt == SUBMIT_ATTEMPTS - 1:
                    raise
                after = exc.retry_after if isinstance(exc, ApiUnavailable) else ""
                self.sleep(min(30.0, float(after)) if after.isdigit() else pause)
                pause *= 2
                continue
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def status(self, batch_id: str, **params: str) -> dict[str, Any]:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        result: dict[str, Any] = self.request("GET", f"/batches/{urllib.parse.quote(batch_id)}{query}")
        return result

    def batches(self, limit: int = 10) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", f"/batches?limit={limit}")["batches"]
        return result

    def retry_dead_letters(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/batches/{urllib.parse.quote(batch_id)}:retry-dead-letters")
        return result

    def cancel(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/batches/{urllib.parse.quote(batch_id)}:cancel")
        return result

    def add_watch(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/watches", body)
        return result

    def watches(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/watches")["watches"]
        return result

    def stop_watch(self, channel_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/watches/{urllib.parse.quote(channel_id)}:stop")
        return result
