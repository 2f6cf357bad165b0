"""The failure taxonomy: what went wrong, whether retrying can help, and what the user should do.

Every error that can reach a user is one of these. The edges map them: a `PermanentError` is recorded
and answered with 2xx (the task must not be retried blindly), a `TransientError` is answered with 5xx
so the queue retries it (DESIGN.md §5, invariant 4). The `reason` is written for a clinician, not a
developer: it says what happened and what to do, and never contains patient identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Failure:
    """A recorded failure: stable `code` for machines, plain-language `reason` for people."""

    code: str
    reason: str
    permanent: bool
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "reason": self.reason, "permanent": self.permanent, "detail": self.detail}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Failure:
        return cls(
            code=str(data["code"]),
            reason=str(data["reason"]),
            permanent=bool(data["permanent"]),
            detail=str(data.get("detail", "")),
        )


class DicomflowError(Exception):
    """Base of every error dicomflow raises on purpose."""

    code: ClassVar[str] = "error"
    permanent: ClassVar[bool] = True

    def __init__(self, reason: str, *, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail

    def to_failure(self) -> Failure:
        return Failure(code=self.code, reason=self.reason, permanent=self.permanent, detail=self.detail)


class PermanentError(DicomflowError):
    """Retrying cannot help: the input or the configuration must change first."""

    code = "permanent"
    permanent = True


class TransientError(DicomflowError):
    """The same request may succeed later (rate limits, outages, a crashed or killed converter)."""

    code = "transient"
    permanent = False


# --- input and configuration -------------------------------------------------------------------


class InvalidInput(PermanentError):
    """A request, option or task body is malformed. `field` names the offending field."""

    code = "invalid_input"

    def __init__(self, reason: str, *, field: str = "", detail: str = "") -> None:
        super().__init__(reason, detail=detail)
        self.field = field


class NotFound(PermanentError):
    """A batch, item or watch that does not exist."""

    code = "not_found"


class Conflict(PermanentError):
    """The request contradicts the current state (e.g. an idempotency key reused with another body)."""

    code = "conflict"


class Unauthenticated(PermanentError):
    """The caller did not prove who they are: no bearer token, or one that fails verification (HTTP 401).
    The reason never repeats the token."""

    code = "unauthenticated"


class Forbidden(PermanentError):
    """The caller is known but may not do this: a folder outside the roots granted to them, a task
    delivered by someone other than the tasks service account (HTTP 403). The reason names only what the
    caller may see (their own roots), never a file they cannot access."""

    code = "forbidden"

    def __init__(self, reason: str, *, field: str = "", detail: str = "") -> None:
        super().__init__(reason, detail=detail)
        self.field = field


class QuotaExceeded(PermanentError):
    """A per-submitter limit was reached: too many unfinished batches, or a batch with more files or bytes
    than allowed (the batch API answers 429; an expansion fails with this reason)."""

    code = "quota_exceeded"


class ConfigError(PermanentError):
    """A setting is missing or invalid; raised at start-up, before any work is accepted."""

    code = "config_error"


# --- sources and destinations ------------------------------------------------------------------


class SourceNotFound(PermanentError):
    """The source folder or file does not exist (or is not visible to the account in use)."""

    code = "source_not_found"


class AccessDenied(PermanentError):
    """The account in use may not read the source or write the destination."""

    code = "access_denied"


class StorageQuotaExceeded(PermanentError):
    """The destination refuses new files for lack of quota (e.g. a service account writing to My Drive)."""

    code = "storage_quota_exceeded"


class DestinationConflict(PermanentError):
    """An output would replace a file that dicomflow did not write."""

    code = "destination_conflict"


class DestinationNotWritable(PermanentError):
    """The destination exists but cannot be written (permissions, read-only file system)."""

    code = "destination_not_writable"


class DiskFull(TransientError):
    """No space left while writing; succeeds once space is freed, so it is retried with backoff."""

    code = "disk_full"


class RateLimited(TransientError):
    """An API answered 429 or a rate-limit 403."""

    code = "rate_limited"


class ServiceUnavailable(TransientError):
    """An API answered 5xx, timed out or dropped the connection."""

    code = "service_unavailable"


class ChecksumMismatch(TransientError):
    """A downloaded file does not match the checksum its source reported; downloading again may fix it."""

    code = "checksum_mismatch"


# --- conversion --------------------------------------------------------------------------------


class SeriesTooLarge(PermanentError):
    """The series needs more memory/disk than this worker has; it is refused before any download."""

    code = "series_too_large"


class ConversionFailed(PermanentError):
    """dcm2niix refused the series for a reason in the data (missing slices, corrupt files, ...)."""

    code = "conversion_failed"


class ConverterCrashed(TransientError):
    """dcm2niix was killed (often out of memory) or crashed; another attempt may succeed."""

    code = "converter_crashed"


class ConverterTimeout(TransientError):
    """dcm2niix did not finish within the configured timeout."""

    code = "converter_timeout"


class SeriesChanged(TransientError):
    """The source files of a series changed between discovery and download (an upload in progress)."""

    code = "series_changed"


class AttemptOutOfTime(TransientError):
    """The attempt would not finish before its dispatch deadline: it stops and answers "retry" in time,
    rather than being re-dispatched by Cloud Tasks while still running (GCP_FACTS gotchas 11, 25)."""

    code = "attempt_out_of_time"


class WorkerInterrupted(TransientError):
    """The worker stopped (crash, OOM kill, lost lease) before finishing; found later by the reconciler."""

    code = "worker_interrupted"
