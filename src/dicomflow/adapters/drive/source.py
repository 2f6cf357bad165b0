"""A Google Drive folder tree as a source of DICOM files.

- listing: `'<id>' in parents and trashed = false` per folder, explicit `fields`, 1000 per page, paged
  until `nextPageToken` is absent (pages may be short or empty while more remain: GCP_FACTS gotcha 6);
- discovery reads only each file's first bytes with a ranged GET (more only for very long headers); an
  answer shorter than asked of a file the listing says is longer is a short read, retried with backoff,
  then a TransientError (never taken for the end of the file: issue 9);
- downloads stream to disk in chunks, several files at once, each verified against Drive's md5, and the
  folder handed to dcm2niix is checked against the listing (count, sizes) before conversion.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from googleapiclient.http import MediaIoBaseDownload

from dicomflow.adapters.drive.connection import NUM_RETRIES, DriveConnection
from dicomflow.domain.failures import (
    ChecksumMismatch,
    SeriesChanged,
    ServiceUnavailable,
    SourceNotFound,
    TransientError,
)
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.paths import encode_component, join
from dicomflow.domain.series import FileRef, Ignored, IgnoredKind
from dicomflow.ports import Progress, SkippedFile

FOLDER = "application/vnd.google-apps.folder"
GOOGLE_TYPES = "application/vnd.google-apps."
LIST_FIELDS = "nextPageToken, files(id, name, mimeType, size, md5Checksum)"
DOWNLOAD_CHUNK = 8 * 1024 * 1024
DOWNLOAD_ATTEMPTS = 4
READ_ATTEMPTS = 4
_ALL = {"supportsAllDrives": True}


def quote(value: str) -> str:
    """A string literal for the `q` grammar: backslash and single quote escaped (GCP_FACTS §1)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _folder_id(location: Location) -> str:
    if location.kind is not LocationKind.DRIVE:
        raise ValueError(f"not a Drive location: {location}")
    return location.ref


class DriveSource:
    def __init__(self, drive: DriveConnection) -> None:
        self._drive = drive

    def check(self, location: Location) -> str:
        folder = _folder_id(location)
        meta = self._drive.execute(
            lambda s: s.files.get(fileId=folder, fields="id,name,mimeType,trashed", **_ALL),
            what=f"source folder {folder}",
        )
        if meta.get("mimeType") != FOLDER:
            raise SourceNotFound(f"source {folder} ({meta.get('name')!r}) is a file, not a folder")
        if meta.get("trashed"):
            raise SourceNotFound(f"source folder {folder} ({meta.get('name')!r}) is in the trash")
        return str(meta.get("name", folder))

    def children(self, folder_id: str) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:

            def listing(service: Any, page_token: str | None = token) -> Any:
                return service.files.list(
                    q=f"{quote(folder_id)} in parents and trashed = false",
                    fields=LIST_FIELDS,
                    pageSize=1000,
                    pageToken=page_token,
                    corpora="allDrives",
                    includeItemsFromAllDrives=True,
                    **_ALL,
                )

            page = self._drive.execute(listing, what=f"folder {folder_id}")
            yield from page.get("files") or ()
            token = page.get("nextPageToken")
            if not token:
                return

    def list_files(self, location: Location) -> Iterator[FileRef | SkippedFile]:
        stack: list[tuple[str, str]] = [(_folder_id(location), "")]
        while stack:
            folder, rel = stack.pop()
            for entry in self.children(folder):
                path = join(rel, encode_component(str(entry.get("name", ""))))
                mime = str(entry.get("mimeType", ""))
                if mime == FOLDER:
                    stack.append((str(entry["id"]), path))
                elif mime.startswith(GOOGLE_TYPES):
                    # Google Docs, shortcuts, forms...: not files that can hold DICOM; reported, not read.
                    yield SkippedFile(path, Ignored(IgnoredKind.NOT_BINARY, mime.removeprefix(GOOGLE_TYPES)))
                else:
                    yield FileRef(ref=str(entry["id"]), path=path, size=int(entry.get("size") or 0),
                                  md5=entry.get("md5Checksum"))  # fmt: skip

    def read_prefix(self, ref: FileRef, size: int) -> bytes:
        if size <= 0:
            return b""

        def ranged(service: Any) -> Any:
            request = service.files.get_media(fileId=ref.ref, **_ALL)
            request.headers["Range"] = f"bytes=0-{size - 1}"
            return request

        expected = min(size, ref.size) if ref.size > 0 else size
        got = 0
        for attempt in range(READ_ATTEMPTS):
            data = bytes(self._drive.execute(ranged, what=f"Drive file {ref.ref}"))
            if len(data) >= expected:
                return data[:size]  # a server may ignore Range and send the whole file (200)
            got = len(data)
            self._drive.sleep(random.uniform(0.05, 0.5) * 2**attempt)  # noqa: S311 - capped jitter
        raise ServiceUnavailable(
            f"Google Drive kept answering short reads for Drive file {ref.ref} ({got} of {expected} bytes); "
            "it will be retried"
        )

    def refresh(self, refs: Sequence[FileRef]) -> list[FileRef]:
        def current(ref: FileRef) -> FileRef | None:
            try:
                meta = self._drive.execute(
                    lambda s: s.files.get(fileId=ref.ref, fields="id,size,md5Checksum,trashed", **_ALL),
                    what=f"Drive file {ref.ref}",
                )
            except SourceNotFound:
                return None
            if meta.get("trashed"):
                return None
            return FileRef(ref.ref, ref.path, int(meta.get("size") or 0), meta.get("md5Checksum"))

        with ThreadPoolExecutor(max_workers=self._drive.download_concurrency) as pool:
            return [r for r in pool.map(current, refs) if r is not None]

    def fetch(self, refs: Sequence[FileRef], dest_dir: Path, progress: Progress | None = None) -> Path:
        """Download every file into `dest_dir`, `download_concurrency` at a time; memory stays bounded by
        concurrency x chunk size whatever the series size."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        total = sum(r.size for r in refs)
        done = [0]
        lock = threading.Lock()

        def advance(n: int) -> None:
            if progress is None:
                return
            with lock:
                done[0] += n
                progress(done[0], total)

        def one(indexed: tuple[int, FileRef]) -> None:
            index, ref = indexed
            self._download(ref, dest_dir / f"{index:06d}.dcm", advance)

        with ThreadPoolExecutor(max_workers=min(self._drive.download_concurrency, max(1, len(refs)))) as pool:
            list(pool.map(one, enumerate(refs)))  # the first failure propagates; the series is retried whole
        _check_against_listing(refs, dest_dir)
        return dest_dir

    def _download(self, ref: FileRef, target: Path, advance: Callable[[int], None]) -> None:
        what = f"Drive file {ref.ref}"
        for attempt in range(DOWNLOAD_ATTEMPTS):
            digest = hashlib.md5(usedforsecurity=False)
            written = 0
            try:
                with target.open("wb") as handle, self._drive.client() as service:
                    request = service.files.get_media(fileId=ref.ref, **_ALL)
                    writer = _HashingWriter(handle, digest)
                    downloader = MediaIoBaseDownload(writer, request, chunksize=DOWNLOAD_CHUNK)
                    downloader._sleep = self._drive.sleep  # the client's documented retry hook
                    finished = False
                    while not finished:
                        _status, finished = self._drive.guard(partial(downloader.next_chunk, num_retries=NUM_RETRIES),
                                                              what=what)  # fmt: skip
                        advance(writer.count - written)
                        written = writer.count
                if ref.md5 and digest.hexdigest() != ref.md5:
                    raise ChecksumMismatch(f"{what} did not match Drive's checksum after download")
                if not ref.md5 and written != ref.size:
                    raise SeriesChanged(f"{what} changed size since it was discovered (still uploading?)")
            except TransientError:
                advance(-written)
                if attempt == DOWNLOAD_ATTEMPTS - 1:
                    raise
                self._drive.sleep(random.uniform(0.05, 0.5) * 2**attempt)  # noqa: S311 - capped jitter
            else:
                return


def _check_against_listing(refs: Sequence[FileRef], dest_dir: Path) -> None:
    """The folder dcm2niix will read holds exactly the listed files, each of its listed size (md5s were
    checked while downloading): nothing missing, nothing cut short, nothing extra."""
    present = {p.name: p.stat().st_size for p in dest_dir.iterdir() if p.is_file()}
    expected = {f"{index:06d}.dcm": ref.size for index, ref in enumerate(refs)}
    if present != expected:
        wrong = sorted(name for name in present.keys() | expected.keys() if present.get(name) != expected.get(name))
        raise ChecksumMismatch(
            f"the downloaded files of this series do not match Drive's listing ({len(present)} files for "
            f"{len(expected)} listed, {len(wrong)} differing); it will be retried"
        )


class _HashingWriter:
    """A file-like sink for MediaIoBaseDownload that hashes what it writes (no second read)."""

    def __init__(self, handle: Any, digest: Any) -> None:
        self._handle = handle
        self._digest = digest
        self.count = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.count += len(data)
        return int(self._handle.write(data))
