"""A Google Drive folder as the destination of NIfTI outputs.

Idempotent (DESIGN.md invariant 3): every output carries `appProperties` naming the series (`dicomflow_key`)
and the file (`dicomflow_name`). Before creating, the sink looks for a file with those tags in the target
folder: same md5 → nothing to do; other content → its content is replaced. Names are not unique in Drive
(GCP_FACTS gotcha 7), so a name alone could never tell our file from a user's — and a user's file of the
same name is never touched.

The destination tree mirrors the source's folders, with the original names. Writers race: workers of
different series create the same folder at once, a duplicated delivery uploads the same output twice.
Every writer keeps the oldest item by (createdTime, id), and `publish` returns only choices that can no
longer change (settle.py says why a first listing is not enough: two items made in the same millisecond).
A publish runs in three steps:

1. Choose: each folder level of `rel_dir` is found, or created and listed again; the files go into the
   deepest one (tag lookup, upload only what is missing or changed).
2. Settle the folders, top-down, once per level per process (settled choices are remembered): when the
   chosen folder is younger than settle.MARGIN, wait until it is not, then list the folders of that name
   once; the oldest is final. If ours lost, the files are put again into the winner's chain (the tag/md5
   lookup keeps an identical copy already there, so usually nothing is uploaded), the copies we left in
   the losing chain are deleted, and its folders are trashed when empty. Put again, not moved: a moved
   item keeps its createdTime and could outrank what another writer has already settled on (so folders
   are never moved either). A folder still holding anything else is left to the writer whose files they
   are, who moves out when it settles; one dicomflow did not create is never trashed. Losing folders the
   settling listing shows are swept for this series' outputs and trashed when empty: what a writer that
   died before settling left behind.
3. Settle the files: once the copies kept are older than the margin, one listing of this series' files
   in the final folder keeps the oldest copy of each name and deletes the others.

Racing writers only ever remove items that some listing ranked after another, which never rank first
again; so an item that vanishes was removed by a person: the sink forgets its folders and raises a
TransientError, and the task's retry chooses again.

Quota, on top of the tag lookup and upload per file: nothing for a folder level already settled in this
process; one files.list for a level first used in this process (none when the listing that found it was
already provably late enough, as it is for old folders once the process has heard Drive's clock); one
files.list per publish that uploaded, which replaces the listing after each upload a publish used to
make. Time: a publish that uploaded waits until its last upload is settle.MARGIN old; a new folder's wait
is usually over by then. Only a lost race costs more: a lookup (and maybe an upload) and a delete per
file, a listing and a trash per losing folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import mimetypes
import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from googleapiclient.errors import HttpError
from googleapiclient.http import MediaFileUpload

from dicomflow.adapters.drive.connection import NUM_RETRIES, TRANSPORT_ERRORS, DriveConnection
from dicomflow.adapters.drive.errors import map_http_error
from dicomflow.adapters.drive.settle import DriveClock, rank, settled
from dicomflow.adapters.drive.source import FOLDER, quote
from dicomflow.adapters.local.files import sha256_file
from dicomflow.domain.failures import (
    ChecksumMismatch,
    DestinationNotWritable,
    ServiceUnavailable,
    SourceNotFound,
    TransientError,
)
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import OutputFile
from dicomflow.domain.paths import decode_component, split
from dicomflow.ports import Progress

UPLOAD_CHUNK = 32 * 256 * 1024  # 8 MiB: resumable chunks must be multiples of 256 KiB (GCP_FACTS gotcha 4)
UPLOAD_ATTEMPTS = 4
_ALL = {"supportsAllDrives": True}
_FILE_FIELDS = "id,name,md5Checksum,sha256Checksum,size,createdTime,appProperties"
_MADE_BY_US = {"dicomflow": "1"}  # the appProperties of every folder dicomflow creates


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


def _delete(service: Any, *, file_id: str) -> Any:
    return service.files.delete(fileId=file_id, **_ALL)


def _tags(entry: dict[str, Any]) -> dict[str, str]:
    return dict(entry.get("appProperties") or {})


@dataclass(frozen=True, slots=True)
class _Choice:
    """The folder used for one (parent, name), and whether that can still change (settle.py). `losers`:
    folders dicomflow made that the settling listing ranked after it, swept once by this process."""

    folder: str
    created: str
    settled: bool
    losers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Pick:
    """The file kept for one output, and whether that can still change."""

    file_id: str
    created: str
    settled: bool


class DriveSink:
    def __init__(self, drive: DriveConnection) -> None:
        self._drive = drive
        self._clock = DriveClock()
        self._folders: dict[tuple[str, str], _Choice] = {}
        self._ours: set[str] = set()  # folders known to carry _MADE_BY_US: only those are ever trashed
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
        """Settled before it is returned: every caller that races to create it gets the same folder."""
        choice = self._settled_choice(location.ref, name)
        for loser in self._take_losers(location.ref, name):
            self._drop_if_empty(loser)
        return Location(LocationKind.DRIVE, choice.folder)

    def _chain(self, root: str, names: Sequence[str]) -> list[str]:
        """`root` and the folders chosen for each name below it (created where missing)."""
        chain = [root]
        for name in names:
            chain.append(self._choose(chain[-1], name).folder)
        return chain

    def _choose(self, parent: str, name: str) -> _Choice:
        """The folder `name` under `parent`: the cached choice, else the oldest listed, else a new one. The
        listing right after creating catches most races before any file goes into a folder that lost."""
        key = (parent, name)
        with self._lock:
            if key in self._folders:
                return self._folders[key]
        sent = self._clock.now()
        found = self._folders_named(parent, name)
        if found:
            choice = self._ranked(found, sent)
        else:
            body = {"name": name, "mimeType": FOLDER, "parents": [parent], "appProperties": _MADE_BY_US}
            mine = self._drive.execute(
                lambda s: s.files.create(body=body, fields="id,createdTime,appProperties", **_ALL),
                what=f"folder {name!r}",
                writing=True,
            )
            self._clock.saw([mine.get("createdTime")])
            self._ours.add(str(mine["id"]))
            sent = self._clock.now()
            listed = self._folders_named(parent, name)
            if not any(f["id"] == mine["id"] for f in listed):
                # Drive lists what we just wrote, unless the parent itself is in the trash or gone.
                self._forget_all()
                raise TransientError(f"the folder holding {name!r} was removed while outputs were published")
            choice = self._ranked(listed, sent)
            if choice.folder != mine["id"]:
                self._drop_if_empty(str(mine["id"]))  # lost at once: empty unless someone chose it meanwhile
        with self._lock:
            known = self._folders.get(key)
            if known is None or not known.settled:
                self._folders[key] = known = choice
            return known

    def _settled_choice(self, parent: str, name: str) -> _Choice:
        """The folder `name` under `parent` that every writer ends up with (settle.py)."""
        key = (parent, name)
        while True:
            choice = self._choose(parent, name)
            if choice.settled:
                return choice
            self._clock.wait_past(choice.created, self._drive.sleep)
            sent = self._clock.now()
            found = self._folders_named(parent, name)
            fresh = self._ranked(found, sent) if found else None
            with self._lock:
                known = self._folders.get(key)
                if known is not None and known.settled:
                    continue  # another thread of this process settled it meanwhile
                if fresh is not None:
                    self._folders[key] = fresh
                else:
                    self._folders.pop(key, None)  # removed meanwhile (by a person): choose again

    def _ranked(self, found: Sequence[dict[str, Any]], sent: float | None) -> _Choice:
        ordered = sorted(found, key=rank)
        first = ordered[0]
        final = settled(str(first.get("createdTime", "")), sent)
        losers = tuple(str(f["id"]) for f in ordered[1:] if f["id"] in self._ours) if final else ()
        return _Choice(str(first["id"]), str(first.get("createdTime", "")), final, losers)

    def _take_losers(self, parent: str, name: str) -> tuple[str, ...]:
        """The losing folders of a settled choice, handed out once (the first publish to settle it sweeps)."""
        with self._lock:
            choice = self._folders.get((parent, name))
            if choice is None or not choice.losers:
                return ()
            self._folders[(parent, name)] = dataclasses.replace(choice, losers=())
            return choice.losers

    def _forget(self, folders: Iterable[str]) -> None:
        """Choices made under folders that lost: never asked for again."""
        gone = set(folders)
        with self._lock:
            for key in [k for k in self._folders if k[0] in gone]:
                del self._folders[key]

    def _forget_all(self) -> None:
        """Someone changed the destination under us: choose every folder afresh."""
        with self._lock:
            self._folders.clear()

    def _folders_named(self, parent: str, name: str) -> list[dict[str, Any]]:
        query = f"{quote(parent)} in parents and name = {quote(name)} and mimeType = '{FOLDER}' and trashed = false"
        found = self._list(query, what=f"folder {name!r}")
        self._ours.update(str(f["id"]) for f in found if _tags(f).get("dicomflow") == _MADE_BY_US["dicomflow"])
        return found

    def _drop_if_empty(self, folder: str) -> None:
        """Trash a folder that lost, if dicomflow made it and nothing (left) is in it. Safe whoever else
        still uses it: a folder that lost once never wins, and its users move out when they settle."""
        if folder not in self._ours or self._has_children(folder):
            return
        with contextlib.suppress(DestinationNotWritable):  # already gone
            self._drive.execute(partial(_trash, file_id=folder), what="a duplicate folder", writing=True)

    def _has_children(self, folder: str) -> bool:
        token: str | None = None
        while True:

            def listing(service: Any, page_token: str | None = token) -> Any:
                return service.files.list(
                    q=f"{quote(folder)} in parents and trashed = false", fields="nextPageToken, files(id)",
                    pageSize=1, pageToken=page_token, corpora="allDrives", includeItemsFromAllDrives=True, **_ALL,
                )  # fmt: skip

            page = self._drive.execute(listing, what="a duplicate folder", writing=True)
            if page.get("files"):
                return True
            token = page.get("nextPageToken")  # pages may be empty while more remain (GCP_FACTS gotcha 6)
            if not token:
                return False

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
            files = page.get("files") or ()
            self._clock.saw(f.get("createdTime") for f in files)  # Drive's clock has passed each of them
            found.extend(files)
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
        """Choose, settle the folders, settle the files (the module docstring); the refs returned are the
        copies every racing writer ends up with."""
        if location.kind is not LocationKind.DRIVE:
            raise ValueError(f"not a Drive location: {location}")
        names = [decode_component(c) for c in split(rel_dir)]
        chain = self._chain(location.ref, names)
        total = sum(f.stat().st_size for f in files)
        done = 0
        picks = []
        for path in files:
            picks.append(self._put(chain[-1], path, owner_key))
            done += path.stat().st_size
            if progress:
                progress(done, total)
        picks = self._settle(chain, names, files, picks, owner_key)
        return tuple(
            OutputFile("/".join([*names, path.name]), path.stat().st_size, sha256_file(path), pick.file_id)
            for path, pick in zip(files, picks, strict=True)
        )

    def _settle(
        self, chain: list[str], names: Sequence[str], files: Sequence[Path], picks: list[_Pick], owner_key: str
    ) -> list[_Pick]:
        """Step 2 and 3 of the module docstring: `chain` is the root and the folders chosen below it,
        `picks` what `_put` kept in the last one."""
        for level, name in enumerate(names):
            parent = chain[level]
            winner = self._settled_choice(parent, name).folder
            lost = chain[level + 1 :] if winner != chain[level + 1] else []
            if lost:
                chain = [*chain[: level + 1], *self._chain(winner, names[level + 1 :])]
                moved = [self._put(chain[-1], path, owner_key) for path in files]
                self._delete_files(
                    old.file_id for old, new in zip(picks, moved, strict=True) if old.file_id != new.file_id
                )
                picks = moved
                for folder in reversed(lost):
                    self._drop_if_empty(folder)
                self._forget(lost)
            for loser in self._take_losers(parent, name):
                if loser not in lost:
                    self._sweep(loser, names[level + 1 :], files, owner_key)
        return self._settle_files(chain[-1], files, picks, owner_key)

    def _sweep(self, folder: str, rest: Sequence[str], files: Sequence[Path], owner_key: str) -> None:
        """Delete this series' outputs of these names from a losing folder's `rest` path, then trash the
        folders left empty: what a writer that died before settling left there."""
        if rest:
            for sub in self._folders_named(folder, rest[0]):
                if sub["id"] in self._ours:
                    self._sweep(str(sub["id"]), rest[1:], files, owner_key)
        else:
            wanted = {_name_tag(path.name) for path in files}
            stale = [e["id"] for e in self._owned(folder, owner_key) if _tags(e).get("dicomflow_name") in wanted]
            self._delete_files(stale)
        self._drop_if_empty(folder)

    def _settle_files(self, folder: str, files: Sequence[Path], picks: list[_Pick], owner_key: str) -> list[_Pick]:
        """One listing of the series' files in `folder` once the copies we kept are old enough: per name,
        the oldest stays and the others go."""
        while pending := [pick for pick in picks if not pick.settled]:
            self._clock.wait_past(max(pick.created for pick in pending), self._drive.sleep)
            sent = self._clock.now()
            by_tag: dict[str, list[dict[str, Any]]] = {}
            for entry in self._owned(folder, owner_key):
                by_tag.setdefault(_tags(entry).get("dicomflow_name", ""), []).append(entry)
            for index, (path, pick) in enumerate(zip(files, picks, strict=True)):
                if pick.settled:
                    continue
                same = sorted(by_tag.get(_name_tag(path.name), ()), key=rank)
                if not same:
                    # Racing writers only ever remove copies that rank after another, so a person removed
                    # it, or the folder: forget the folders chosen and let the task's retry choose again.
                    self._forget_all()
                    raise TransientError(f"output {path.name!r} vanished from Drive while it was being published")
                self._delete_extra(same)
                picks[index] = self._pick(same[0], sent)
        return picks

    def _pick(self, entry: dict[str, Any], sent: float | None) -> _Pick:
        created = str(entry.get("createdTime", ""))
        return _Pick(str(entry["id"]), created, settled(created, sent))

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
            folder = self._settled_choice(folder, part).folder
        base, recorded = parts[-1], "/".join(parts)
        what = f"output {base!r}"
        meta = self._file(output.ref, what)
        if meta is None or meta.get("trashed") or meta.get("sha256Checksum") not in (None, output.sha256):
            for entry in sorted(self._tagged(folder, owner_key, base), key=rank):
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
        found = sorted(self._tagged(folder, owner_key, base), key=rank) or sorted(
            self._list(f"{quote(folder)} in parents and name = {quote(base)} and trashed = false", what=base),
            key=rank,
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
            folder = str(min(found, key=rank)["id"])
        return folder

    def _tagged(self, folder: str, owner_key: str, name: str) -> list[dict[str, Any]]:
        query = (
            f"{quote(folder)} in parents and trashed = false"
            f" and appProperties has {{ key='dicomflow_key' and value={quote(owner_key)} }}"
            f" and appProperties has {{ key='dicomflow_name' and value={quote(_name_tag(name))} }}"
        )
        return self._list(query, what=f"output {name!r}")

    def _owned(self, folder: str, owner_key: str) -> list[dict[str, Any]]:
        """Every file of the series `owner_key` in `folder`, whatever its name."""
        query = (
            f"{quote(folder)} in parents and trashed = false"
            f" and appProperties has {{ key='dicomflow_key' and value={quote(owner_key)} }}"
        )
        return self._list(query, what=f"the outputs of {owner_key}")

    def _put(self, folder: str, path: Path, owner_key: str) -> _Pick:
        """Our output in `folder`: an identical tagged copy is kept, a changed one replaced in place, a
        missing one uploaded. A fresh upload is never settled yet: a duplicated delivery may be uploading
        the same output this very millisecond (`_settle_files` decides)."""
        md5 = _md5(path)
        sent = self._clock.now()
        found = sorted(self._tagged(folder, owner_key, path.name), key=rank)
        if found and found[0].get("md5Checksum") == md5:
            self._delete_extra(found)
            return self._pick(found[0], sent)
        if found:
            # A re-conversion with other content (e.g. --force after an options change): replace in place.
            self._upload(path, md5, file_id=str(found[0]["id"]))
            self._delete_extra(found)
            return self._pick(found[0], sent)
        mine = self._upload(path, md5, folder=folder, owner_key=owner_key)
        return _Pick(str(mine["id"]), str(mine.get("createdTime", "")), settled=False)

    def _delete_extra(self, found: list[dict[str, Any]]) -> None:
        """Delete all but the first of copies ranked oldest first: those lost and can never win again."""
        self._delete_files(entry["id"] for entry in found[1:])

    def _delete_files(self, file_ids: Iterable[str]) -> None:
        for file_id in file_ids:
            with contextlib.suppress(DestinationNotWritable):  # already deleted by the other writer
                self._drive.execute(partial(_delete, file_id=file_id), what="a duplicate output", writing=True)

    def _upload(
        self, path: Path, md5: str, *, folder: str = "", owner_key: str = "", file_id: str = ""
    ) -> dict[str, Any]:
        """A resumable upload in 256 KiB multiples, resumed after dropped connections and restarted after a
        lost session; the result (the file's metadata) must carry the md5 we computed."""
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
            self._clock.saw([result.get("createdTime")])
            return result
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
