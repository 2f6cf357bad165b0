"""Where series come from and where NIfTI goes: a local folder or a Google Drive folder."""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from enum import StrEnum

from dicomflow.domain.failures import InvalidInput

DRIVE_SCHEME = "drive://"
# Drive ids are URL-safe base64-ish tokens; shared drive roots and folders alike.
_DRIVE_ID = re.compile(r"^[A-Za-z0-9_-]{10,200}$")


class LocationKind(StrEnum):
    LOCAL = "local"
    DRIVE = "drive"


@dataclass(frozen=True, slots=True)
class Location:
    kind: LocationKind
    ref: str  # absolute local path, or a Drive folder id

    @property
    def uri(self) -> str:
        return f"{DRIVE_SCHEME}{self.ref}" if self.kind is LocationKind.DRIVE else self.ref

    @property
    def key(self) -> str:
        """Short stable id of the location (scopes fingerprints to a destination)."""
        return hashlib.sha256(self.uri.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return self.uri


def parse_location(text: str, *, field: str, absolute_path: str | None = None) -> Location:
    """Parse `drive://FOLDER_ID` or a local path. `absolute_path` is the caller's resolved form of a
    local path (the domain does not touch the file system)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("must be a Drive folder (drive://FOLDER_ID) or a local folder path", field=field)
    value = text.strip()
    if value.startswith(DRIVE_SCHEME):
        folder = value[len(DRIVE_SCHEME) :].strip("/")
        if not _DRIVE_ID.match(folder):
            raise InvalidInput(
                f"{value!r} is not a Drive folder id; copy the id from the folder's URL "
                "(https://drive.google.com/drive/folders/<ID>) and write drive://<ID>",
                field=field,
            )
        return Location(LocationKind.DRIVE, folder)
    if "://" in value:
        raise InvalidInput(f"unsupported location {value!r}: use drive://FOLDER_ID or a local path", field=field)
    return Location(LocationKind.LOCAL, absolute_path or value)


def _inside(inner: str, outer: str) -> bool:
    inner, outer = posixpath.normpath(inner), posixpath.normpath(outer)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_apart(sources: tuple[Location, ...] | list[Location], destination: Location) -> None:
    """Refuse a local destination that is a source, lies inside one or contains one: the next run would
    read its own outputs as input (or convert into the archive it reads). Paths are compared as given, so
    callers pass them absolute and resolved (symbolic links followed)."""
    if destination.kind is not LocationKind.LOCAL:
        return
    for source in sources:
        if source.kind is not LocationKind.LOCAL:
            continue
        if _inside(destination.ref, source.ref):
            where = (
                "is the source"
                if posixpath.normpath(destination.ref) == posixpath.normpath(source.ref)
                else (f"is inside the source {source.ref}")
            )
            raise InvalidInput(
                f"the destination {destination.ref} {where}: the next run would read its own outputs. "
                "Choose a destination folder outside the source.",
                field="destination",
            )
        if _inside(source.ref, destination.ref):
            raise InvalidInput(
                f"the source {source.ref} is inside the destination {destination.ref}: outputs would be written "
                "into the archive being read. Choose a destination folder that does not contain the source.",
                field="destination",
            )
