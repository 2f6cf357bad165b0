"""A protocol-level fake of the Google Drive API v3, served over real HTTP on loopback.

The real ``google-api-python-client`` talks to it unmodified (see :func:`build_drive_client`), so tests
exercise the same URLs, headers, status codes and JSON bodies the adapter meets in production. Facts
about Drive and about the client are taken from ``docs/GCP_FACTS.md`` (cited as "FACTS §n") and from the
client's own source (``googleapiclient/http.py``, ``discovery.py``).

Design rules:

* **Faithful** where the client or Drive behave in a specific way: resumable uploads answer ``200`` +
  ``Location`` on initiation and ``308`` + ``Range`` per chunk, downloads answer ``206`` +
  ``Content-Range``, errors use Drive's JSON shape so ``HttpError.error_details`` and the client's retry
  logic (which parses ``error.errors[0].reason``) behave as in production.
* **Strict** where Drive is strict, so adapter bugs surface: non-final upload chunks must be multiples
  of 256 KiB, ``files.list`` returns trashed files and only ``kind,id,name,mimeType`` unless asked,
  unknown ``q`` syntax and unknown ``fields`` are 400s, ``parents`` is not writable on update, page
  tokens are opaque, pages may be short or empty.
* **Deterministic**: ids, message-number gaps and probabilistic faults come from seeded RNGs; time comes
  from the injectable ``clock``.

Only the standard library is used by the server itself; :func:`build_drive_client` imports the Google
client lazily.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import http.client
import json
import os
import random
import re
import socket
import string
import struct
import threading
import time
import traceback
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from email.message import Message
    from types import TracebackType

__all__ = [
    "FOLDER_MIME",
    "GOOGLE_DOC_MIME",
    "UPLOAD_CHUNK_GRANULARITY",
    "Delivery",
    "DriveError",
    "FakeDrive",
    "FaultRule",
    "Faults",
    "RequestRecord",
    "build_drive_client",
]

FOLDER_MIME = "application/vnd.google-apps.folder"
GOOGLE_DOC_MIME = "application/vnd.google-apps.document"
GOOGLE_APPS_PREFIX = "application/vnd.google-apps."
DEFAULT_MIME = "application/octet-stream"
#: Drive wants every non-final resumable chunk to be a multiple of 256 KiB (FACTS §1, gotcha 4).
UPLOAD_CHUNK_GRANULARITY = 256 * 1024
#: What ``Faults.add(network=...)`` can do to an answer besides refusing it.
NETWORK_FAULTS = ("fin", "rst", "stall", "short")
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
CHANGES_CHANNEL_MAX_SECONDS = 604_800  # FACTS §2 "Lifetime"
FILES_CHANNEL_MAX_SECONDS = 86_400
DEFAULT_CHANNEL_SECONDS = 3_600
RESUMABLE_SESSION_TTL_SECONDS = 7 * 86_400  # "A resumable session URI expires after one week." (FACTS §1)
#: Drive's custom-properties guide: key + value of one property must fit in 124 bytes (UTF-8).
PROPERTY_MAX_BYTES = 124
NOTIFY_SUCCESS_STATUSES = frozenset({102, 200, 201, 202, 204})  # FACTS §2 "Response"
NOTIFY_RETRY_STATUSES = frozenset({500, 502, 503, 504})
APIS_GOOGLE_USER_AGENT = "APIs-Google; (+https://developers.google.com/webmasters/APIs-Google.html)"
REAL_API_ROOT = "https://www.googleapis.com/drive/v3/"

_META_PREFIX = "/drive/v3/"
_UPLOAD_PREFIX = "/upload/drive/v3/"
_ID_ALPHABET = string.ascii_letters + string.digits + "-_"
_ALNUM = string.ascii_letters + string.digits
_JSON_TYPE = "application/json; charset=UTF-8"
_STATUS_PHRASES = {308: "Resume Incomplete"}  # what Google sends instead of "Permanent Redirect"
_LOGGED_HEADERS = (
    "range",
    "content-range",
    "content-length",
    "content-type",
    "x-upload-content-length",
    "x-upload-content-type",
    "x-http-method-override",
)

#: Every property of the v3 ``File`` schema (discovery doc rev 20261106). ``fields=`` naming anything
#: else is a 400, like Drive ("Invalid field selection"), which catches typos such as ``md5checksum``.
FILE_FIELDS = frozenset(
    {
        "appProperties", "capabilities", "clientEncryptionDetails", "contentHints", "contentRestrictions",
        "copyRequiresWriterPermission", "createdTime", "description", "downloadRestrictions", "driveId",
        "explicitlyTrashed", "exportLinks", "fileExtension", "folderColorRgb", "fullFileExtension",
        "hasAugmentedPermissions", "hasThumbnail", "headRevisionId", "iconLink", "id", "imageMediaMetadata",
        "inheritedPermissionsDisabled", "isAppAuthorized", "kind", "labelInfo", "lastModifyingUser",
        "linkShareMetadata", "md5Checksum", "mimeType", "modifiedByMe", "modifiedByMeTime", "modifiedTime",
        "name", "originalFilename", "ownedByMe", "owners", "parents", "permissionIds", "permissions",
        "properties", "quotaBytesUsed", "resourceKey", "sha1Checksum", "sha256Checksum", "shared",
        "sharedWithMeTime", "sharingUser", "shortcutDetails", "size", "spaces", "starred", "teamDriveId",
        "thumbnailLink", "thumbnailVersion", "trashed", "trashedTime", "trashingUser", "version",
        "videoMediaMetadata", "viewedByMe", "viewedByMeTime", "viewersCanCopyContent", "webContentLink",
        "webViewLink", "writersCanShare",
    }
)  # fmt: skip

# Fields a client may set; everything else in FILE_FIELDS is output-only (403 fieldNotWritable).
_COMMON_WRITABLE = frozenset(
    {
        "kind", "name", "mimeType", "appProperties", "properties", "description", "starred",
        "originalFilename", "modifiedTime", "folderColorRgb", "contentHints", "copyRequiresWriterPermission",
        "writersCanShare", "viewedByMeTime", "contentRestrictions", "inheritedPermissionsDisabled",
        "downloadRestrictions",
    }
)  # fmt: skip
_CREATE_WRITABLE = _COMMON_WRITABLE | {"id", "parents", "createdTime", "shortcutDetails"}
_UPDATE_WRITABLE = _COMMON_WRITABLE | {"trashed"}

# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


class DriveError(Exception):
    """A Drive API error; rendered as ``{"error": {"errors": [...], "code": N, "message": ...}}``.

    The client's retry helper reads ``error.errors[0].reason`` to decide whether a 403 is a rate limit
    (FACTS §1 "Python client retry"), and ``HttpError.error_details`` is the ``errors`` list.
    """

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        domain: str = "global",
        location: str | None = None,
        location_type: str = "parameter",
    ) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.domain = domain
        self.location = location
        self.location_type = location_type

    def to_json(self) -> dict[str, Any]:
        """Drive's error body."""
        item: dict[str, Any] = {"domain": self.domain, "reason": self.reason, "message": self.message}
        if self.location is not None:
            item["locationType"] = self.location_type
            item["location"] = self.location
        return {"error": {"errors": [item], "code": self.code, "message": self.message}}


_REASON_TEXT: dict[str, tuple[str, str]] = {
    "userRateLimitExceeded": ("usageLimits", "User Rate Limit Exceeded"),
    "rateLimitExceeded": ("usageLimits", "Rate Limit Exceeded"),
    "dailyLimitExceeded": ("usageLimits", "Daily Limit Exceeded"),
    "sharingRateLimitExceeded": ("usageLimits", "Rate limit exceeded. User message: Sharing rate limit."),
    "storageQuotaExceeded": (
        "usageLimits",
        "Service Accounts do not have storage quota. Leverage shared drives "
        "(https://developers.google.com/workspace/drive/api/guides/about-shareddrives), or use OAuth "
        "delegation (http://support.google.com/a/answer/7281227) instead.",
    ),
    "insufficientFilePermissions": ("global", "The user does not have sufficient permissions for this file."),
    "backendError": ("global", "Backend Error"),
    "internalError": ("global", "Internal Error"),
    "badGateway": ("global", "Bad Gateway"),
    "notFound": ("global", "File not found."),
    "badRequest": ("global", "Bad Request"),
    "authError": ("global", "Invalid Credentials"),
}
_STATUS_DEFAULT_REASON = {
    400: "badRequest",
    401: "authError",
    403: "rateLimitExceeded",
    404: "notFound",
    429: "rateLimitExceeded",
    500: "backendError",
    502: "badGateway",
    503: "backendError",
    504: "backendError",
}


def drive_error(status: int, reason: str | None = None) -> DriveError:
    """Build the error Drive sends for ``status``/``reason`` (reason defaults by status)."""
    reason = reason or _STATUS_DEFAULT_REASON.get(status, "backendError")
    domain, message = _REASON_TEXT.get(reason, ("global", reason))
    return DriveError(status, reason, message, domain=domain)


def _not_found(file_id: str) -> DriveError:
    return DriveError(404, "notFound", f"File not found: {file_id}.", location="fileId")


def _invalid(location: str, message: str = "Invalid Value") -> DriveError:
    return DriveError(400, "invalid", message, location=location)


def _bad_request(message: str) -> DriveError:
    return DriveError(400, "badRequest", message)


def _no_write_permission() -> DriveError:
    return drive_error(403, "insufficientFilePermissions")


# ----------------------------------------------------------------------------------------------------
# Records exposed to tests
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One HTTP request the fake received (appended after the response was decided)."""

    method: str
    path: str
    query: dict[str, str]
    raw_query: str
    headers: dict[str, str]  # lower-cased names, only those in _LOGGED_HEADERS
    has_authorization: bool
    body_size: int
    status: int | None  # None: the connection was dropped without an answer
    fault: bool  # a fault rule fired on this request

    @property
    def url(self) -> str:
        """Path plus query string, as matched by ``path_contains``."""
        return f"{self.path}?{self.raw_query}" if self.raw_query else self.path


@dataclass(frozen=True)
class Delivery:
    """One attempt to POST a push notification to a channel's address."""

    channel_id: str
    message_number: int
    resource_state: str
    address: str
    headers: dict[str, str]
    attempt: int
    status: int | None  # None: transport error (see ``error``)
    error: str | None
    time: float


# ----------------------------------------------------------------------------------------------------
# Fault injection
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    status: int | None
    reason: str | None
    drop: bool
    # What the network does besides dropping before the answer (see ``Faults.add``): ``"fin"``/``"rst"``
    # cut the real answer mid-body, ``"stall"`` answers nothing for ``stall_seconds`` and then closes,
    # ``"short"`` answers a ranged download with fewer bytes than asked (a valid, shorter 206).
    network: str | None = None


@dataclass
class FaultRule:
    """A fault rule; ``hits`` counts how often it fired."""

    method: str | None
    path_contains: str | None
    outcomes: tuple[_Outcome, ...]
    times: int | None
    probability: float | None
    after_processing: bool
    hits: int = 0

    def matches(self, method: str, url: str) -> bool:
        """Whether the rule applies to this request (before probability and ``times``)."""
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path_contains is None or self.path_contains in url

    @property
    def exhausted(self) -> bool:
        """A rule with ``times=N`` stops after firing N times."""
        return self.times is not None and self.hits >= self.times


@dataclass(frozen=True)
class _FaultHit:
    outcome: _Outcome
    after_processing: bool


class Faults:
    """Seeded fault injection for HTTP requests (not for direct helpers)."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._rng = random.Random(seed)

    def add(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        *,
        status: int = 503,
        reason: str | None = None,
        times: int | None = None,
        probability: float | None = None,
        drop_connection: bool = False,
        after_processing: bool = False,
        network: str | None = None,
    ) -> FaultRule:
        """Inject ``status`` (with Drive's body for ``reason``) or drop the connection.

        ``path_contains`` is matched against ``path?query``, so ``"uploadType=resumable"`` or
        ``"upload_id="`` work. ``after_processing=True`` performs the request first and then fails or
        drops it, like a Drive backend that commits and then times out (duplicates on client retry).

        ``network`` injects what a real network does to an answer instead: ``"fin"`` sends the status
        line, the headers (with the full Content-Length) and half the body, then closes cleanly — the
        client's ``http.client`` raises ``IncompleteRead``; ``"rst"`` does the same and then resets the
        connection (``SO_LINGER`` 0) — ``ConnectionResetError``; ``"stall"`` sends nothing for
        ``FakeDrive.stall_seconds`` and closes — a client with a shorter timeout raises ``TimeoutError``;
        ``"short"`` answers a ranged download (``Range`` header) with a valid ``206`` carrying half the
        bytes asked (other requests get ``"fin"``). The request is processed first for ``fin``, ``rst``
        and ``short``, as the server had answered when the network failed.
        """
        if network not in (None, *NETWORK_FAULTS):
            raise ValueError(f"network must be one of {NETWORK_FAULTS}, not {network!r}")
        rule = FaultRule(
            method=method,
            path_contains=path_contains,
            outcomes=(_Outcome(None if drop_connection or network else status, reason, drop_connection, network),),
            times=times,
            probability=probability,
            after_processing=after_processing,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def add_mix(
        self, probability: float, method: str | None = None, path_contains: str | None = None, *, network: bool = False
    ) -> FaultRule:
        """Random mix of 429, 403 rate limits, 500, 503 and dropped connections on a fraction of requests;
        with ``network=True`` also answers cut mid-body (FIN and RST), stalls and short reads (see ``add``)."""
        outcomes: tuple[_Outcome, ...] = (
            _Outcome(429, "rateLimitExceeded", False),
            _Outcome(403, "userRateLimitExceeded", False),
            _Outcome(403, "rateLimitExceeded", False),
            _Outcome(500, "backendError", False),
            _Outcome(503, "backendError", False),
            _Outcome(None, None, True),
        )
        if network:
            outcomes += tuple(_Outcome(None, None, False, kind) for kind in NETWORK_FAULTS)
        rule = FaultRule(method, path_contains, outcomes, None, probability, after_processing=False)
        with self._lock:
            self._rules.append(rule)
        return rule

    def reseed(self, seed: int) -> None:
        """Restart the random sequence used for probabilities and mixes."""
        with self._lock:
            self._rng = random.Random(seed)

    def clear(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[FaultRule]:
        """Snapshot of the rules."""
        with self._lock:
            return list(self._rules)

    def pick(self, method: str, url: str) -> _FaultHit | None:
        """First matching, non-exhausted rule that fires for this request, if any."""
        with self._lock:
            for rule in self._rules:
                if rule.exhausted or not rule.matches(method, url):
                    continue
                if rule.probability is not None and self._rng.random() >= rule.probability:
                    continue
                rule.hits += 1
                outcome = rule.outcomes[0] if len(rule.outcomes) == 1 else self._rng.choice(rule.outcomes)
                return _FaultHit(outcome, rule.after_processing)
        return None


# ----------------------------------------------------------------------------------------------------
# Internal state
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Node:
    id: str
    name: str
    mime_type: str
    parent: str | None
    drive_id: str | None  # shared drive this item lives in; None = My Drive
    seq: int
    created: float
    modified: float
    content: bytes | None = None
    app_properties: dict[str, str] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    starred: bool = False
    explicitly_trashed: bool = False
    trashed_time: float | None = None
    version: int = 1
    head_revision_id: str | None = None
    md5: str | None = None
    sha1: str | None = None
    sha256: str | None = None
    original_filename: str | None = None
    is_root: bool = False

    @property
    def is_folder(self) -> bool:
        return self.mime_type == FOLDER_MIME

    @property
    def is_google_type(self) -> bool:
        return self.mime_type.startswith(GOOGLE_APPS_PREFIX)


@dataclass(frozen=True)
class _ChangeEntry:
    position: int
    file_id: str
    time: float
    drive_id: str | None


@dataclass
class _Channel:
    id: str
    resource_id: str
    resource_uri: str
    address: str
    token: str | None
    expiration_ms: int
    kind: Literal["changes", "file"]
    file_id: str | None
    include_all_drives: bool
    drive_id: str | None
    restrict_to_my_drive: bool
    last_number: int = 1
    stopped: bool = False


@dataclass(frozen=True)
class _Notification:
    channel: _Channel
    number: int
    state: str
    changed: str | None


@dataclass
class _UploadSession:
    upload_id: str
    target_file_id: str | None  # None: files.create, else files.update of this id
    metadata: dict[str, Any]
    params: dict[str, str]
    declared_length: int | None
    declared_mime: str | None
    created: float
    data: bytearray = field(default_factory=bytearray)
    result_id: str | None = None


@dataclass
class _ListCursor:
    signature: tuple[Any, ...]
    offset: int
    page_index: int


@dataclass
class _CreatePlan:
    name: str
    mime_type: str
    parent: _Node
    app_properties: dict[str, str]
    properties: dict[str, str]
    description: str | None
    starred: bool
    original_filename: str | None
    created: float | None
    modified: float | None
    file_id: str | None


_UNSET: Any = object()


@dataclass
class _UpdatePlan:
    node: _Node
    name: str | None = None
    mime_type: str | None = None
    description: Any = _UNSET
    starred: bool | None = None
    original_filename: str | None = None
    app_properties: dict[str, str | None] | None = None
    properties: dict[str, str | None] | None = None
    trashed: bool | None = None
    new_parent: Any = _UNSET  # str | None when a move was requested
    modified: float | None = None


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    raw_query: str
    headers: Message
    body: bytes
    answered: Callable[[], None] | None = None  # what FakeDrive.intercept asked to hear once it is answered


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = _JSON_TYPE


def _json_response(obj: Any, status: int = 200) -> _Response:
    return _Response(status, json.dumps(obj).encode("utf-8"))


def _error_response(err: DriveError) -> _Response:
    return _json_response(err.to_json(), err.code)


def _rfc3339(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _parse_rfc3339(value: Any, location: str) -> float:
    if not isinstance(value, str):
        raise _invalid(location)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise _invalid(location) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# ----------------------------------------------------------------------------------------------------
# Partial responses (``fields=``)
# ----------------------------------------------------------------------------------------------------

Mask = dict[str, Any]  # name -> None (whole value) or a nested Mask

_FILE_SCHEMA: dict[str, Any] = dict.fromkeys(FILE_FIELDS)
_FILE_LIST_SCHEMA: dict[str, Any] = {
    "kind": None,
    "nextPageToken": None,
    "incompleteSearch": None,
    "files": _FILE_SCHEMA,
}
_CHANGE_SCHEMA: dict[str, Any] = {
    "changeType": None,
    "drive": None,
    "driveId": None,
    "file": _FILE_SCHEMA,
    "fileId": None,
    "kind": None,
    "removed": None,
    "teamDrive": None,
    "teamDriveId": None,
    "time": None,
    "type": None,
}
_CHANGE_LIST_SCHEMA: dict[str, Any] = {
    "kind": None,
    "nextPageToken": None,
    "newStartPageToken": None,
    "changes": _CHANGE_SCHEMA,
}
# What Drive v3 returns without ``fields=`` (FACTS §1 "Default fields").
_DEFAULT_FILE_MASK: Mask = {"kind": None, "id": None, "name": None, "mimeType": None}
_DEFAULT_LIST_MASK: Mask = {
    "kind": None,
    "incompleteSearch": None,
    "nextPageToken": None,
    "files": _DEFAULT_FILE_MASK,
}
_DEFAULT_CHANGES_MASK: Mask = {
    "kind": None,
    "nextPageToken": None,
    "newStartPageToken": None,
    "changes": {
        "kind": None,
        "type": None,
        "changeType": None,
        "time": None,
        "removed": None,
        "fileId": None,
        "driveId": None,
        "file": _DEFAULT_FILE_MASK,
    },
}


def _merge_mask(mask: Mask, path: list[str], sub: Mask | None) -> None:
    head, rest = path[0], path[1:]
    if rest:
        current = mask.get(head, {})
        if current is None:
            return  # already selecting the whole value
        mask[head] = current
        _merge_mask(current, rest, sub)
        return
    if head in mask:
        current = mask[head]
        if current is None or sub is None:
            mask[head] = None
        else:
            for key, value in sub.items():
                _merge_mask(current, [key], value)
    else:
        mask[head] = sub


def parse_fields(spec: str) -> Mask:
    """Parse a partial-response selector such as ``nextPageToken, files(id,name), files/size``."""
    pos = 0
    length = len(spec)

    def skip_ws() -> None:
        nonlocal pos
        while pos < length and spec[pos].isspace():
            pos += 1

    def parse_list() -> Mask:
        nonlocal pos
        mask: Mask = {}
        while True:
            skip_ws()
            start = pos
            while pos < length and spec[pos] not in ",()":
                pos += 1
            names = [part.strip() for part in spec[start:pos].split("/")]
            if not all(names):
                raise _invalid("fields", f"Invalid field selection {spec}")
            skip_ws()
            sub: Mask | None = None
            if pos < length and spec[pos] == "(":
                pos += 1
                sub = parse_list()
                if pos >= length or spec[pos] != ")":
                    raise _invalid("fields", f"Invalid field selection {spec}")
                pos += 1
            _merge_mask(mask, names, sub)
            skip_ws()
            if pos < length and spec[pos] == ",":
                pos += 1
                continue
            return mask

    result = parse_list()
    if pos != length:
        raise _invalid("fields", f"Invalid field selection {spec}")
    return result


def _validate_mask(mask: Mask, schema: dict[str, Any]) -> None:
    for key, sub in mask.items():
        if key == "*":
            continue
        if key not in schema:
            raise _invalid("fields", f"Invalid field selection {key}")
        if sub is not None and schema[key] is not None:
            _validate_mask(sub, schema[key])


def apply_mask(obj: Any, mask: Mask | None) -> Any:
    """Keep only the selected fields of ``obj`` (lists are filtered element-wise)."""
    if mask is None or "*" in mask:
        return obj
    if isinstance(obj, list):
        return [apply_mask(item, mask) for item in obj]
    if not isinstance(obj, dict):
        return obj
    return {key: apply_mask(obj[key], sub) for key, sub in mask.items() if key in obj}


# ----------------------------------------------------------------------------------------------------
# ``q`` query language (subset; FACTS §1 "q grammar")
# ----------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<str>'(?:[^'\\]|\\.)*')
    | (?P<op>!=|<=|>=|=|<|>)
    | (?P<punct>[(){}])
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE | re.DOTALL,
)
# Valid Drive search terms this fake does not implement: a 400 whose message says so, so nobody
# mistakes a fake limitation for an adapter bug.
_UNSUPPORTED_TERMS = frozenset(
    {"fullText", "sharedWithMe", "owners", "writers", "readers", "visibility", "shortcutDetails",
     "viewedByMeTime", "memberCount", "organizerCount", "hidden", "createdDate", "labels"}
)  # fmt: skip


class QueryError(Exception):
    """A ``q`` string the fake rejects (400 Invalid Value, like Drive)."""


@dataclass(frozen=True)
class _Tok:
    kind: str
    value: str
    pos: int


def _unescape(raw: str) -> str:
    """Drive strings escape ``'`` as ``\\'`` and ``\\`` as ``\\\\``; other escapes are rejected."""
    out: list[str] = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\":
            nxt = raw[i + 1]
            if nxt not in "'\\":
                raise QueryError(f"invalid escape \\{nxt}")
            out.append(nxt)
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _tokenize(q: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(q):
        m = _TOKEN_RE.match(q, pos)
        if m is None:
            raise QueryError(f"unexpected character {q[pos]!r} at {pos}")
        kind = m.lastgroup or ""
        if kind == "str":
            toks.append(_Tok("str", _unescape(m.group()[1:-1]), pos))
        elif kind != "ws":
            toks.append(_Tok(kind, m.group(), pos))
        pos = m.end()
    toks.append(_Tok("end", "", pos))
    return toks


Predicate = Callable[[_Node], bool]


def _name_contains(name: str, needle: str) -> bool:
    """Approximation of Drive's token-prefix matching for ``name contains`` (FACTS §1)."""
    name_l, needle_l = name.casefold(), needle.casefold()
    if name_l.startswith(needle_l):
        return True
    return any(tok.startswith(needle_l) for tok in re.split(r"[\s._\-]+", name_l) if tok)


class _QueryParser:
    """Recursive-descent parser producing a predicate over nodes (``or`` < ``and`` < ``not``)."""

    def __init__(self, q: str, resolve_id: Callable[[str], str], is_trashed: Predicate) -> None:
        self._toks = _tokenize(q)
        self._i = 0
        self._resolve_id = resolve_id
        self._is_trashed = is_trashed

    def parse(self) -> Predicate:
        pred = self._or()
        if self._peek().kind != "end":
            raise QueryError(f"unexpected {self._peek().value!r}")
        return pred

    def _peek(self) -> _Tok:
        return self._toks[self._i]

    def _next(self) -> _Tok:
        tok = self._toks[self._i]
        if tok.kind != "end":
            self._i += 1
        return tok

    def _keyword(self, word: str) -> bool:
        tok = self._peek()
        if tok.kind == "word" and tok.value.lower() == word:
            self._i += 1
            return True
        return False

    def _expect(self, kind: str, value: str | None = None) -> _Tok:
        tok = self._next()
        if tok.kind != kind or (value is not None and tok.value != value):
            raise QueryError(f"expected {value or kind} at {tok.pos}")
        return tok

    def _or(self) -> Predicate:
        preds = [self._and()]
        while self._keyword("or"):
            preds.append(self._and())
        if len(preds) == 1:
            return preds[0]
        return lambda n: any(p(n) for p in preds)

    def _and(self) -> Predicate:
        preds = [self._unary()]
        while self._keyword("and"):
            preds.append(self._unary())
        if len(preds) == 1:
            return preds[0]
        return lambda n: all(p(n) for p in preds)

    def _unary(self) -> Predicate:
        if self._keyword("not"):
            inner = self._unary()
            return lambda n: not inner(n)
        tok = self._peek()
        if tok.kind == "punct" and tok.value == "(":
            self._next()
            inner = self._or()
            self._expect("punct", ")")
            return inner
        return self._term()

    def _term(self) -> Predicate:
        tok = self._next()
        if tok.kind == "str":
            if not self._keyword("in"):
                raise QueryError(f"expected 'in' after string at {tok.pos}")
            target = self._expect("word").value
            if target == "parents":
                parent_id = self._resolve_id(tok.value)
                return lambda n: n.parent == parent_id
            if target in _UNSUPPORTED_TERMS:
                raise QueryError(f"the fake does not support '{target}' queries")
            raise QueryError(f"unknown collection {target!r}")
        if tok.kind != "word":
            raise QueryError(f"unexpected {tok.value!r} at {tok.pos}")
        term = tok.value
        parsers: dict[str, Callable[[str], Predicate]] = {
            "name": self._string_term,
            "mimeType": self._string_term,
            "trashed": self._bool_term,
            "starred": self._bool_term,
            "modifiedTime": self._time_term,
            "createdTime": self._time_term,
            "appProperties": self._has_term,
            "properties": self._has_term,
        }
        if term in parsers:
            return parsers[term](term)
        if term in _UNSUPPORTED_TERMS:
            raise QueryError(f"the fake does not support '{term}' queries")
        raise QueryError(f"unknown query term {term!r}")

    def _bool_term(self, term: str) -> Predicate:
        op = self._expect("op").value
        if op not in ("=", "!="):
            raise QueryError(f"operator {op} not valid for {term}")
        value_tok = self._expect("word")
        if value_tok.value not in ("true", "false"):
            raise QueryError(f"{term} takes true or false")
        want = (value_tok.value == "true") == (op == "=")
        if term == "trashed":
            return lambda n: self._is_trashed(n) == want
        return lambda n: n.starred == want

    def _time_term(self, term: str) -> Predicate:
        op = self._expect("op").value
        when = _parse_rfc3339_q(self._expect("str").value)
        return _compare("modified" if term == "modifiedTime" else "created", op, when)

    def _string_term(self, term: str) -> Predicate:
        def get(n: _Node) -> str:
            return n.name if term == "name" else n.mime_type

        if self._keyword("contains"):
            needle = self._expect("str").value
            if term == "name":
                return lambda n: _name_contains(n.name, needle)
            return lambda n: needle in n.mime_type
        op = self._expect("op").value
        value = self._expect("str").value
        if op == "=":
            return lambda n: get(n) == value
        if op == "!=":
            return lambda n: get(n) != value
        raise QueryError(f"operator {op} not valid for {term}")

    def _has_term(self, term: str) -> Predicate:
        if not self._keyword("has"):
            raise QueryError(f"{term} only supports 'has {{ key=... and value=... }}'")
        self._expect("punct", "{")
        pair: dict[str, str] = {}
        for index in range(2):
            if index == 1 and not self._keyword("and"):
                raise QueryError("expected 'and' inside has { }")
            which = self._expect("word").value
            if which not in ("key", "value") or which in pair:
                raise QueryError("has { } takes key='...' and value='...'")
            self._expect("op", "=")
            pair[which] = self._expect("str").value
        self._expect("punct", "}")
        key, value = pair["key"], pair["value"]
        if term == "appProperties":
            return lambda n: n.app_properties.get(key) == value
        return lambda n: n.properties.get(key) == value


def _parse_rfc3339_q(value: str) -> float:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise QueryError(f"invalid date {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _compare(attr: str, op: str, when: float) -> Predicate:
    ops: dict[str, Callable[[float, float], bool]] = {
        "=": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }
    fn = ops[op]
    return lambda n: fn(getattr(n, attr), when)


# ----------------------------------------------------------------------------------------------------
# Multipart/related and Range parsing
# ----------------------------------------------------------------------------------------------------


def parse_multipart_related(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a ``multipart/related`` body into ``(headers, payload)`` parts.

    Hand-rolled because the payload is arbitrary binary: the client's ``BytesGenerator`` writes
    ``\\n`` line endings while RFC clients write ``\\r\\n``; both are accepted and the payload bytes
    are returned untouched (``email`` parsing would risk normalising line endings inside DICOM data).
    """
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if m is None:
        raise _bad_request("multipart body without boundary")
    delim = b"--" + m.group(1).encode("latin-1")
    start = body.find(delim)
    if start < 0:
        raise _bad_request("multipart body without its boundary")
    parts: list[tuple[dict[str, str], bytes]] = []
    pos = start + len(delim)
    while not body.startswith(b"--", pos):
        eol = body.find(b"\n", pos)
        if eol < 0:
            raise _bad_request("truncated multipart body")
        header_block, content_start, crlf = _part_headers(body, eol + 1)
        end = body.find(b"\n" + delim, content_start - 1)
        if end < 0:
            raise _bad_request("multipart part without closing boundary")
        content_end = end
        if crlf and content_end > content_start and body[content_end - 1 : content_end] == b"\r":
            content_end -= 1
        content = body[content_start:content_end] if content_end >= content_start else b""
        headers: dict[str, str] = {}
        for line in header_block.decode("latin-1").splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        if headers.get("content-transfer-encoding", "").lower() == "base64":
            content = base64.b64decode(content)
        parts.append((headers, content))
        pos = end + 1 + len(delim)
    return parts


def _part_headers(body: bytes, pos: int) -> tuple[bytes, int, bool]:
    """Header block of the part starting at ``pos``, where its payload starts, and whether it uses CRLF."""
    if body.startswith(b"\r\n", pos):
        return b"", pos + 2, True
    if body.startswith(b"\n", pos):
        return b"", pos + 1, False
    lf, crlf_idx = body.find(b"\n\n", pos), body.find(b"\r\n\r\n", pos)
    if crlf_idx >= 0 and (lf < 0 or crlf_idx < lf):
        return body[pos:crlf_idx], crlf_idx + 4, True
    if lf >= 0:
        return body[pos:lf], lf + 2, False
    raise _bad_request("multipart part without header terminator")


_UNSATISFIABLE = (-1, -1)


def _parse_range(value: str, total: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive, ``_UNSATISFIABLE``, or None to ignore the header (RFC 9110)."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value)
    if m is None:
        return None
    first, last = m.groups()
    if first:
        start = int(first)
        end = min(int(last), total - 1) if last else total - 1
        if last and int(last) < start:
            return None  # syntactically invalid: ignore the header
    elif last:
        start, end = max(0, total - int(last)), total - 1  # suffix range "bytes=-N"
    else:
        return None
    return _UNSATISFIABLE if start >= total or end < start else (start, end)


# ----------------------------------------------------------------------------------------------------
# HTTP plumbing
# ----------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Reads the request, lets :class:`FakeDrive` answer, writes the answer in one ``send``."""

    protocol_version = "HTTP/1.1"  # keep-alive: httplib2 reuses connections
    server_version = "FakeDrive/1.0"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 60
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.fake._connection_opened()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log."""

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET  # noqa: N815

    def read_body(self) -> bytes:
        """Read the body by Content-Length (or chunked transfer coding)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if not length:
            return b""
        # A body shorter than Content-Length must not hang the connection: httplib2 silently re-sends
        # a request once after a dropped connection, and for chunk PUTs the body is an already-consumed
        # _StreamSlice, so the re-sent request announces N bytes and sends none.
        self.connection.settimeout(self.server.fake.body_timeout_seconds)
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise ValueError("request body shorter than Content-Length") from None
        if len(data) < length:
            raise ValueError("request body shorter than Content-Length")
        self.connection.settimeout(self.timeout)
        return data

    def write_response(self, resp: _Response) -> None:
        """Status line, headers (always Content-Length) and body in a single write."""
        self.wfile.write(self._encode(resp, content_length=len(resp.body)))
        self.wfile.flush()

    def _encode(self, resp: _Response, *, content_length: int) -> bytes:
        try:
            phrase = _STATUS_PHRASES.get(resp.status) or HTTPStatus(resp.status).phrase
        except ValueError:
            phrase = "Unknown"
        lines = [
            f"HTTP/1.1 {resp.status} {phrase}",
            f"Date: {self.date_time_string()}",
            f"Server: {self.server_version}",
            f"Content-Length: {content_length}",
        ]
        if resp.content_type:
            lines.append(f"Content-Type: {resp.content_type}")
        lines.extend(f"{key}: {value}" for key, value in resp.headers.items())
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + resp.body

    def write_truncated(self, resp: _Response, *, reset: bool) -> None:
        """The answer's head with its full Content-Length and only half its body, then a close: clean
        (FIN) or, with ``reset``, abortive (RST, via SO_LINGER with a zero timeout)."""
        full = resp.body
        if len(full) < 2:
            return  # no body to cut: the connection closes before the answer, as in a plain drop
        resp.body = full[: len(full) // 2]
        head_and_part = self._encode(resp, content_length=len(full))
        with contextlib.suppress(OSError):
            self.wfile.write(head_and_part)
            self.wfile.flush()
            if reset:
                # Close the descriptor itself now: socketserver would first shut the socket down for
                # writing, which sends a FIN before the RST.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                os.close(self.connection.detach())
            else:
                self.connection.shutdown(socket.SHUT_WR)


class _Server(ThreadingHTTPServer):
    """Threading server that tracks its connections so :meth:`FakeDrive.stop` can close them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakeDrive) -> None:
        self.fake = fake
        self._live_lock = threading.Lock()
        self._live: dict[threading.Thread, socket.socket] = {}
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection, args=(request, client_address), name="fakedrive-conn", daemon=True
        )
        with self._live_lock:
            self._live[thread] = request
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # reported through handle_error, like socketserver does
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._live_lock:
                self._live.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Client resets and our own shutdown are normal; anything else is a fake bug, record it."""
        exc = traceback.format_exc()
        if "ConnectionResetError" in exc or "BrokenPipeError" in exc or "Bad file descriptor" in exc:
            return
        self.fake._record_server_error(exc)

    def close_connections(self, timeout: float) -> None:
        """Shut down every live connection socket and join the handler threads."""
        with self._live_lock:
            live = list(self._live.items())
        for _thread, sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread, _sock in live:
            thread.join(timeout)


# ----------------------------------------------------------------------------------------------------
# The fake
# ----------------------------------------------------------------------------------------------------


class FakeDrive:
    """In-memory Drive v3 served over HTTP; see the module docstring.

    Knobs (plain attributes, change them any time):

    * ``clock``: ``() -> float`` seconds since the epoch (timestamps, channel expiry, session expiry).
    * ``latency_seconds``: sleep before answering each request.
    * ``short_pages``: ``files.list``/``changes.list`` pages follow the pattern empty, half, half, empty…
      while ``nextPageToken`` is still given (real Drive does this; FACTS gotcha 6).
    * ``service_account_mode``: creating a non-folder in My Drive → 403 ``storageQuotaExceeded``.
    * ``delivery_mode``: ``"auto"`` (background thread) or ``"manual"`` (queue; :meth:`deliver_pending`).
    * ``duplicate_notifications``: send each notification twice (same message number).
    * ``require_https_webhooks``: reject ``http://`` channel addresses like Drive does (off by default
      so tests can use loopback receivers).
    * ``notify_max_attempts``, ``notify_backoff_seconds``, ``notify_timeout_seconds``: webhook retries.
    * ``body_timeout_seconds``: a request body that stops arriving before Content-Length is answered
      with 400 and a closed connection after this idle time (see :meth:`_Handler.read_body`).
    * ``stall_seconds``: how long a ``"stall"`` network fault keeps the client waiting before closing.
    * ``faults``: :class:`Faults`; :meth:`fault_rate` adds a random mix.
    * ``intercept``: ``(method, url, body) -> None | (() -> None)``, called in the serving thread before a
      request is answered (after ``latency_seconds``, before faults); a test may block in it to force one
      interleaving of concurrent clients. A callable it returns is called once the answer is decided (the
      state read or written), before the answer is sent.
    * ``descending_ids``: every new file id sorts before all earlier ones. Drive's ids are random, so two
      items stamped with the same millisecond ``createdTime`` rank by chance; this makes the unlucky order
      (the later item first) certain.
    """

    def __init__(self, *, seed: int = 0, host: str = "127.0.0.1", port: int = 0) -> None:
        self.clock: Callable[[], float] = time.time
        self.latency_seconds = 0.0
        self.short_pages = False
        self.service_account_mode = False
        self.duplicate_notifications = False
        self.require_https_webhooks = False
        self.notify_max_attempts = 5
        self.notify_backoff_seconds = 0.02
        self.notify_timeout_seconds = 5.0
        self.body_timeout_seconds = 2.0
        self.stall_seconds = 1.0
        self.faults = Faults(seed)
        self.intercept: Callable[[str, str, bytes], Callable[[], None] | None] | None = None
        self.descending_ids = False
        self.server_errors: list[str] = []
        self.connections_accepted = 0

        self._host = host
        self._port = port
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._log_lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._deliveries: list[Delivery] = []
        self._nodes: dict[str, _Node] = {}
        self._seq = 0
        self._drives: dict[str, str] = {}
        self._denied: dict[str, str] = {}
        self._changes: list[_ChangeEntry] = []
        self._latest: dict[str, int] = {}
        self._channels: dict[str, _Channel] = {}
        self._sessions: dict[str, _UploadSession] = {}
        self._list_cursors: dict[str, _ListCursor] = {}
        self._generated_ids: set[str] = set()
        self._descending = 10**12
        self._changes_pages_served = 0

        self._notify_cv = threading.Condition()
        self._pending: deque[_Notification] = deque()
        self._inflight = 0
        self._delivery_mode: Literal["auto", "manual"] = "auto"
        self._stopping = False
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._notifier: threading.Thread | None = None
        self.base_url = ""

        self.root_id = self._new_root_id()
        self._nodes[self.root_id] = self._make_node(self.root_id, "My Drive", FOLDER_MIME, None, None)
        self._nodes[self.root_id].is_root = True

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Bind (port 0 = ephemeral), serve in a thread, start the notifier; returns the base URL."""
        if self._server is not None:
            return self.base_url
        self._stopping = False
        self._server = _Server((self._host, self._port), self)
        port = self._server.server_address[1]
        self.base_url = f"http://{self._host}:{port}/"
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakedrive-http", daemon=True
        )
        self._serve_thread.start()
        self._notifier = threading.Thread(target=self._notifier_loop, name="fakedrive-notify", daemon=True)
        self._notifier.start()
        return self.base_url

    def stop(self) -> None:
        """Stop the notifier and the server, close every socket, join every thread."""
        if self._server is None:
            return
        with self._notify_cv:
            self._stopping = True
            self._pending.clear()
            self._notify_cv.notify_all()
        if self._notifier is not None:
            self._notifier.join(10)
        self._server.shutdown()
        self._server.close_connections(timeout=5)
        self._server.server_close()
        if self._serve_thread is not None:
            self._serve_thread.join(5)
        self._server = None
        self._serve_thread = None
        self._notifier = None

    def __enter__(self) -> FakeDrive:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ knobs with behaviour

    @property
    def delivery_mode(self) -> Literal["auto", "manual"]:
        """``"auto"``: a background thread delivers notifications; ``"manual"``: they queue up."""
        return self._delivery_mode

    @delivery_mode.setter
    def delivery_mode(self, mode: Literal["auto", "manual"]) -> None:
        if mode not in ("auto", "manual"):
            raise ValueError(f"delivery_mode must be 'auto' or 'manual', not {mode!r}")
        with self._notify_cv:
            self._delivery_mode = mode
            self._notify_cv.notify_all()

    def fault_rate(self, p: float, seed: int = 0, *, network: bool = False) -> FaultRule:
        """Inject a seeded random mix (429, 403 rate limits, 500, 503, dropped connection) on ``p`` of requests;
        ``network=True`` adds answers cut mid-body (FIN, RST), stalls and short reads."""
        self.faults.reseed(seed)
        return self.faults.add_mix(p, network=network)

    # ------------------------------------------------------------------ logs

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of every request received, in completion order."""
        with self._log_lock:
            return list(self._requests)

    def request_count(self, method: str | None = None, path_contains: str | None = None) -> int:
        """How many requests matched ``method`` and had ``path_contains`` in ``path?query``."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method.upper()) and (path_contains is None or path_contains in r.url)
        )

    def clear_requests(self) -> None:
        """Forget the request log."""
        with self._log_lock:
            self._requests.clear()

    @property
    def deliveries(self) -> list[Delivery]:
        """Snapshot of every notification delivery attempt."""
        with self._log_lock:
            return list(self._deliveries)

    def _record_server_error(self, text: str) -> None:
        with self._log_lock:
            self.server_errors.append(text)

    def _connection_opened(self) -> None:
        with self._log_lock:
            self.connections_accepted += 1

    # ------------------------------------------------------------------ direct helpers (no HTTP, no checks)

    def add_shared_drive(self, name: str) -> str:
        """Create a shared drive; its id is also the id of its root folder."""
        with self._lock:
            drive_id = self._new_root_id()
            node = self._make_node(drive_id, name, FOLDER_MIME, None, drive_id)
            node.is_root = True
            self._nodes[drive_id] = node
            self._drives[drive_id] = name
            return drive_id

    def add_folder(
        self,
        name: str,
        parent: str | None = None,
        drive_id: str | None = None,
        app_properties: dict[str, str] | None = None,
    ) -> str:
        """Create a folder (under ``parent``, the shared drive root, or My Drive); returns its id."""
        with self._lock:
            parent_node = self._helper_parent(parent, drive_id)
            return self._commit_create(self._plan_for(name, FOLDER_MIME, parent_node, app_properties), None).id

    def add_file(
        self,
        name: str,
        parent: str | None,
        content: bytes,
        mime_type: str = "application/dicom",
        app_properties: dict[str, str] | None = None,
    ) -> str:
        """Create a binary file; produces a change and notifications like an upload."""
        with self._lock:
            parent_node = self._helper_parent(parent, None)
            plan = self._plan_for(name, mime_type, parent_node, app_properties)
            return self._commit_create(plan, bytes(content)).id

    def add_google_doc(self, name: str, parent: str | None) -> str:
        """Create a Google Docs file (no binary content; ``alt=media`` → 403 fileNotDownloadable)."""
        with self._lock:
            parent_node = self._helper_parent(parent, None)
            return self._commit_create(self._plan_for(name, GOOGLE_DOC_MIME, parent_node, None), None).id

    def trash(self, file_id: str) -> None:
        """Move to trash (descendants become trashed too)."""
        with self._lock:
            self._commit_update(_UpdatePlan(self._node(file_id), trashed=True), None)

    def untrash(self, file_id: str) -> None:
        """Restore from trash."""
        with self._lock:
            self._commit_update(_UpdatePlan(self._node(file_id), trashed=False), None)

    def delete(self, file_id: str) -> None:
        """Delete permanently, with all descendants."""
        with self._lock:
            self._delete_node(self._node(file_id))

    def update_content(self, file_id: str, content: bytes) -> None:
        """Replace a file's content (new md5, headRevisionId, version)."""
        with self._lock:
            self._commit_update(_UpdatePlan(self._node(file_id)), bytes(content))

    def rename(self, file_id: str, name: str) -> None:
        """Change a file's name."""
        with self._lock:
            self._commit_update(_UpdatePlan(self._node(file_id), name=name), None)

    def content(self, file_id: str) -> bytes:
        """A file's bytes (KeyError if absent, ValueError for folders/Google Docs)."""
        with self._lock:
            node = self._node(file_id)
            if node.content is None:
                raise ValueError(f"{file_id} has no binary content ({node.mime_type})")
            return node.content

    def get(self, file_id: str) -> dict[str, Any]:
        """Full metadata of a file (all fields), ignoring permissions."""
        with self._lock:
            return self._file_json(self._node(file_id))

    def exists(self, file_id: str) -> bool:
        """Whether the id exists (not deleted)."""
        with self._lock:
            return file_id in self._nodes

    def children(self, folder_id: str, include_trashed: bool = False) -> list[dict[str, Any]]:
        """Direct children of a folder, in creation order."""
        with self._lock:
            parent = self._node(folder_id).id
            return [
                self._file_json(n)
                for n in sorted(self._nodes.values(), key=lambda n: n.seq)
                if n.parent == parent and (include_trashed or not self._effective_trashed(n))
            ]

    def find(
        self, name: str | None = None, parent: str | None = None, include_trashed: bool = False
    ) -> list[dict[str, Any]]:
        """Files matching ``name`` and/or ``parent`` (names are not unique; all matches are returned)."""
        with self._lock:
            parent_id = self._node(parent).id if parent is not None else None
            return [
                self._file_json(n)
                for n in sorted(self._nodes.values(), key=lambda n: n.seq)
                if not n.is_root
                and (name is None or n.name == name)
                and (parent_id is None or n.parent == parent_id)
                and (include_trashed or not self._effective_trashed(n))
            ]

    def path_of(self, file_id: str) -> str:
        """Names from (excluding) the drive root down to the file, joined by ``/``."""
        with self._lock:
            names: list[str] = []
            node: _Node | None = self._node(file_id)
            while node is not None and not node.is_root:
                names.append(node.name)
                node = self._nodes.get(node.parent) if node.parent else None
            return "/".join(reversed(names))

    def deny(self, file_id: str, reason: str = "notFound") -> None:
        """Revoke access to an item and its descendants.

        ``notFound``: invisible (404 on every call, absent from lists, ``removed`` in changes) — what
        Drive answers for a folder not shared with the caller. ``insufficientFilePermissions``: reads
        work, writes to it or into it get 403.
        """
        if reason not in ("notFound", "insufficientFilePermissions"):
            raise ValueError("reason must be 'notFound' or 'insufficientFilePermissions'")
        with self._lock:
            node = self._node(file_id)
            self._denied[node.id] = reason
            self._emit_access_change(node, lost=reason == "notFound")

    def undeny(self, file_id: str) -> None:
        """Restore access revoked by :meth:`deny`."""
        with self._lock:
            node = self._node(file_id)
            previous = self._denied.pop(node.id, None)
            if previous is not None:
                self._emit_access_change(node, lost=False, regained=previous == "notFound")

    @property
    def start_page_token(self) -> str:
        """What ``changes.getStartPageToken`` would answer now."""
        with self._lock:
            return str(len(self._changes) + 1)

    @property
    def channels(self) -> list[dict[str, Any]]:
        """Live (not stopped, not expired) channels, for assertions."""
        with self._lock:
            now_ms = self._now_ms()
            return [
                {"id": c.id, "resourceId": c.resource_id, "kind": c.kind, "expiration": c.expiration_ms}
                for c in self._channels.values()
                if not c.stopped and now_ms < c.expiration_ms
            ]

    # ------------------------------------------------------------------ notifications

    @property
    def pending_notifications(self) -> int:
        """Notifications queued and not yet delivered."""
        with self._notify_cv:
            return len(self._pending)

    def deliver_pending(self) -> list[Delivery]:
        """Deliver every queued notification now, in this thread (for ``delivery_mode = "manual"``)."""
        with self._notify_cv:
            notes = list(self._pending)
            self._pending.clear()
            self._inflight += 1
        records: list[Delivery] = []
        try:
            for note in notes:
                records.extend(self._deliver(note))
        finally:
            with self._notify_cv:
                self._inflight -= 1
                self._notify_cv.notify_all()
        return records

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no notification is being delivered (and, in auto mode, none is queued)."""
        deadline = time.monotonic() + timeout
        with self._notify_cv:
            while self._inflight or (self._pending and self._delivery_mode == "auto"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._notify_cv.wait(remaining)
        return True

    def _notifier_loop(self) -> None:
        while True:
            with self._notify_cv:
                while not self._stopping and (self._delivery_mode != "auto" or not self._pending):
                    self._notify_cv.wait()
                if self._stopping:
                    return
                note = self._pending.popleft()
                self._inflight += 1
            try:
                self._deliver(note)
            except Exception:  # a notifier bug must not kill the thread silently
                self._record_server_error(traceback.format_exc())
            finally:
                with self._notify_cv:
                    self._inflight -= 1
                    self._notify_cv.notify_all()

    def _deliver(self, note: _Notification) -> list[Delivery]:
        channel = note.channel
        with self._lock:
            if not self._channel_live(channel):
                return []  # stopped or expired since it was queued: Drive sends nothing
            headers = {
                "X-Goog-Channel-ID": channel.id,
                "X-Goog-Channel-Expiration": email.utils.formatdate(channel.expiration_ms / 1000, usegmt=True),
                "X-Goog-Message-Number": str(note.number),
                "X-Goog-Resource-ID": channel.resource_id,
                "X-Goog-Resource-State": note.state,
                "X-Goog-Resource-URI": channel.resource_uri,
                "User-Agent": APIS_GOOGLE_USER_AGENT,
                "Content-Length": "0",
            }
            if channel.token is not None:
                headers["X-Goog-Channel-Token"] = channel.token
            if note.changed:
                headers["X-Goog-Changed"] = note.changed
        records: list[Delivery] = []
        for _copy in range(2 if self.duplicate_notifications else 1):
            for attempt in range(1, self.notify_max_attempts + 1):
                with self._lock:
                    if not self._channel_live(channel):
                        return records
                status, error = self._post_notification(channel.address, headers)
                record = Delivery(
                    channel_id=channel.id,
                    message_number=note.number,
                    resource_state=note.state,
                    address=channel.address,
                    headers=dict(headers),
                    attempt=attempt,
                    status=status,
                    error=error,
                    time=self.clock(),
                )
                records.append(record)
                with self._log_lock:
                    self._deliveries.append(record)
                # FACTS §2: 500/502/503/504 are retried with backoff, every other status is a failure.
                retry = status is None or status in NOTIFY_RETRY_STATUSES
                if not retry or attempt == self.notify_max_attempts or self._stopping:
                    break
                time.sleep(self.notify_backoff_seconds * 2 ** (attempt - 1))
        return records

    def _post_notification(self, address: str, headers: dict[str, str]) -> tuple[int | None, str | None]:
        parts = urllib.parse.urlsplit(address)
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parts.hostname or "127.0.0.1", parts.port, timeout=self.notify_timeout_seconds)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("POST", path, body=b"", headers=headers)
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as exc:
            return None, repr(exc)
        else:
            return resp.status, None
        finally:
            conn.close()

    def _enqueue(self, channel: _Channel, state: str, changed: str | None) -> None:
        if state == "sync":
            number = 1  # FACTS §2: the sync message is always number 1
        else:
            # Increasing but not sequential (FACTS §2): always skip at least one number.
            channel.last_number += self._rng.randint(2, 6)
            number = channel.last_number
        with self._notify_cv:
            self._pending.append(_Notification(channel, number, state, changed))
            self._notify_cv.notify_all()

    def _channel_live(self, channel: _Channel) -> bool:
        return not channel.stopped and self._now_ms() < channel.expiration_ms

    # ------------------------------------------------------------------ HTTP entry point

    def _handle(self, handler: _Handler) -> None:
        method = handler.command
        split = urllib.parse.urlsplit(handler.path)
        try:
            body = handler.read_body()
        except ValueError as exc:
            handler.close_connection = True
            malformed = _error_response(_bad_request(f"Malformed request: {exc}"))
            query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
            self._log_request(
                _Request(method, split.path, query, split.query, handler.headers, b""), malformed, fault=False
            )
            handler.write_response(malformed)
            return
        raw_query = split.query
        query = dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True))
        override = handler.headers.get("X-HTTP-Method-Override")
        if method == "POST" and override:
            # The client turns GETs with URIs > 2048 chars into POST + override + form body (FACTS §1).
            method = override.upper()
            if handler.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
                query.update(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True))
                body = b""
        req = _Request(method, split.path, query, raw_query, handler.headers, body)
        if self.latency_seconds > 0:
            time.sleep(self.latency_seconds)
        url = f"{split.path}?{raw_query}" if raw_query else split.path
        if self.intercept is not None:
            req.answered = self.intercept(method, url, body)
        hit = self.faults.pick(method, url)
        if hit is not None and hit.outcome.network is not None:
            self._network_fault(handler, req, hit.outcome.network)
            return
        response: _Response | None
        if hit is not None and not hit.after_processing:
            response = self._fault_response(hit.outcome)
        else:
            response = self._dispatch(req)
            if hit is not None:
                response = self._fault_response(hit.outcome)
        self._log_request(req, response, fault=hit is not None)
        if response is None:
            handler.close_connection = True  # drop: close the socket without answering
            return
        handler.write_response(response)

    def _network_fault(self, handler: _Handler, req: _Request, kind: str) -> None:
        """Answer the way a failing network delivers answers (see ``Faults.add``)."""
        handler.close_connection = True
        if kind == "stall":
            self._log_request(req, None, fault=True)
            time.sleep(self.stall_seconds)
            return
        response = self._dispatch(req)
        ranged = req.headers.get("Range") is not None and response.status == 206
        if kind == "short" and ranged and len(response.body) > 1:
            # A valid, shorter 206: bytes a..(a + n/2 - 1) of the range asked, Content-Range saying so.
            start_text, _, total = response.headers["Content-Range"].removeprefix("bytes ").partition("/")
            start = int(start_text.split("-")[0])
            half = response.body[: len(response.body) // 2]
            response.headers["Content-Range"] = f"bytes {start}-{start + len(half) - 1}/{total}"
            response.body = half
            self._log_request(req, response, fault=True)
            handler.write_response(response)
            return
        self._log_request(req, None, fault=True)
        handler.write_truncated(response, reset=kind == "rst")

    @staticmethod
    def _fault_response(outcome: _Outcome) -> _Response | None:
        if outcome.drop or outcome.status is None:
            return None
        return _error_response(drive_error(outcome.status, outcome.reason))

    def _log_request(self, req: _Request, response: _Response | None, *, fault: bool) -> None:
        headers = {name: req.headers[name] for name in _LOGGED_HEADERS if req.headers.get(name) is not None}
        record = RequestRecord(
            method=req.method,
            path=req.path,
            query=dict(req.query),
            raw_query=req.raw_query,
            headers=headers,
            has_authorization=req.headers.get("Authorization") is not None,
            body_size=len(req.body),
            status=None if response is None else response.status,
            fault=fault,
        )
        with self._log_lock:
            self._requests.append(record)
        answered, req.answered = req.answered, None
        if answered is not None:
            answered()

    def _dispatch(self, req: _Request) -> _Response:
        try:
            with self._lock:
                return self._route(req)
        except DriveError as err:
            return _error_response(err)
        except Exception:  # a fake bug becomes a visible 500 plus a server_errors entry
            text = traceback.format_exc()
            self._record_server_error(text)
            return _error_response(DriveError(500, "internalError", f"FakeDrive bug: {text.splitlines()[-1]}"))

    def _route(self, req: _Request) -> _Response:
        if req.path.startswith(_UPLOAD_PREFIX):
            return self._route_upload(req, req.path[len(_UPLOAD_PREFIX) :])
        if req.path.startswith(_META_PREFIX):
            return self._route_meta(req, req.path[len(_META_PREFIX) :])
        if req.path.startswith("/batch/"):
            raise DriveError(501, "notImplemented", "FakeDrive does not implement batch requests.")
        raise DriveError(404, "notFound", f"Not Found: {req.path}")

    def _route_meta(self, req: _Request, rest: str) -> _Response:  # noqa: PLR0911 - one return per route
        parts = [urllib.parse.unquote(p) for p in rest.split("/")] if rest else []
        alt = req.query.get("alt", "json")
        is_files_get = req.method == "GET" and len(parts) == 2 and parts[0] == "files"
        if alt not in ("json", "media") or (alt == "media" and not is_files_get):
            raise _invalid("alt")
        match (req.method, parts):
            case ("GET", ["files"]):
                return self._files_list(req)
            case ("POST", ["files"]):
                return self._files_create_metadata(req)
            case ("GET", ["files", "generateIds"]):
                return self._files_generate_ids(req)
            case ("GET", ["files", file_id]):
                return self._files_get(req, file_id)
            case ("PATCH", ["files", file_id]):
                return self._files_update(req, file_id, content=None, media_mime=None, meta=self._json_body(req))
            case ("DELETE", ["files", file_id]):
                return self._files_delete(req, file_id)
            case ("POST", ["files", file_id, "watch"]):
                return self._files_watch(req, file_id)
            case ("GET", ["changes", "startPageToken"]):
                return _json_response({"kind": "drive#startPageToken", "startPageToken": self.start_page_token})
            case ("GET", ["changes"]):
                return self._changes_list(req)
            case ("POST", ["changes", "watch"]):
                return self._changes_watch(req)
            case ("POST", ["channels", "stop"]):
                return self._channels_stop(req)
        raise DriveError(404, "notFound", f"Not Found: {req.method} {req.path}")

    def _route_upload(self, req: _Request, rest: str) -> _Response:
        parts = [urllib.parse.unquote(p) for p in rest.split("/")] if rest else []
        if not parts or parts[0] != "files" or len(parts) > 2:
            raise DriveError(404, "notFound", f"Not Found: {req.path}")
        file_id = parts[1] if len(parts) == 2 else None
        if req.method == "PUT":
            return self._session_put(req)
        if not ((req.method == "POST" and file_id is None) or (req.method == "PATCH" and file_id is not None)):
            raise DriveError(404, "notFound", f"Not Found: {req.method} {req.path}")
        upload_type = req.query.get("uploadType")
        content_type = req.headers.get("Content-Type") or DEFAULT_MIME
        if upload_type == "media":
            meta: dict[str, Any] = {}
            content, media_mime = req.body, content_type
        elif upload_type == "multipart":
            meta, content, media_mime = self._parse_multipart_upload(content_type, req.body)
        elif upload_type == "resumable":
            return self._resumable_start(req, file_id)
        else:
            raise _invalid("uploadType", "Invalid upload type; expected media, multipart or resumable.")
        if file_id is None:
            self._mask_for(req.query, _FILE_SCHEMA, _DEFAULT_FILE_MASK)
            plan = self._prepare_create(meta, media_mime, has_content=True, params=req.query)
            node = self._commit_create(plan, content)
            return self._file_response(node, req.query)
        return self._files_update(req, file_id, content=content, media_mime=media_mime, meta=meta)

    # ------------------------------------------------------------------ request helpers

    @staticmethod
    def _json_body(req: _Request) -> dict[str, Any]:
        if not req.body.strip():
            return {}
        try:
            data = json.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            raise DriveError(400, "parseError", "Parse Error") from None
        if not isinstance(data, dict):
            raise DriveError(400, "parseError", "Parse Error")
        return data

    @staticmethod
    def _bool(params: dict[str, str], name: str, default: bool = False) -> bool:
        value = params.get(name)
        if value is None or value == "":
            return default
        if value.lower() == "true":
            return True
        if value.lower() == "false":
            return False
        raise _invalid(name)

    def _supports_all_drives(self, params: dict[str, str]) -> bool:
        return self._bool(params, "supportsAllDrives") or self._bool(params, "supportsTeamDrives")

    @staticmethod
    def _mask_for(params: dict[str, str], schema: dict[str, Any], default: Mask) -> Mask:
        spec = params.get("fields")
        if spec is None or not spec.strip():
            return default
        mask = parse_fields(spec)
        _validate_mask(mask, schema)
        return mask

    def _file_response(self, node: _Node, params: dict[str, str]) -> _Response:
        mask = self._mask_for(params, _FILE_SCHEMA, _DEFAULT_FILE_MASK)
        return _json_response(apply_mask(self._file_json(node), mask))

    def _parse_multipart_upload(self, content_type: str, body: bytes) -> tuple[dict[str, Any], bytes, str]:
        if not content_type.lower().startswith("multipart/related"):
            raise _bad_request("uploadType=multipart needs a multipart/related body")
        parts = parse_multipart_related(content_type, body)
        if len(parts) != 2:
            raise _bad_request(f"multipart upload needs exactly 2 parts (metadata, media), got {len(parts)}")
        (meta_headers, meta_bytes), (media_headers, media) = parts
        if "json" not in meta_headers.get("content-type", "application/json"):
            raise _bad_request("the first multipart part must be the JSON metadata")
        try:
            meta = json.loads(meta_bytes or b"{}")
        except ValueError:
            raise DriveError(400, "parseError", "Parse Error") from None
        if not isinstance(meta, dict):
            raise DriveError(400, "parseError", "Parse Error")
        return meta, media, media_headers.get("content-type", DEFAULT_MIME)

    # ------------------------------------------------------------------ files.list / get

    def _files_list(self, req: _Request) -> _Response:
        params = req.query
        mask = self._mask_for(params, _FILE_LIST_SCHEMA, _DEFAULT_LIST_MASK)
        page_size = self._list_page_size(params)
        supports = self._supports_all_drives(params)
        include = self._bool(params, "includeItemsFromAllDrives") or self._bool(params, "includeTeamDriveItems")
        corpora = params.get("corpora") or "user"
        drive_id = params.get("driveId") or params.get("teamDriveId")
        if corpora not in ("user", "domain", "drive", "allDrives"):
            raise _invalid("corpora")
        if corpora == "drive":
            if not drive_id:
                raise _invalid("driveId", "The driveId parameter is required when corpora is 'drive'.")
            if not (include and supports):
                raise _invalid(
                    "includeItemsFromAllDrives",
                    "includeItemsFromAllDrives and supportsAllDrives must be true when corpora is 'drive'.",
                )
            if drive_id not in self._drives:
                raise DriveError(404, "notFound", f"Shared drive not found: {drive_id}", location="driveId")
        elif drive_id:
            raise _invalid("corpora", "The corpora parameter must be 'drive' when driveId is specified.")
        if corpora == "allDrives" and not (include and supports):
            raise _invalid("includeItemsFromAllDrives", "corpora=allDrives needs includeItemsFromAllDrives=true.")
        spaces = {s.strip() for s in params.get("spaces", "drive").split(",") if s.strip()}
        if not spaces or not spaces <= {"drive", "appDataFolder", "photos"}:
            raise _invalid("spaces")
        q = params.get("q", "")
        predicate = self._compile_query(q)
        sort_key = self._order_by(params.get("orderBy"))
        signature = (q, params.get("orderBy", ""), corpora, drive_id, supports, include, tuple(sorted(spaces)))
        token = params.get("pageToken")
        if token:
            cursor = self._list_cursors.get(token)
            if cursor is None or cursor.signature != signature:
                raise _invalid("pageToken")
            offset, page_index = cursor.offset, cursor.page_index
        else:
            offset, page_index = 0, 0
        all_drives = supports and include
        matches = [
            n
            for n in self._nodes.values()
            if "drive" in spaces and self._listable(n, all_drives, drive_id if corpora == "drive" else None)
        ]
        matches = [n for n in matches if predicate(n)]
        matches.sort(key=lambda n: n.seq)
        sort_key(matches)
        count = self._page_length(page_size, page_index)
        page = matches[offset : offset + count]
        out: dict[str, Any] = {
            "kind": "drive#fileList",
            "incompleteSearch": False,
            "files": [self._file_json(n) for n in page],
        }
        if offset + count < len(matches):
            next_token = "~!!~" + self._random_string(48, _ID_ALPHABET)
            self._list_cursors[next_token] = _ListCursor(signature, offset + count, page_index + 1)
            out["nextPageToken"] = next_token
        return _json_response(apply_mask(out, mask))

    @staticmethod
    def _list_page_size(params: dict[str, str]) -> int:
        raw = params.get("pageSize")
        if raw is None or raw == "":
            return DEFAULT_PAGE_SIZE
        try:
            size = int(raw)
        except ValueError:
            raise _invalid("pageSize") from None
        if size < 1:
            raise _invalid("pageSize")
        return min(size, MAX_PAGE_SIZE)  # "values above 1000 will be coerced to 1000" (FACTS §1)

    def _page_length(self, page_size: int, page_index: int) -> int:
        """Real Drive may return short or empty pages with a nextPageToken (FACTS gotcha 6)."""
        if not self.short_pages:
            return page_size
        if page_index % 3 == 0:
            return 0
        return max(1, page_size // 2)

    def _compile_query(self, q: str) -> Predicate:
        if not q.strip():
            return lambda _n: True
        try:
            return _QueryParser(q, self._resolve_alias, self._effective_trashed).parse()
        except QueryError as exc:
            # Drive answers "Invalid Value" on q; the detail is appended to help debugging.
            raise _invalid("q", f"Invalid Value ({exc})") from None

    @staticmethod
    def _order_by(spec: str | None) -> Callable[[list[_Node]], None]:
        keys: dict[str, Callable[[_Node], Any]] = {
            "createdTime": lambda n: n.created,
            "modifiedTime": lambda n: n.modified,
            "recency": lambda n: n.modified,
            "name": lambda n: (n.name.casefold(), n.name),
            "name_natural": lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n.name.casefold())],
            "folder": lambda n: 0 if n.is_folder else 1,
            "quotaBytesUsed": lambda n: len(n.content or b""),
            "starred": lambda n: n.starred,
        }
        plan: list[tuple[Callable[[_Node], Any], bool]] = []
        for item in (spec or "").split(","):
            words = item.split()
            if not words:
                continue
            if words[0] not in keys or len(words) > 2 or (len(words) == 2 and words[1] != "desc"):
                raise _invalid("orderBy", f"Invalid Value (unsupported orderBy {item.strip()!r})")
            plan.append((keys[words[0]], len(words) == 2))

        def sort(nodes: list[_Node]) -> None:
            for key, desc in reversed(plan):
                nodes.sort(key=key, reverse=desc)

        return sort

    def _listable(self, node: _Node, all_drives: bool, only_drive: str | None) -> bool:
        if node.is_root or self._access(node) == "notFound":
            return False
        if node.drive_id is not None and not all_drives:
            return False  # shared-drive items need includeItemsFromAllDrives + supportsAllDrives
        return only_drive is None or node.drive_id == only_drive

    def _files_get(self, req: _Request, file_id: str) -> _Response:
        node = self._lookup(file_id, self._supports_all_drives(req.query))
        if req.query.get("alt") == "media":
            return self._download(req, node)
        return self._file_response(node, req.query)

    def _download(self, req: _Request, node: _Node) -> _Response:
        if node.is_google_type or node.content is None:
            raise DriveError(
                403,
                "fileNotDownloadable",
                "Only files with binary content can be downloaded. Use Export with Docs Editors files.",
                location="alt",
            )
        data = node.content
        total = len(data)
        range_header = req.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, total)
            if parsed == _UNSATISFIABLE:
                # MediaIoBaseDownload treats 416 + "Content-Range: bytes */0" as a finished empty file.
                err = DriveError(416, "requestedRangeNotSatisfiable", "Request range not satisfiable")
                resp = _error_response(err)
                resp.headers["Content-Range"] = f"bytes */{total}"
                return resp
            if parsed is not None:
                start, end = parsed
                return _Response(
                    206,
                    data[start : end + 1],
                    {"Content-Range": f"bytes {start}-{end}/{total}", "Accept-Ranges": "bytes"},
                    content_type=node.mime_type,
                )
        return _Response(200, data, {"Accept-Ranges": "bytes"}, content_type=node.mime_type)

    def _files_generate_ids(self, req: _Request) -> _Response:
        try:
            count = int(req.query.get("count", "10"))
        except ValueError:
            raise _invalid("count") from None
        if not 1 <= count <= 1000:
            raise _invalid("count")
        ids = [self._new_file_id() for _ in range(count)]
        self._generated_ids.update(ids)
        return _json_response({"kind": "drive#generatedIds", "space": "drive", "ids": ids})

    # ------------------------------------------------------------------ create

    def _files_create_metadata(self, req: _Request) -> _Response:
        meta = self._json_body(req)
        self._mask_for(req.query, _FILE_SCHEMA, _DEFAULT_FILE_MASK)
        plan = self._prepare_create(meta, None, has_content=False, params=req.query)
        # A metadata-only create of a binary type is an empty (0-byte) file.
        content = None if plan.mime_type.startswith(GOOGLE_APPS_PREFIX) else b""
        node = self._commit_create(plan, content)
        return self._file_response(node, req.query)

    @staticmethod
    def _check_writable(meta: dict[str, Any], allowed: frozenset[str]) -> None:
        for key in meta:
            if key in allowed:
                continue
            if key in FILE_FIELDS:
                raise DriveError(
                    403, "fieldNotWritable", f"The resource body includes fields which are not directly writable: {key}"
                )
            raise _bad_request(f"Invalid JSON payload: unknown field {key!r}")

    @staticmethod
    def _props(value: Any, name: str) -> dict[str, str | None]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _bad_request(f"{name} must be an object")
        out: dict[str, str | None] = {}
        for key, raw in value.items():
            if raw is None:
                out[key] = None
                continue
            if isinstance(raw, bool) or not isinstance(raw, str | int | float):
                raise _bad_request(f"{name} values must be strings")
            text = str(raw)
            if len(key.encode("utf-8")) + len(text.encode("utf-8")) > PROPERTY_MAX_BYTES:
                raise _bad_request(f"The {name} entry {key!r} exceeds {PROPERTY_MAX_BYTES} bytes (key + value, UTF-8).")
            out[key] = text
        return out

    def _prepare_create(
        self, meta: dict[str, Any], media_mime: str | None, *, has_content: bool, params: dict[str, str]
    ) -> _CreatePlan:
        self._check_writable(meta, _CREATE_WRITABLE)
        supports = self._supports_all_drives(params)
        parents = meta.get("parents")
        if parents is None or parents == []:
            parents = [self.root_id]
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise _bad_request("parents must be a list of folder ids")
        if len(parents) > 1:
            # FACTS §1: "A file can only have one parent folder; specifying multiple parents isn't supported".
            raise DriveError(403, "cannotAddParent", "Increasing the number of parents is not allowed.")
        parent = self._lookup(parents[0], supports)
        if not parent.is_folder:
            raise _bad_request(f"The specified parent is not a folder: {parents[0]}")
        self._require_writable(parent)
        mime = meta.get("mimeType") or media_mime or DEFAULT_MIME
        if not isinstance(mime, str):
            raise _bad_request("mimeType must be a string")
        if has_content and mime == FOLDER_MIME:
            raise _bad_request("A folder cannot have content.")
        if self.service_account_mode and mime != FOLDER_MIME and parent.drive_id is None:
            raise drive_error(403, "storageQuotaExceeded")
        name = meta.get("name", "Untitled")
        if not isinstance(name, str):
            raise _bad_request("name must be a string")
        file_id = meta.get("id")
        if file_id is not None and (file_id not in self._generated_ids or file_id in self._nodes):
            raise _invalid("id", "The provided file ID is not usable.")
        app_properties = {k: v for k, v in self._props(meta.get("appProperties"), "appProperties").items() if v}
        properties = {k: v for k, v in self._props(meta.get("properties"), "properties").items() if v}
        return _CreatePlan(
            name=name,
            mime_type=mime,
            parent=parent,
            app_properties=app_properties,
            properties=properties,
            description=meta.get("description"),
            starred=bool(meta.get("starred", False)),
            original_filename=meta.get("originalFilename"),
            created=_parse_rfc3339(meta["createdTime"], "createdTime") if "createdTime" in meta else None,
            modified=_parse_rfc3339(meta["modifiedTime"], "modifiedTime") if "modifiedTime" in meta else None,
            file_id=file_id,
        )

    def _plan_for(self, name: str, mime: str, parent: _Node, app_properties: dict[str, str] | None) -> _CreatePlan:
        return _CreatePlan(name, mime, parent, dict(app_properties or {}), {}, None, False, None, None, None, None)

    def _commit_create(self, plan: _CreatePlan, content: bytes | None) -> _Node:
        now = self.clock()
        node_id = plan.file_id or self._new_file_id()
        node = self._make_node(node_id, plan.name, plan.mime_type, plan.parent.id, plan.parent.drive_id)
        node.created = plan.created if plan.created is not None else now
        node.modified = plan.modified if plan.modified is not None else now
        node.app_properties = dict(plan.app_properties)
        node.properties = dict(plan.properties)
        node.description = plan.description
        node.starred = plan.starred
        if content is not None and not node.is_google_type:
            self._set_content(node, content)
            node.original_filename = plan.original_filename or plan.name
        self._nodes[node.id] = node
        self._emit(node.id, node.drive_id, [(plan.parent.id, "update", "children")])
        return node

    def _set_content(self, node: _Node, content: bytes) -> None:
        node.content = content
        node.md5 = hashlib.md5(content, usedforsecurity=False).hexdigest()
        node.sha1 = hashlib.sha1(content, usedforsecurity=False).hexdigest()
        node.sha256 = hashlib.sha256(content).hexdigest()
        node.head_revision_id = "0B" + self._random_string(42, _ID_ALPHABET)

    # ------------------------------------------------------------------ update / delete

    def _files_update(
        self,
        req: _Request,
        file_id: str,
        *,
        content: bytes | None,
        media_mime: str | None,
        meta: dict[str, Any],
    ) -> _Response:
        self._mask_for(req.query, _FILE_SCHEMA, _DEFAULT_FILE_MASK)
        plan = self._prepare_update(file_id, meta, req.query, has_content=content is not None)
        node = self._commit_update(plan, content)
        return self._file_response(node, req.query)

    def _prepare_update(
        self, file_id: str, meta: dict[str, Any], params: dict[str, str], *, has_content: bool
    ) -> _UpdatePlan:
        supports = self._supports_all_drives(params)
        node = self._lookup(file_id, supports)
        if node.is_root:
            raise _no_write_permission()
        self._require_writable(node)
        if "parents" in meta:
            raise DriveError(
                403,
                "fieldNotWritable",
                "The parents field is not directly writable in update requests. "
                "Use the addParents and removeParents parameters instead.",
            )
        self._check_writable(meta, _UPDATE_WRITABLE)
        if has_content and (node.is_folder or node.is_google_type):
            raise _bad_request("FakeDrive cannot upload content into a folder or a Google Docs file")
        plan = self._plan_metadata(_UpdatePlan(node), meta)
        add = [self._resolve_alias(p) for p in params.get("addParents", "").split(",") if p.strip()]
        remove = [self._resolve_alias(p) for p in params.get("removeParents", "").split(",") if p.strip()]
        if add or remove:
            plan.new_parent = self._plan_move(node, add, remove, supports)
        return plan

    def _plan_metadata(self, plan: _UpdatePlan, meta: dict[str, Any]) -> _UpdatePlan:
        """Validate the writable metadata of a files.update body into ``plan``."""
        node = plan.node
        if "name" in meta:
            if not isinstance(meta["name"], str):
                raise _bad_request("name must be a string")
            plan.name = meta["name"]
        if "mimeType" in meta:
            new_mime = meta["mimeType"]
            if not isinstance(new_mime, str) or (new_mime == FOLDER_MIME) != node.is_folder:
                raise _bad_request("mimeType cannot turn a file into a folder or back")
            plan.mime_type = new_mime
        if "trashed" in meta:
            if not isinstance(meta["trashed"], bool):
                raise _bad_request("trashed must be a boolean")
            plan.trashed = meta["trashed"]
        plan.description = meta.get("description", _UNSET)
        plan.starred = bool(meta["starred"]) if "starred" in meta else None
        plan.original_filename = meta.get("originalFilename")
        if "appProperties" in meta:
            plan.app_properties = self._props(meta["appProperties"], "appProperties")
        if "properties" in meta:
            plan.properties = self._props(meta["properties"], "properties")
        if "modifiedTime" in meta:
            plan.modified = _parse_rfc3339(meta["modifiedTime"], "modifiedTime")
        return plan

    def _plan_move(self, node: _Node, add: list[str], remove: list[str], supports: bool) -> str | None:
        """New parent after addParents/removeParents; a file keeps at most one parent (FACTS §1)."""
        new_parent = None if node.parent in remove else node.parent
        if not add:
            return new_parent
        if len(add) > 1 or (new_parent is not None and add[0] != new_parent):
            raise DriveError(403, "cannotAddParent", "Increasing the number of parents is not allowed.")
        target = self._lookup(add[0], supports)
        if not target.is_folder:
            raise _bad_request(f"The specified parent is not a folder: {add[0]}")
        self._require_writable(target)
        if any(a.id == node.id for a in self._ancestors(target)):
            raise _bad_request("A folder cannot be moved into itself or its descendants.")
        return target.id

    def _commit_update(self, plan: _UpdatePlan, content: bytes | None) -> _Node:
        node = plan.node
        now = self.clock()
        changed = self._apply_metadata(plan)
        file_states: list[tuple[str, str, str | None]] = []
        descendants: list[_Node] = []
        if plan.new_parent is not _UNSET and plan.new_parent != node.parent:
            descendants.extend(self._apply_move(node, plan.new_parent, file_states))
            changed.append("parents")
        state = "update"
        if plan.trashed is not None and plan.trashed != node.explicitly_trashed:
            was_trashed = self._effective_trashed(node)
            node.explicitly_trashed = plan.trashed
            node.trashed_time = now if plan.trashed else None
            if self._effective_trashed(node) != was_trashed:
                state = "trash" if plan.trashed else "untrash"
                descendants.extend(self._subtree(node)[1:])
        if content is not None:
            self._set_content(node, content)
            changed.append("content")
        node.version += 1
        if plan.modified is not None:
            node.modified = plan.modified
        elif changed:
            node.modified = now
        if state != "update":
            file_states.append((node.id, state, None))
        elif changed:
            file_states.append((node.id, "update", ",".join(dict.fromkeys(changed))))
        self._emit(node.id, node.drive_id, file_states)
        # Items under a moved or (un)trashed folder changed too; one changes-channel ping covers them.
        for item in {d.id: d for d in descendants}.values():
            states = [(item.id, state, None)] if state != "update" else []
            self._emit(item.id, item.drive_id, states, notify_changes=False)
        return node

    @staticmethod
    def _apply_metadata(plan: _UpdatePlan) -> list[str]:
        """Apply name/description/properties…; returns ``["properties"]`` per effective change."""
        node = plan.node
        changed: list[str] = []
        updates: dict[str, Any] = {}
        for attr in ("name", "mime_type", "starred", "original_filename"):
            if getattr(plan, attr) is not None:
                updates[attr] = getattr(plan, attr)
        if plan.description is not _UNSET:
            updates["description"] = plan.description
        for attr, patch in (("app_properties", plan.app_properties), ("properties", plan.properties)):
            if patch is not None:
                merged = dict(getattr(node, attr))
                for key, value in patch.items():  # a null value deletes the key
                    if value is None:
                        merged.pop(key, None)
                    else:
                        merged[key] = value
                updates[attr] = merged
        for attr, value in updates.items():
            if getattr(node, attr) != value:
                setattr(node, attr, value)
                changed.append("properties")
        return changed

    def _apply_move(
        self, node: _Node, new_parent: str | None, file_states: list[tuple[str, str, str | None]]
    ) -> list[_Node]:
        """Re-parent ``node``; returns descendants whose shared drive changed with it."""
        old_parent = node.parent
        node.parent = new_parent
        new_drive = self._nodes[new_parent].drive_id if new_parent else None
        moved: list[_Node] = []
        if new_drive != node.drive_id:
            subtree = self._subtree(node)
            for item in subtree:
                item.drive_id = new_drive
            moved = subtree[1:]
        for folder in (old_parent, new_parent):
            if folder is not None:
                file_states.append((folder, "update", "children"))
        return moved

    def _files_delete(self, req: _Request, file_id: str) -> _Response:
        node = self._lookup(file_id, self._supports_all_drives(req.query))
        if node.is_root:
            raise _no_write_permission()
        self._require_writable(node)
        self._delete_node(node)
        return _Response(204, b"", content_type=None)

    def _delete_node(self, node: _Node) -> None:
        subtree = self._subtree(node)
        for item in subtree:
            del self._nodes[item.id]
            self._denied.pop(item.id, None)
        for index, item in enumerate(subtree):
            states: list[tuple[str, str, str | None]] = [(item.id, "remove", None)]
            if index == 0 and item.parent is not None:
                states.append((item.parent, "update", "children"))
            self._emit(item.id, item.drive_id, states, notify_changes=index == 0)

    def _emit_access_change(self, node: _Node, *, lost: bool, regained: bool = False) -> None:
        subtree = self._subtree(node) if (lost or regained) else [node]
        for index, item in enumerate(subtree):
            if lost:
                state: tuple[str, str | None] = ("remove", None)
            elif regained:
                state = ("add", None)
            else:
                state = ("update", "permissions")
            self._emit(item.id, item.drive_id, [(item.id, *state)], notify_changes=index == 0)

    # ------------------------------------------------------------------ resumable uploads

    def _resumable_start(self, req: _Request, file_id: str | None) -> _Response:
        meta = self._json_body(req)
        self._mask_for(req.query, _FILE_SCHEMA, _DEFAULT_FILE_MASK)
        declared: int | None = None
        raw_length = req.headers.get("X-Upload-Content-Length")
        if raw_length is not None:
            try:
                declared = int(raw_length)
            except ValueError:
                raise _bad_request("Invalid X-Upload-Content-Length") from None
        declared_mime = req.headers.get("X-Upload-Content-Type")
        # Validate up front, like Drive, so permission/quota errors surface at initiation.
        if file_id is None:
            self._prepare_create(meta, declared_mime, has_content=True, params=req.query)
        else:
            self._prepare_update(file_id, meta, req.query, has_content=True)
        upload_id = "AFake" + self._random_string(64, _ID_ALPHABET)
        self._sessions[upload_id] = _UploadSession(
            upload_id=upload_id,
            target_file_id=file_id,
            metadata=meta,
            params=dict(req.query),
            declared_length=declared,
            declared_mime=declared_mime,
            created=self.clock(),
        )
        path = "upload/drive/v3/files" + (f"/{urllib.parse.quote(file_id, safe='')}" if file_id else "")
        location = f"{self.base_url}{path}?uploadType=resumable&upload_id={upload_id}"
        # The client requires exactly 200 + Location here; 201 raises ResumableUploadError (FACTS gotcha 4).
        return _Response(200, b"", {"Location": location}, content_type=None)

    def _session_put(self, req: _Request) -> _Response:
        upload_id = req.query.get("upload_id")
        session = self._sessions.get(upload_id or "")
        if session is None or self.clock() - session.created > RESUMABLE_SESSION_TTL_SECONDS:
            raise DriveError(404, "notFound", "Upload session not found or expired; restart the upload.")
        if session.result_id is not None:
            node = self._nodes.get(session.result_id)
            if node is None:
                raise _not_found(session.result_id)
            return self._file_response(node, session.params)
        content_range = req.headers.get("Content-Range")
        body = req.body
        if content_range is None:
            # Whole content in one request; the client does this for empty files (no Content-Range).
            if session.data:
                raise _bad_request("Content-Range is required after part of the upload was received.")
            session.data += body
            return self._finish_session(session)
        status_query = re.fullmatch(r"\s*bytes\s+\*/(\d+|\*)\s*", content_range)
        if status_query is not None:
            if body:
                raise _bad_request("A status query (bytes */N) must have an empty body.")
            total_text = status_query.group(1)
            if total_text != "*" and int(total_text) == len(session.data):
                return self._finish_session(session)
            return self._incomplete(session)
        if self._append_chunk(session, content_range, body):
            return self._finish_session(session)
        return self._incomplete(session)

    @staticmethod
    def _append_chunk(session: _UploadSession, content_range: str, body: bytes) -> bool:
        """Store a ``bytes a-b/total`` chunk; True when it was the final one."""
        m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", content_range)
        if m is None:
            raise _bad_request(f"Invalid Content-Range: {content_range}")
        start, end = int(m.group(1)), int(m.group(2))
        total = None if m.group(3) == "*" else int(m.group(3))
        if end < start or len(body) != end - start + 1:
            raise _bad_request("Content-Range does not match the request body length.")
        if total is not None and (end >= total or (session.declared_length not in (None, total))):
            raise _bad_request("Content-Range total does not match the upload size.")
        received = len(session.data)
        if start > received:
            raise _bad_request(f"Upload offset {start} leaves a gap; the server has {received} bytes.")
        is_final = total is not None and end + 1 == total
        if not is_final and len(body) % UPLOAD_CHUNK_GRANULARITY:
            # FACTS §1/gotcha 4: chunks "in multiples of 256 KB (256 x 1024 bytes) ... except for the final".
            raise _bad_request(
                "Invalid request. The number of bytes uploaded is required to be a multiple of 262144 "
                f"except for the final request. The received request contained {len(body)} bytes."
            )
        session.data += body[received - start :]  # bytes the server already has are skipped
        return is_final

    @staticmethod
    def _incomplete(session: _UploadSession) -> _Response:
        headers = {"Range": f"bytes=0-{len(session.data) - 1}"} if session.data else {}
        return _Response(308, b"", headers, content_type=None)

    def _finish_session(self, session: _UploadSession) -> _Response:
        content = bytes(session.data)
        if session.declared_length is not None and len(content) != session.declared_length:
            raise _bad_request("Uploaded size does not match X-Upload-Content-Length.")
        if session.target_file_id is None:
            plan = self._prepare_create(
                session.metadata, session.declared_mime, has_content=True, params=session.params
            )
            node = self._commit_create(plan, content)
        else:
            update = self._prepare_update(session.target_file_id, session.metadata, session.params, has_content=True)
            node = self._commit_update(update, content)
        session.result_id = node.id
        return self._file_response(node, session.params)

    # ------------------------------------------------------------------ changes

    def _changes_list(self, req: _Request) -> _Response:
        params = req.query
        token = params.get("pageToken")
        if not token:
            raise DriveError(400, "required", "Required parameter: pageToken", location="pageToken")
        start = self._parse_change_token(token)
        mask = self._mask_for(params, _CHANGE_LIST_SCHEMA, _DEFAULT_CHANGES_MASK)
        raw_size = params.get("pageSize") or str(DEFAULT_PAGE_SIZE)
        try:
            page_size = int(raw_size)
        except ValueError:
            raise _invalid("pageSize") from None
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise _invalid("pageSize")
        include_removed = self._bool(params, "includeRemoved", default=True)  # FACTS gotcha 9
        scope = self._change_scope(params)
        spaces = {s.strip() for s in params.get("spaces", "drive").split(",") if s.strip()}
        if not spaces or not spaces <= {"drive", "appDataFolder", "photos"}:
            raise _invalid("spaces")
        limit = self._page_length(page_size, self._changes_pages_served)
        self._changes_pages_served += 1
        changes: list[dict[str, Any]] = []
        position = start
        last = len(self._changes)
        while position <= last and len(changes) < limit:
            entry = self._changes[position - 1]
            position += 1
            # Drive reports each file once, at its latest change, with its current state.
            if self._latest.get(entry.file_id) != entry.position or not self._in_scope(entry.drive_id, *scope):
                continue
            node = self._nodes.get(entry.file_id)
            removed = node is None or self._access(node) == "notFound"  # deleted *or lost access*
            if removed and not include_removed:
                continue
            change: dict[str, Any] = {
                "kind": "drive#change",
                "type": "file",
                "changeType": "file",
                "time": _rfc3339(entry.time),
                "removed": removed,
                "fileId": entry.file_id,
            }
            if entry.drive_id is not None:
                change["driveId"] = entry.drive_id
            if node is not None and not removed:
                change["file"] = self._file_json(node)
            changes.append(change)
        out: dict[str, Any] = {"kind": "drive#changeList", "changes": changes}
        if position <= last:
            out["nextPageToken"] = str(position)
        else:
            out["newStartPageToken"] = str(last + 1)  # only on the last page (FACTS §1 "ChangeList")
        return _json_response(apply_mask(out, mask))

    def _parse_change_token(self, token: str) -> int:
        try:
            position = int(token)
        except ValueError:
            raise _invalid("pageToken") from None
        if position < 1:
            raise _invalid("pageToken")
        return position

    def _change_scope(self, params: dict[str, str]) -> tuple[bool, str | None, bool]:
        supports = self._supports_all_drives(params)
        include = self._bool(params, "includeItemsFromAllDrives") or self._bool(params, "includeTeamDriveItems")
        drive_id = params.get("driveId") or params.get("teamDriveId")
        if drive_id and not supports:
            raise _invalid("supportsAllDrives", "driveId requires supportsAllDrives=true.")
        if drive_id and drive_id not in self._drives:
            raise DriveError(404, "notFound", f"Shared drive not found: {drive_id}", location="driveId")
        return supports and include, drive_id or None, self._bool(params, "restrictToMyDrive")

    @staticmethod
    def _in_scope(drive_id: str | None, all_drives: bool, only_drive: str | None, my_drive_only: bool) -> bool:
        if only_drive is not None:
            return drive_id == only_drive
        if drive_id is None:
            return True
        return all_drives and not my_drive_only

    def _emit(
        self,
        file_id: str,
        drive_id: str | None,
        file_states: Iterable[tuple[str, str, str | None]],
        *,
        notify_changes: bool = True,
    ) -> None:
        """Append a change and queue notifications for the channels that see it."""
        position = len(self._changes) + 1
        self._changes.append(_ChangeEntry(position, file_id, self.clock(), drive_id))
        self._latest[file_id] = position
        states = list(file_states)
        for channel in list(self._channels.values()):
            if not self._channel_live(channel):
                continue
            if channel.kind == "changes":
                scope = (channel.include_all_drives, channel.drive_id, channel.restrict_to_my_drive)
                if notify_changes and self._in_scope(drive_id, *scope):
                    self._enqueue(channel, "change", None)
            else:
                for watched, state, changed in states:
                    if watched == channel.file_id:
                        self._enqueue(channel, state, changed)

    # ------------------------------------------------------------------ watch / channels

    def _changes_watch(self, req: _Request) -> _Response:
        token = req.query.get("pageToken")
        if not token:
            raise DriveError(400, "required", "Required parameter: pageToken", location="pageToken")
        self._parse_change_token(token)
        all_drives, drive_id, my_drive_only = self._change_scope(req.query)
        uri_query = urllib.parse.urlencode(
            {k: v for k, v in req.query.items() if k not in ("fields", "prettyPrint")} | {"alt": "json"}
        )
        channel = self._new_channel(
            self._json_body(req),
            kind="changes",
            max_seconds=CHANGES_CHANNEL_MAX_SECONDS,
            resource_uri=f"{REAL_API_ROOT}changes?{uri_query}",
            file_id=None,
            include_all_drives=all_drives,
            drive_id=drive_id,
            restrict_to_my_drive=my_drive_only,
        )
        return self._channel_response(channel)

    def _files_watch(self, req: _Request, file_id: str) -> _Response:
        supports = self._supports_all_drives(req.query)
        node = self._lookup(file_id, supports)
        channel = self._new_channel(
            self._json_body(req),
            kind="file",
            max_seconds=FILES_CHANNEL_MAX_SECONDS,
            resource_uri=f"{REAL_API_ROOT}files/{node.id}?alt=json&supportsAllDrives={str(supports).lower()}",
            file_id=node.id,
            include_all_drives=supports,
            drive_id=None,
            restrict_to_my_drive=False,
        )
        return self._channel_response(channel)

    def _new_channel(
        self,
        body: dict[str, Any],
        *,
        kind: Literal["changes", "file"],
        max_seconds: int,
        resource_uri: str,
        file_id: str | None,
        include_all_drives: bool,
        drive_id: str | None,
        restrict_to_my_drive: bool,
    ) -> _Channel:
        channel_id = body.get("id")
        if not isinstance(channel_id, str) or not channel_id:
            raise DriveError(400, "required", "Required: channel id", location="resource.id", location_type="other")
        if len(channel_id) > 64:
            raise _invalid("resource.id", "Channel id must be at most 64 characters.")
        if body.get("type") not in ("web_hook", "webhook"):
            raise _invalid("resource.type", f"Unknown channel type: {body.get('type')!r}")
        address = body.get("address")
        if not isinstance(address, str) or not address:
            raise DriveError(400, "required", "Required: channel address", location="resource.address")
        scheme = urllib.parse.urlsplit(address).scheme
        if scheme not in ("http", "https") or (self.require_https_webhooks and scheme != "https"):
            raise DriveError(400, "push.webhookUrlNotHttps", f"WebHook callback must be HTTPS: {address}")
        token = body.get("token")
        if token is not None and (not isinstance(token, str) or len(token) > 256):
            raise _invalid("resource.token", "Channel token must be a string of at most 256 characters.")
        existing = self._channels.get(channel_id)
        if existing is not None and self._channel_live(existing):
            raise DriveError(400, "push.channelIdNotUnique", f"Channel id {channel_id} not unique")
        now_ms = self._now_ms()
        limit_ms = now_ms + max_seconds * 1000
        requested = body.get("expiration")
        if requested is None:
            expiration = now_ms + DEFAULT_CHANNEL_SECONDS * 1000
        else:
            try:
                expiration = int(requested)
            except (TypeError, ValueError):
                raise _invalid("resource.expiration") from None
            if expiration <= now_ms:
                # Typical bug: seconds instead of milliseconds. Drive expects Unix *ms* (FACTS §1).
                raise _invalid("resource.expiration", "Channel expiration must be in the future (Unix ms).")
            expiration = min(expiration, limit_ms)  # "the more restrictive ... applies" (FACTS §2)
        channel = _Channel(
            id=channel_id,
            resource_id=self._random_string(27, _ID_ALPHABET),
            resource_uri=resource_uri,
            address=address,
            token=token,
            expiration_ms=expiration,
            kind=kind,
            file_id=file_id,
            include_all_drives=include_all_drives,
            drive_id=drive_id,
            restrict_to_my_drive=restrict_to_my_drive,
        )
        self._channels[channel_id] = channel
        # The sync message may arrive before the watch response (FACTS §2, gotcha 8).
        self._enqueue(channel, "sync", None)
        return channel

    @staticmethod
    def _channel_response(channel: _Channel) -> _Response:
        out: dict[str, Any] = {
            "kind": "api#channel",
            "id": channel.id,
            "resourceId": channel.resource_id,
            "resourceUri": channel.resource_uri,
            "expiration": str(channel.expiration_ms),  # int64 as a string in the schema
        }
        if channel.token is not None:
            out["token"] = channel.token
        return _json_response(out)

    def _channels_stop(self, req: _Request) -> _Response:
        body = self._json_body(req)
        channel = self._channels.get(str(body.get("id", "")))
        if channel is None or channel.stopped or channel.resource_id != body.get("resourceId"):
            raise DriveError(404, "notFound", f"Channel '{body.get('id')}' not found for project 'fakedrive'")
        channel.stopped = True
        return _Response(204, b"", content_type=None)

    # ------------------------------------------------------------------ state helpers

    def _make_node(self, node_id: str, name: str, mime: str, parent: str | None, drive_id: str | None) -> _Node:
        self._seq += 1
        now = self.clock()
        return _Node(node_id, name, mime, parent, drive_id, self._seq, now, now)

    def _node(self, file_id: str) -> _Node:
        node = self._nodes.get(self._resolve_alias(file_id))
        if node is None:
            raise KeyError(file_id)
        return node

    def _helper_parent(self, parent: str | None, drive_id: str | None) -> _Node:
        if parent is None:
            return self._node(drive_id) if drive_id is not None else self._nodes[self.root_id]
        node = self._node(parent)
        if drive_id is not None and node.drive_id != drive_id:
            raise ValueError(f"parent {parent} is not in shared drive {drive_id}")
        if not node.is_folder:
            raise ValueError(f"parent {parent} is not a folder")
        return node

    def _resolve_alias(self, file_id: str) -> str:
        return self.root_id if file_id == "root" else file_id

    def _lookup(self, file_id: str, supports_all_drives: bool) -> _Node:
        """A visible node or 404 notFound (unknown, denied, or shared-drive without supportsAllDrives)."""
        node = self._nodes.get(self._resolve_alias(file_id))
        if node is None or self._access(node) == "notFound":
            raise _not_found(file_id)
        if node.drive_id is not None and not supports_all_drives:
            raise _not_found(file_id)  # FACTS §1: missing supportsAllDrives=true → 404 notFound
        return node

    def _require_writable(self, node: _Node) -> None:
        if self._access(node) == "readonly":
            raise _no_write_permission()

    def _ancestors(self, node: _Node) -> list[_Node]:
        """The node itself, then its parents up to the root."""
        chain: list[_Node] = []
        current: _Node | None = node
        while current is not None and len(chain) < 200:
            chain.append(current)
            current = self._nodes.get(current.parent) if current.parent else None
        return chain

    def _access(self, node: _Node) -> Literal["ok", "readonly", "notFound"]:
        if not self._denied:
            return "ok"
        readonly = False
        for item in self._ancestors(node):
            reason = self._denied.get(item.id)
            if reason == "notFound":
                return "notFound"
            if reason == "insufficientFilePermissions":
                readonly = True
        return "readonly" if readonly else "ok"

    def _effective_trashed(self, node: _Node) -> bool:
        """Items inside a trashed folder are trashed too."""
        return any(item.explicitly_trashed for item in self._ancestors(node))

    def _subtree(self, node: _Node) -> list[_Node]:
        kids: dict[str, list[_Node]] = {}
        for item in sorted(self._nodes.values(), key=lambda n: n.seq):
            if item.parent is not None:
                kids.setdefault(item.parent, []).append(item)
        out = [node]
        index = 0
        while index < len(out):
            out.extend(kids.get(out[index].id, []))
            index += 1
        return out

    def _file_json(self, node: _Node) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "drive#file", "id": node.id, "name": node.name, "mimeType": node.mime_type}
        if node.is_root:
            if node.drive_id is not None:
                out["driveId"] = node.drive_id
            return out
        trashed = self._effective_trashed(node)
        out.update(
            {
                "starred": node.starred,
                "trashed": trashed,
                "explicitlyTrashed": node.explicitly_trashed,
                "parents": [node.parent] if node.parent else [],
                "spaces": ["drive"],
                "version": str(node.version),
                "createdTime": _rfc3339(node.created),
                "modifiedTime": _rfc3339(node.modified),
                "ownedByMe": node.drive_id is None,
                "shared": False,
            }
        )
        if not node.parent:
            del out["parents"]
        if node.description is not None:
            out["description"] = node.description
        if node.app_properties:
            out["appProperties"] = dict(node.app_properties)
        if node.properties:
            out["properties"] = dict(node.properties)
        if node.trashed_time is not None and node.explicitly_trashed:
            out["trashedTime"] = _rfc3339(node.trashed_time)
        if node.drive_id is not None:
            out["driveId"] = node.drive_id
            out["teamDriveId"] = node.drive_id
        if node.content is not None and not node.is_google_type:
            # size is an int64 *string*; folders and Docs have no size/md5 (FACTS §1).
            out["size"] = str(len(node.content))
            out["quotaBytesUsed"] = str(len(node.content))
            out["md5Checksum"] = node.md5
            out["sha1Checksum"] = node.sha1
            out["sha256Checksum"] = node.sha256
            out["headRevisionId"] = node.head_revision_id
            if node.original_filename is not None:
                out["originalFilename"] = node.original_filename
            base = node.original_filename or node.name
            if "." in base.strip("."):
                out["fileExtension"] = base.rsplit(".", 1)[1]
                out["fullFileExtension"] = base.split(".", 1)[1]
        else:
            out["quotaBytesUsed"] = "0"
        return out

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _random_string(self, length: int, alphabet: str) -> str:
        with self._lock:
            return "".join(self._rng.choice(alphabet) for _ in range(length))

    def _new_file_id(self) -> str:
        # Real file ids are 33 characters starting with "1".
        if self.descending_ids:
            with self._lock:
                self._descending -= 1
                return "1" + f"{self._descending:012d}" + self._random_string(20, _ID_ALPHABET)
        while True:
            candidate = "1" + self._random_string(32, _ID_ALPHABET)
            if candidate not in self._nodes:
                return candidate

    def _new_root_id(self) -> str:
        # My Drive and shared-drive root ids look like "0A…Uk9PVA" ("ROOT" in base64).
        return "0A" + self._random_string(11, _ALNUM) + "Uk9PVA"


def build_drive_client(base_url: str) -> Any:
    """A real ``googleapiclient`` Drive v3 ``Resource`` pointed at ``base_url`` (FACTS §3 recipe).

    ``client_options={"api_endpoint": ...}`` is not enough: media upload URLs keep ``https`` (FACTS
    gotcha 1), so the static discovery document is loaded and its ``rootUrl`` patched.
    ``AnonymousCredentials`` make the client wrap ``build_http()`` in ``AuthorizedHttp`` — a bare
    ``httplib2.Http()`` would treat ``308 Resume Incomplete`` as a redirect (gotcha 3). Close the
    returned resource (``resource.close()``) to release its keep-alive sockets.
    """
    from google.auth.credentials import AnonymousCredentials
    from googleapiclient.discovery import build_from_document
    from googleapiclient.discovery_cache import get_static_doc

    text = get_static_doc("drive", "v3")
    if text is None:
        raise RuntimeError("google-api-python-client ships no static drive v3 discovery document")
    doc = json.loads(text)
    root = base_url if base_url.endswith("/") else base_url + "/"
    doc["rootUrl"] = root
    doc["mtlsRootUrl"] = root
    doc["baseUrl"] = root + doc.get("servicePath", "drive/v3/")
    return build_from_document(doc, credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
