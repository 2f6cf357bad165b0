"""Log records that can quote names are redacted before any handler formats them (docs/privacy.md, "Logs").

dicomflow's own events carry ids and counts only. The libraries it uses do not promise that:

* google-api-python-client (logger `googleapiclient.http`) logs at WARNING, on every retry,
  "Sleeping %.2f seconds before retry %d of %d for %s: %s %s, after %s" with the request URI, whose `q=`
  query can hold a Drive folder or file name (`name = 'SMITH^JOHN'`); "Retry #%d for media upload: %s
  %s" is formatted before it is logged; "Invalid JSON content from response: %s" logs a response body;
  `googleapiclient.discovery` logs every URL at DEBUG; an `HttpError` renders as
  `<HttpError 404 when requesting <URI with query> returned "...">`, so a traceback of one quotes it too;
* pydicom (logger `pydicom`) logs and warns with the offending header value ("Invalid value for VR PN:
  '...'"); `logging.captureWarnings(True)` sends warnings to the `py.warnings` logger;
* urllib3 logs retried URLs with their query strings.

`RedactingFilter`, attached to every handler (`guard`), rewrites each record in place, at every level:
URL query strings become `?[redacted]` in every record; in records of other libraries quoted text becomes
`'[redacted]'` too, and pydicom's messages are replaced whole; exception text (the messages, not the code
lines of the traceback) is redacted the same way and moved into the message, so every formatter shows the
redacted version and none can render the original exception again.
"""

from __future__ import annotations

import logging
import re
import traceback
from typing import Final

__all__ = ["RedactingFilter", "guard", "redact_queries", "redact_quoted"]

# A URL (absolute, or a path as urllib3 logs it) followed by a query string.
_QUERY: Final = re.compile(
    r"((?:[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*|(?<![^\s(\[=:'\"])/[^\s?#'\"<>]*)\?)[^\s'\"<>]+"
)
_QUOTED: Final = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
_PYDICOM_MESSAGE: Final = (
    "pydicom reported a problem with a DICOM value (details withheld: they can quote header values)"
)


def redact_queries(text: str) -> str:
    """Every URL keeps its scheme, host and path; its query string (Drive's `q=`) is withheld."""
    return _QUERY.sub(r"\1[redacted]", text)


def redact_quoted(text: str) -> str:
    """Quoted text (a name in a Drive query, a value in a JSON body) is withheld."""
    return _QUOTED.sub("'[redacted]'", text)


def _is_ours(name: str) -> bool:
    return name in ("dicomflow", "root") or name.startswith("dicomflow.")


def _is_pydicom(name: str) -> bool:
    return name == "pydicom" or name.startswith("pydicom.")


def _exception_text(exc: BaseException) -> str:
    lines = []
    for chunk in traceback.TracebackException.from_exception(exc).format():
        for line in chunk.splitlines():
            # Indented lines are frames and source code; the others are exception messages (with chained
            # ones), which is where an HttpError puts its URI.
            if line.startswith("  "):
                lines.append(line)
                continue
            redacted = redact_queries(line)
            lines.append(redact_quoted(redacted))
    return "\n".join(lines)


class RedactingFilter(logging.Filter):
    """Redacts URL queries, quoted values and exception messages; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = _is_ours(record.name)
        if _is_pydicom(record.name):
            message = _PYDICOM_MESSAGE
        else:
            message = redact_queries(record.getMessage())
            if not ours:
                message = redact_quoted(message)
        if record.exc_info:
            exc = record.exc_info[1]
            if exc is not None:
                message = f"{message}\n{_exception_text(exc)}"
            record.exc_info = None
            record.exc_text = None
        if record.stack_info:
            record.stack_info = redact_queries(record.stack_info)
        record.msg = message
        record.args = None
        return True


def guard(target: logging.Handler | logging.Logger) -> None:
    """Attach the filter once. On a handler it sees the records propagated from every logger (a logger's
    own filters do not); it goes first, before any filter that copies the message elsewhere. On a logger
    it covers the records created on that logger, whatever handlers end up emitting them."""
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.filters.insert(0, RedactingFilter())
