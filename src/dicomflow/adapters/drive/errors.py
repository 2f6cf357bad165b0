"""Drive API errors → dicomflow's failure taxonomy, with what to do (DESIGN.md §5, GCP_FACTS §1).

Transient (retried): 429, 5xx, 403 userRateLimitExceeded/rateLimitExceeded, dropped connections.
Permanent, with a fix the user can apply: 404 (not found or not shared), 403 insufficientFilePermissions,
storageQuotaExceeded (service accounts own no Drive storage).
"""

from __future__ import annotations

import json
from typing import Any

from dicomflow.domain.failures import (
    AccessDenied,
    DestinationNotWritable,
    DicomflowError,
    PermanentError,
    RateLimited,
    ServiceUnavailable,
    SourceNotFound,
    StorageQuotaExceeded,
)

RATE_LIMIT_REASONS = frozenset({"userRateLimitExceeded", "rateLimitExceeded"})


def error_reason(exc: Any) -> str:
    """The first `error.errors[].reason` of a googleapiclient HttpError, or ''."""
    details = getattr(exc, "error_details", None)
    if isinstance(details, list) and details and isinstance(details[0], dict):
        return str(details[0].get("reason", ""))
    try:
        body = json.loads(getattr(exc, "content", b"") or b"{}")
        return str(body["error"]["errors"][0]["reason"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def map_http_error(exc: Any, *, what: str, identity: str, writing: bool = False) -> DicomflowError:
    """`what` names the object for a person ("source folder 1AbC…"); `identity` is the account in use."""
    status = int(getattr(getattr(exc, "resp", None), "status", 0) or getattr(exc, "status_code", 0) or 0)
    reason = error_reason(exc)
    who = identity or "the account dicomflow uses"
    if status == 429 or (status == 403 and reason in RATE_LIMIT_REASONS):
        return RateLimited(f"Google Drive is rate-limiting requests ({reason or status}); it will be retried")
    if status >= 500:
        return ServiceUnavailable(f"Google Drive answered {status}; it will be retried")
    if status == 404:
        cls = DestinationNotWritable if writing else SourceNotFound
        return cls(f"{what} was not found, or is not shared with {who}. Check the id, and share the folder with {who}.")
    if status == 403 and reason == "storageQuotaExceeded":
        return StorageQuotaExceeded(
            f"Google Drive refused to store {what}: {who} has no storage quota (service accounts own no Drive "
            "storage). Write into a shared drive the account is a member of, or run with user OAuth "
            "(dicomflow auth)."
        )
    if status == 403 and reason in ("teamDriveFileLimitExceeded", "numChildrenInNonRootLimitExceeded"):
        return PermanentError(f"Google Drive refused {what}: a folder or shared drive is full ({reason})")
    if status in (401, 403):
        verb = "write to" if writing else "read"
        return AccessDenied(
            f"{who} may not {verb} {what} (Drive: {reason or status}). Share it with {who}"
            + (" as an Editor." if writing else ".")
        )
    return PermanentError(f"Google Drive rejected a request about {what} ({status} {reason}).")


def transport_error(exc: BaseException) -> DicomflowError:
    return ServiceUnavailable(f"the connection to Google Drive failed ({type(exc).__name__}); it will be retried")
