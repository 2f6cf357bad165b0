"""A small client of the batch API for the CLI (`dicomflow submit`, `status --api`, `dlq --api`).

Authentication: the batches function only admits `var.submitters` (IAM), so requests carry an ID token
with the API URL as audience — DICOMFLOW_API_TOKEN if set, else one minted from the caller's Google
credentials (a service account, or `gcloud auth print-identity-token` for people). Loopback URLs (the
dev stack) need none.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from dicomflow.domain.failures import ConfigError, DicomflowError, ServiceUnavailable


class ApiError(DicomflowError):
    """The API answered with a problem (4xx): the message is its detail, with the field at fault."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        field = problem.get("field")
        detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        super().__init__(f"{field}: {detail}" if field else str(detail))
        self.status = status
        self.problem = problem


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


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

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"the API URL must start with http:// or https:// (got {self.base_url!r})")

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.token or ("" if _is_loopback(self.base_url) else _id_token(self.base_url))
        if token:
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
            if exc.code >= 500:
                raise ServiceUnavailable(f"the batch API answered {exc.code}: {problem.get('detail', '')}") from None
            raise ApiError(exc.code, problem if isinstance(problem, dict) else {}) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise ServiceUnavailable(f"cannot reach the batch API at {self.base_url}: {exc}") from None

    def submit(self, body: dict[str, Any], idempotency_key: str = "") -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        result: dict[str, Any] = self.request("POST", "/batches", body, headers)
        return result

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
