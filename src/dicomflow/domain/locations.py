"""Where series come from and where NIfTI goes: a local folder or a Google Drive folder."""

from __future__ import annotations

import hashlib
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
