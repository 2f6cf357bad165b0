"""A Google Drive folder as the destination of NIfTI outputs.

Idempotent (DESIGN.md invariant 3): every output carries `appProperties` naming the series (`dicomflow_key`)
and the file (`dicomflow_name`). Before creating, the sink looks for a file with those tags in the target
folder: same md5 → nothing to do; other content → its content is replaced. Names are not unique in Drive
(GCP_FACTS gotcha 7), so a name alone could never tell our file from a user's — and a user's file of the
same name is never touched. If two deliveries of one task race past the lookup, both create, both list
again, and the older file wins: the newer one is deleted by its creator.

The destination tree mirrors the source's folders, with the original names. Concurrent workers creating
the same folder converge the same way: everyone uses the oldest folder of that name; a worker whose
folder lost moves anything it put there into the winner and trashes its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import random
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from googleapiclient.errors import HttpError
from googleapiclient.http import MediaFileUpload

from dicomflow.adapters.drive.connection import NUM_RETRIES, TRANSPORT_ERRORS, DriveConnection
from dicomflow.adapters.drive.errors import map_http_error
from dicomflow.adapters.drive.source import FOLDER, quote
from dicomflow.adapters.local.files import sha256_file
from dicomflow.domain.failures import ChecksumMismatch, DestinationNotWritable, ServiceUnavailable, SourceNotFound
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import OutputFile
from dicomflow.domain.paths import decode_component, split
from dicomflow.ports import Progress

UPLOAD_CHUNK = 32 * 256 * 1024  # 8 MiB: resumable chunks must be multiples of 256 KiB (GCP_FACTS gotcha 4)
UPLOAD_ATTEMPTS = 4
_ALL = {"supportsAllDrives": True}
_FILE_FIELDS = "id,name,md5Checksum,sha256Checksum,size,createdTime,appProperties"


def _order(entry: dict[str, Any]) -> tuple[str, str]:
    return str(entry.get("createdTime", "")), str(entry.get("id", ""))


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while block := handle.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _mime(name: str) -> str:
    if name.endswith(".nii.gz"):
        return "application/gzip"
    if name.endswith((".bval", ".bvec")):
        return "text/plain"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _get(service: Any, *, file_id: str, fields: str) -> Any:
    return service.files.get(fileId=file_id, fields=fields, **_ALL)


def _trash(service: Any, *, file_id: str) -> Any:
    return service.files.update(fileId=file_id, body={"trashed": True}, fields="id", **_ALL)


class DriveSink:
    def __init__(self, drive: DriveConnection) -> None:
        self._drive = drive
        self._folders: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def check(self, location: Location) -> str:
        if location.kind is not LocationKind.DRIVE:
            raise ValueError(f"not a Drive location: {location}")
        meta = self._drive.execute(
            lambda s: s.files.get(
                fileId=location.ref, fields="id,name,mimeType,trashed,capabilities(canAddChildren)", **_ALL
            ),
            what=f"destination folder {location.ref}",
            writing=True,
        )
        if meta.get("mimeType") != FOLDER or meta.get("trashed"):
            raise DestinationNotWritable(f"destination {location.ref} ({meta.get('name')!r}) is not a usable folder")
        if (meta.get("capabilities") or {}).get("canAddChildren") is False:
            raise DestinationNotWritable(
                f"{self._drive.identity} may not add files to destination folder {meta.get('name')!r}; "
                "share it with that account as an Editor"
            )
        return str(meta.get("name", location.ref))

    # --- folders -------------------------------------------------------------------------------------

    def subfolder(self, location: Location, name: str) -> Location:
        return Location(LocationKind.DRIVE, self.ensure_folder(location.ref, name))

    def ensure_folder(self, parent: str, name: str) -> str:
        """The id of folder `name` under `parent`, created once even when workers race to create it."""
        key = (parent, name)
        with self._lock:
            if key in self._folders:
                return self._folders[key]
        existing = self._folders_named(parent, name)
        if existing:
            folder = min(existing, key=_order)["id"]
        else:
            body = {"name": name, "mimeType": FOLDER, "parents": [parent], "appProperties": {"dicomflow": "1"}}
            mine = self._drive.execute(
                lambda s: s.files.create(body=body, fields="id,createdTime", **_ALL),
                what=f"folder {name!r}",
                writing=True,
            )["id"]
            folder = self._settle_folder(parent, name, str(mine))
        with self._lock:
            self._folders[key] = folder
        return str(folder)

    def _folders_named(self, parent: str, name: str) -> list[dict[str, Any]]:
        query = f"{quote(parent)} in parents and name = {quote(name)} and mimeType = '{FOLDER}' and trashed = false"
        return self._list(query, what=f"folder {name!r}")

    def _settle_folder(self, parent: str, name: str, mine: str) -> str:
        """Several workers may have created the folder at once: all agree on the oldest."""
        winner = str(min(self._folders_named(parent, name), key=_order)["id"])
        if winner != mine:
            for child in self._list(f"{quote(mine)} in parents and trashed = false", what=f"folder {name!r}"):

                def move(service: Any, child_id: str = child["id"]) -> Any:
                    return service.files.update(
                        fileId=child_id, addParents=winner, removeParents=mine, fields="id", **_ALL
                    )

                self._drive.execute(move, what=f"folder {name!r}", writing=True)
            self._drive.execute(
                lambda s: s.files.update(fileId=mine, body={"trashed": True}, fields="id", **_ALL),
                what=f"folder {name!r}",
                writing=True,
            )
        return winner

    def _list(self, query: str, *, what: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        token: str | None = None
        while True:

            def listing(service: Any, page_token: str | None = token) -> Any:
                return service.files.list(
                    q=query, fields=f"nextPageToken, files({_FILE_FIELDS})", pageSize=1000, pageToken=page_token,
                    corpora="allDrives", includeItemsFromAllDrives=True, **_ALL,
                )  # fmt: skip

            page = self._drive.execute(listing, what=what, writing=True)
            found.extend(page.get("files") or ())
            token = page.get("nextPageToken")
            if not token:
                return found

    # --- files -----------------------------------------------------------------------------------------

    def publish(
        self,
        location: Location,
        rel_dir: str,
        files: Sequence[Path],
        owner_key: str,
        progress: Progress | None = None,
    ) -> tuple[OutputFile, ...]:
        if location.kind is not LocationKind.DRIVE:
            raise ValueError(f"not a Drive location: {location}")
        names = [decode_component(c) for c in split(rel_dir)]
        folder = location.ref
        for name in names:
            folder = self.ensure_folder(folder, name)
        total = sum(f.stat().st_size for f in files)
        done = 0
        outputs = []
        for path in files:
            file_id = self._put(folder, path, owner_key)
            size = path.stat().st_size
            outputs.append(OutputFile("/".join([*names, path.name]), size, sha256_file(path), file_id))
            done += size
            if progress:
                progress(done, total)
        return tuple(outputs)

    def intended(self, rel_dir: str, files: Sequence[Path]) -> tuple[OutputFile, ...]:
        names = [decode_component(c) for c in split(rel_dir)]
        return tuple(OutputFile("/".join([*names, f.name]), f.stat().st_size, sha256_file(f)) for f in files)

    def retract(self, location: Location, outputs: Sequence[OutputFile], owner_key: str) -> int:
        """Trash the files dicomflow published for `owner_key` under these names that still hold the recorded
        bytes (Drive keeps a SHA-256 of every binary file). Folders are looked up, never created."""
        removed = 0
        for output in outputs:
            *folders, name = output.name.split("/")
            parent = self._existing_folder(location.ref, folders)
            if parent is None:
                continue
            for entry in self._tagged(parent, owner_key, name):
                file_id = str(entry["id"])
                meta = self._drive.execute(
                    partial(_get, file_id=file_id, fields="id,sha256Checksum"), what=f"output {name!r}", writing=True
                )
                if meta.get("sha256Checksum") == output.sha256:
                    self._drive.execute(partial(_trash, file_id=file_id), what=f"output {name!r}", writing=True)
                    removed += 1
        return removed

    def move(self, location: Location, output: OutputFile, name: str, owner_key: str) -> OutputFile:
        """One files.update: the new parent (addParents/removeParents), the new name and its name tag
        (GCP_FACTS §1: a file has one parent). The file id is kept, so a repeated move finds it in place."""
        parts = [decode_component(c) for c in split(name)]
        folder = location.ref
        for part in parts[:-1]:
            folder = self.ensure_folder(folder, part)
        base, recorded = parts[-1], "/".join(parts)
        what = f"output {base!r}"
        meta = self._file(output.ref, what)
        if meta is None or meta.get("trashed") or meta.get("sha256Checksum") not in (None, output.sha256):
            for entry in sorted(self._tagged(folder, owner_key, base), key=_order):
                if entry.get("sha256Checksum") == output.sha256:
                    return OutputFile(recorded, output.size, output.sha256, str(entry["id"]), origin=output.original)
            raise SourceNotFound(
                f"{what} is gone (or changed) before it could be moved to {recorded}; convert the series again "
                "(dicomflow convert --force)"
            )
        moved = OutputFile(recorded, output.size, output.sha256, str(meta["id"]), origin=output.original)
        parents = [str(p) for p in meta.get("parents") or ()]
        if parents == [folder] and meta.get("name") == base:
            return moved
        # An older file of this series under the same name (replaced by a new conversion) goes first:
        # names are not unique in Drive, and two of them would both look current.
        for entry in self._tagged(folder, owner_key, base):
            if entry["id"] != meta["id"]:
                self._drive.execute(partial(_trash, file_id=str(entry["id"])), what=what, writing=True)

        def update(service: Any) -> Any:
            return service.files.update(
                fileId=meta["id"], addParents=folder, removeParents=",".join(p for p in parents if p != folder),
                body={"name": base, "appProperties": {"dicomflow_name": _name_tag(base)}}, fields="id", **_ALL,
            )  # fmt: skip

        self._drive.execute(update, what=what, writing=True)
        return moved

    def read(self, location: Location, name: str, owner_key: str) -> bytes | None:
        parts = [decode_component(c) for c in split(name)]
        folder = self._existing_folder(location.ref, parts[:-1])
        if folder is None:
            return None
        base = parts[-1]
        found = sorted(self._tagged(folder, owner_key, base), key=_order) or sorted(
            self._list(f"{quote(folder)} in parents and name = {quote(base)} and trashed = false", what=base),
            key=_order,
        )
        if not found:
            return None
        file_id = str(found[0]["id"])
        data = self._drive.execute(lambda s: s.files.get_media(fileId=file_id, **_ALL), what=f"file {base!r}")
        return bytes(data)

    def _file(self, file_id: str, what: str) -> dict[str, Any] | None:
        if not file_id:
            return None
        try:
            meta: dict[str, Any] = self._drive.execute(
                partial(_get, file_id=file_id, fields="id,name,parents,trashed,sha256Checksum"), what=what
            )
        except SourceNotFound:  # 404: deleted for good
            return None
        return meta

    def _existing_folder(self, root: str, names: Sequence[str]) -> str | None:
        folder = root
        for name in names:
            found = self._folders_named(folder, name)
            if not found:
                return None
            folder = str(min(found, key=_order)["id"])
        return folder

    def _tagged(self, folder: str, owner_key: str, name: str) -> list[dict[str, Any]]:
        query = (
            f"{quote(folder)} in parents and trashed = false"
            f" and appProperties has {{ key='dicomflow_key' and value={quote(owner_key)} }}"
            f" and appProperties has {{ key='dicomflow_name' and value={quote(_name_tag(name))} }}"
        )
        return self._list(query, what=f"output {name!r}")

    def _put(self, folder: str, path: Path, owner_key: str) -> str:
        md5 = _md5(path)
        found = sorted(self._tagged(folder, owner_key, path.name), key=_order)
        if found and found[0].get("md5Checksum") == md5:
            self._delete_extra(found)
            return str(found[0]["id"])
        if found:
            # A re-conversion with other content (e.g. --force after an options change): replace in place.
            self._upload(path, md5, file_id=str(found[0]["id"]))
            self._delete_extra(found)
            return str(found[0]["id"])
        mine = self._upload(path, md5, folder=folder, owner_key=owner_key)
        # A duplicated delivery may have created the same output meanwhile: the oldest wins.
        again = sorted(self._tagged(folder, owner_key, path.name), key=_order)
        self._delete_extra(again)
        return str(again[0]["id"]) if again else mine

    def _delete_extra(self, found: list[dict[str, Any]]) -> None:
        for extra in found[1:]:

            def delete(service: Any, file_id: str = extra["id"]) -> Any:
                return service.files.delete(fileId=file_id, **_ALL)

            with contextlib.suppress(DestinationNotWritable):  # already deleted by the other delivery
                self._drive.execute(delete, what="a duplicate output", writing=True)

    def _upload(self, path: Path, md5: str, *, folder: str = "", owner_key: str = "", file_id: str = "") -> str:
        """A resumable upload in 256 KiB multiples, resumed after dropped connections and restarted after a
        lost session; the result must carry the md5 we computed."""
        what = f"output {path.name!r}"
        for attempt in range(UPLOAD_ATTEMPTS):
            media = MediaFileUpload(str(path), mimetype=_mime(path.name), chunksize=UPLOAD_CHUNK, resumable=True)
            try:
                with self._drive.client() as service:
                    if file_id:
                        request = service.files.update(fileId=file_id, media_body=media, fields=_FILE_FIELDS, **_ALL)
                    else:
                        body = {
                            "name": path.name,
                            "parents": [folder],
                            "appProperties": {"dicomflow_key": owner_key, "dicomflow_name": _name_tag(path.name)},
                        }
                        request = service.files.create(body=body, media_body=media, fields=_FILE_FIELDS, **_ALL)
                    request._sleep = self._drive.sleep  # the client's documented retry hook
                    result = self._resumable(request, what)
            except _RestartUpload:
                self._drive.sleep(random.uniform(0.05, 0.5) * 2**attempt)  # noqa: S311 - capped jitter
                continue
            if result.get("md5Checksum") and result["md5Checksum"] != md5:
                raise ChecksumMismatch(f"{what} arrived in Drive with a different checksum; it will be retried")
            return str(result["id"])
        raise ServiceUnavailable(f"uploading {what} kept failing; it will be retried")

    def _resumable(self, request: Any, what: str) -> dict[str, Any]:
        response = None
        stalls = 0
        while response is None:
            try:
                _status, response = request.next_chunk(num_retries=NUM_RETRIES)
                stalls = 0
            except HttpError as exc:
                status = int(exc.resp.status)
                if status in (404, 410):
                    raise _RestartUpload from exc  # the session expired: start a new one (GCP_FACTS §1)
                if status == 400:
                    # A chunk cut short by a dropped connection: the next call asks Drive how much it
                    # has and resumes from there; if that keeps failing, start over.
                    stalls += 1
                    if stalls > 3:
                        raise _RestartUpload from exc
                    continue
                raise map_http_error(exc, what=what, identity=self._drive.identity, writing=True) from exc
            except TRANSPORT_ERRORS:
                stalls += 1  # the client does not retry chunk PUTs on transport errors: resume ourselves
                if stalls > 5:
                    raise _RestartUpload from None
        return dict(response)


class _RestartUpload(Exception):
    """The resumable session cannot continue; a new one must start."""


def _name_tag(name: str) -> str:
    # appProperties keys+values are limited to 124 bytes: a fixed-length digest of the name fits always.
    return hashlib.sha256(name.encode()).hexdigest()[:40]
