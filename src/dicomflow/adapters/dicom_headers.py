"""Series discovery from file headers, never pixels.

DESIGN.md §9, measured on real scanner data: every grouping tag (SeriesInstanceUID, SeriesNumber,
Modality, ImageType, SOPClassUID) lies in the first ~9 KB, and pydicom's `read_partial` over a 64 KiB
prefix with `stop_when=<group > 0x0020>` grouped 11,390/11,390 files correctly and fastest. A prefix is
not a full header (Siemens CSA headers exceed 300 KB) — it is used for grouping only, and read longer
only when the grouping tags were not reached.

Patient identifiers are read here for one purpose: to scrub them out of the SeriesDescription and the
file's folder names before anything is recorded (domain/privacy.py, docs/privacy.md). They are never
returned.

A failed read is never taken for a fact about the file (issue 9: a transient fault must not change what
is converted). "Not DICOM", "empty" and "truncated" come from bytes actually read; a read that returns
fewer bytes than asked of a file whose size the listing gave is a short read, not the end of the file; a
read that fails for a reason that may pass (a reset, a timeout, EIO, 429/5xx) raises a TransientError so
the queue retries the scan step. Only a permanent refusal (permission denied, the file is gone) makes a
file "unreadable", which is reported apart from "not DICOM".
"""

from __future__ import annotations

import errno
import io
import logging
import posixpath
import struct
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dicomflow.adapters.dicom_fastscan import WANTED, Truncated, Unsupported, read_fast
from dicomflow.domain.failures import DicomflowError, TransientError
from dicomflow.domain.paths import decode_component, split
from dicomflow.domain.privacy import IDENTIFIER_KEYS, DirScrub, Identifiers, scrub_dirs, scrub_text
from dicomflow.domain.series import DicomHeader, FileRef, Ignored, IgnoredKind, ScanResult
from dicomflow.ports import Source

log = logging.getLogger(__name__)

PREFIX_BYTES = 64 * 1024
# Prefix sizes tried in turn when the grouping tags are not within the first one.
PREFIX_STEPS = (PREFIX_BYTES, 1024 * 1024, 16 * 1024 * 1024)
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_GROUPING_GROUP_END = 0x0020


class NeedMore(Exception):
    """The prefix ended before the grouping tags; read a longer prefix."""


class ShortRead(TransientError):
    """A read returned fewer bytes than asked of a file that is longer (a dropped connection, a file
    still being written): retried, never taken for the end of the file."""

    code = "short_read"


class ReadFailed(TransientError):
    """Reading a file failed for a reason that may pass (I/O error, timeout); the scan is retried."""

    code = "read_failed"


def _looks_like_raw_dicom(data: bytes) -> bool:
    """Files without the 128-byte preamble (old exports): they start with a group 0x0002/0x0008 tag,
    little or (retired) big endian."""
    if len(data) < 8:
        return False
    return struct.unpack_from("<H", data, 0)[0] in (0x0002, 0x0008) or struct.unpack_from(">H", data, 0)[0] in (
        0x0002,
        0x0008,
    )


def parse_header(
    data: bytes, *, complete: bool, folder: str | Sequence[str] = "", key: bytes = b"", memo: Memo | None = None
) -> ScanResult:
    """Interpret the first bytes of a file. `complete` says whether `data` is the whole file (so a
    parse that runs out of bytes means a truncated file rather than a short prefix).

    Raises NeedMore when the prefix is too short to decide.
    """
    if not data:
        return Ignored(IgnoredKind.EMPTY)
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    if not has_preamble and not _looks_like_raw_dicom(data):
        detail = "shorter than a DICOM preamble" if not complete and len(data) < 132 else ""
        return Ignored(IgnoredKind.NOT_DICOM, detail)
    try:
        fast = read_fast(data)
    except Truncated:
        if not complete:
            raise NeedMore from None
        return Ignored(IgnoredKind.TRUNCATED, "ends inside its header")
    except Unsupported:
        return _parse_with_pydicom(
            data, complete=complete, has_preamble=has_preamble, folder=folder, key=key, memo=memo
        )
    return _header_from(
        fast.values,
        need_more=not fast.reached_end and not complete,
        ended_early=not fast.reached_end,
        folder=folder,
        key=key,
        memo=memo,
    )


def _parse_with_pydicom(
    data: bytes,
    *,
    complete: bool,
    has_preamble: bool,
    folder: str | Sequence[str] = "",
    key: bytes = b"",
    memo: Memo | None = None,
) -> ScanResult:
    """The slow, general path: big endian, deflate, other character sets, odd files."""
    # Imported here: most files never need it, and importing pydicom costs a quarter of a second.
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415
    from pydicom.filereader import read_partial  # noqa: PLC0415

    reached_end_of_grouping = False

    def stop(tag: Any, _vr: Any, _length: Any) -> bool:
        nonlocal reached_end_of_grouping
        reached_end_of_grouping = bool(tag.group > _GROUPING_GROUP_END)
        return reached_end_of_grouping

    # zlib.error: a deflated dataset whose prefix ends inside the deflate stream pydicom inflates at once.
    errors = (InvalidDicomError, EOFError, struct.error, ValueError, KeyError, OverflowError, TypeError, zlib.error)
    with warnings.catch_warnings():
        # pydicom warns about odd but readable files; its warnings may quote tag values, which can be
        # patient identifiers, and must not reach logs.
        warnings.simplefilter("ignore")
        try:
            ds = read_partial(io.BytesIO(data), stop_when=stop, defer_size=4096, force=not has_preamble)
            # pydicom decodes values lazily, so a corrupt value can also surface while extracting.
            values = _values_from_dataset(ds)
        except errors as exc:
            if not complete:
                raise NeedMore from exc
            kind = IgnoredKind.TRUNCATED if isinstance(exc, EOFError | struct.error) else IgnoredKind.UNREADABLE
            return Ignored(kind, type(exc).__name__)
    return _header_from(
        values,
        need_more=not reached_end_of_grouping and not complete,
        ended_early=not reached_end_of_grouping,
        folder=folder,
        key=key,
        memo=memo,
    )


def _values_from_dataset(ds: Any) -> dict[str, str]:
    """The same raw string values the fast reader extracts (multi-values joined with a backslash)."""
    values: dict[str, str] = {}
    meta = getattr(ds, "file_meta", None)
    for (group, element), name in WANTED.items():
        source = meta if group == 0x0002 else ds
        if source is None or (group, element) not in source:
            continue
        value = source[(group, element)].value
        if value is None:
            continue
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        values[name] = text.strip()
    return values


def _header_from(
    values: Mapping[str, str],
    *,
    need_more: bool,
    ended_early: bool,
    folder: str | Sequence[str] = "",
    key: bytes = b"",
    memo: Memo | None = None,
) -> ScanResult:
    """The grouping fields from raw values. `need_more`: the prefix ended before group 0x0020 did;
    `ended_early`: the data ended before it (in a whole file, a sign of truncation).

    The identifiers of the header (patient, people, institution, dates: `Identifiers.from_values`) are
    used here and dropped: the description keeps what is left after scrubbing them out, and the file's
    folder (`folder`, relative to the source) is recorded only as scrubs under the pseudonym `key`
    (privacy.scrub_dirs) — no identifier and no source name outlives this function, or the scan of one
    chunk when a `memo` is given (the files of a series share their identifiers, description and folder:
    each combination is scrubbed once per chunk)."""
    sop_class = values.get("sop_class") or values.get("media_sop_class", "")
    if sop_class == DICOMDIR_SOP_CLASS:
        return Ignored(IgnoredKind.DICOMDIR)
    series_uid = values.get("series_uid", "")
    sop_uid = values.get("sop_instance") or values.get("media_sop_instance", "")
    required = {"SeriesInstanceUID": series_uid, "SOPClassUID": sop_class, "SOPInstanceUID": sop_uid}
    missing = [name for name, value in required.items() if not value]
    if missing:
        if need_more:
            raise NeedMore
        kind = IgnoredKind.TRUNCATED if ended_early else IgnoredKind.NO_SERIES
        return Ignored(kind, "missing " + ", ".join(missing))

    text = values.get("series_description") or values.get("protocol_name", "")
    description, folders = _scrubbed(values, text, folder, key, memo)
    image_type = tuple(v.strip() for v in values.get("image_type", "").split("\\") if v.strip())
    return DicomHeader(
        series_uid=series_uid,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        series_number=_series_number(values.get("series_number")),
        modality=values.get("modality", ""),
        series_description=description,
        image_type=image_type,
        folders=folders,
    )


# Scrubs already made during one chunk's scan: (identifier values, text, folder, key) -> (description, folders).
Memo = dict[tuple[object, ...], tuple[str, tuple[DirScrub, ...]]]


def _scrubbed(
    values: Mapping[str, str], text: str, folder: str | Sequence[str], key: bytes, memo: Memo | None
) -> tuple[str, tuple[DirScrub, ...]]:
    found = tuple(sorted((k, v) for k, v in values.items() if k in IDENTIFIER_KEYS and v))
    memo_key = (found, text, folder if isinstance(folder, str) else tuple(folder), key)
    if memo is not None and memo_key in memo:
        return memo[memo_key]
    identifiers = Identifiers.from_values(values)
    scrubbed = scrub_text(text, identifiers), (scrub_dirs(folder, identifiers, key=key) if key else ())
    if memo is not None:
        memo[memo_key] = scrubbed
    return scrubbed


def _series_number(raw: str | None) -> int | None:
    try:
        return int(float(raw)) if raw else None
    except (TypeError, ValueError):
        return None


# Refusals that another attempt cannot change: the file is unreadable, which is reported, not retried.
_PERMANENT_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "no longer exists",
    errno.EISDIR: "is a folder",
    errno.ENAMETOOLONG: "name too long",
    errno.ELOOP: "symbolic link loop",
}


def _read(read_prefix: Callable[[int], bytes], want: int) -> bytes | Ignored:
    try:
        return read_prefix(want)
    except DicomflowError as exc:
        if not exc.permanent:
            raise  # a rate limit, an outage, a dropped connection: the scan task is retried
        return Ignored(IgnoredKind.UNREADABLE, exc.code)  # e.g. the file was deleted or unshared since listed
    except OSError as exc:
        reason = _PERMANENT_ERRNOS.get(exc.errno or 0)
        if reason is None:
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            raise ReadFailed(f"reading a file failed ({name}); the scan will be retried") from exc
        return Ignored(IgnoredKind.UNREADABLE, reason)


def scan_one(
    read_prefix: Callable[[int], bytes],
    size: int,
    *,
    folder: str | Sequence[str] = "",
    key: bytes = b"",
    memo: Memo | None = None,
) -> ScanResult:
    """Read as little of one file as needed to group it. `size` is the file's size from the listing.

    Raises a TransientError (ShortRead, ReadFailed, or the source's own) when a read failed in a way
    that may pass; returns Ignored only for what the bytes, or a permanent refusal, say.
    """
    if size == 0:
        return Ignored(IgnoredKind.EMPTY)
    for step in PREFIX_STEPS:
        want = min(step, size)
        data = _read(read_prefix, want)
        if isinstance(data, Ignored):
            return data
        if len(data) < want:
            raise ShortRead(
                f"a read returned {len(data)} of the {want} bytes asked of a file of {size} bytes; "
                "the scan will be retried"
            )
        complete = want >= size
        try:
            return parse_header(data, complete=complete, folder=folder, key=key, memo=memo)
        except NeedMore:
            if complete:  # pragma: no cover - parse_header never asks for more of a complete file
                break
        except Exception as exc:  # the bytes are what they are: a parser failure is not a read failure
            log.debug("header parse failed: %s", type(exc).__name__)
            return Ignored(IgnoredKind.UNREADABLE, type(exc).__name__)
    return Ignored(IgnoredKind.UNREADABLE, "header longer than 16 MiB")


def _scan_ref(source: Source, ref: FileRef, key: bytes, memo: Memo | None = None) -> ScanResult:
    # No catch-all here: an error nobody classified is a bug or an unmapped network fault, and the scan
    # task must fail (and be retried) rather than silently drop the file from its series.
    folders = [decode_component(c) for c in split(posixpath.dirname(ref.path))]  # names as the source has them
    return scan_one(lambda n: source.read_prefix(ref, n), ref.size, folder=folders, key=key, memo=memo)


class SequentialScanner:
    """Scans in the calling thread; parallelism comes from fanning chunks out over the queue's workers.
    `key` is the destination's pseudonym key: folders are recorded as keyed scrubs (docs/privacy.md)."""

    def __init__(self, key: bytes = b"") -> None:
        self._key = key

    def scan(self, source: Source, refs: Sequence[FileRef]) -> list[ScanResult]:
        memo: Memo = {}  # this chunk's scrubs; gone when the scan returns
        return [_scan_ref(source, ref, self._key, memo) for ref in refs]


class ThreadedScanner:
    """Scans with a thread pool: for remote sources, where each read is a network round trip."""

    def __init__(self, threads: int, key: bytes = b"") -> None:
        self._threads = max(1, threads)
        self._key = key

    def scan(self, source: Source, refs: Sequence[FileRef]) -> list[ScanResult]:
        memo: Memo = {}  # shared by the threads: at worst a scrub is made twice
        if len(refs) <= 1:
            return [_scan_ref(source, ref, self._key, memo) for ref in refs]
        with ThreadPoolExecutor(max_workers=min(self._threads, len(refs))) as pool:
            return list(pool.map(lambda ref: _scan_ref(source, ref, self._key, memo), refs))
