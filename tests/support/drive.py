"""Helpers for tests against the fake Drive server (tests/fakes/drive_server.py)."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from dicomflow.adapters.drive.connection import DriveConnection
from dicomflow.config import Settings, load_settings
from tests.fakes.drive_server import FOLDER_MIME, FakeDrive

IDENTITY = "dicomflow-worker@project.iam.gserviceaccount.com"


def connection(fake: FakeDrive, **overrides: object) -> DriveConnection:
    return DriveConnection.from_settings(drive_settings(fake, **overrides))


def drive_settings(fake: FakeDrive, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "drive_endpoint": fake.base_url,
        "drive_identity": IDENTITY,
        "drive_max_retry_sleep_seconds": 0.05,  # the client's backoff is real; tests keep it short
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


def upload_tree(fake: FakeDrive, local_root: Path, parent: str) -> dict[str, str]:
    """Mirror a local folder into the fake Drive; returns relative path -> file id."""
    ids: dict[str, str] = {}
    for entry in sorted(local_root.iterdir()):
        if entry.is_dir():
            folder = fake.add_folder(entry.name, parent)
            ids |= {f"{entry.name}/{k}": v for k, v in upload_tree(fake, entry, folder).items()}
        else:
            ids[entry.name] = fake.add_file(entry.name, parent, entry.read_bytes())
    return ids


def started(seed: int = 7) -> Iterator[FakeDrive]:
    fake = FakeDrive(seed=seed)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


Predicate = Callable[[str, str, bytes], bool]  # (method, url, body) of a request the fake received


class SameMillisecond:
    """Forces the unlucky race of two writers creating the same item, at the protocol level.

    Both writers look for the item and find none; the first creates it and looks again while it sees only
    its own; the second creates it in the same millisecond of Drive's clock, with the smaller id (so it
    ranks first), and sees both. `creates` and `looks` pick out the requests that create the item and that
    list it. The clock stands still from the first creation until the second is answered, and the second
    waits at most `hold` seconds for the first writer's second look: keep `hold` well below the sink's
    margin, since a Drive clock standing still longer is not a Drive the sink has to handle (settle.py).
    A look that arrives while the second creation is on its way is answered after it (delivered late).
    """

    def __init__(self, fake: FakeDrive, *, creates: Predicate, looks: Predicate, hold: float = 0.1) -> None:
        self._creates_item, self._looks_for_item, self._hold = creates, looks, hold
        self._changed = threading.Condition()
        self._creations = 0
        self._looks = 0  # answered
        self._looks_since_first = 0  # answered after the first creation was
        self._both_looked = self._first_answered = self._second_released = self._second_answered = False
        self._frozen_at: float | None = None
        fake.descending_ids = True
        fake.clock = self._clock
        fake.intercept = self._intercept

    @property
    def forced(self) -> bool:
        """Both writers looked before the first creation, and both creations were stamped with one instant."""
        return self._both_looked and self._second_answered

    def _clock(self) -> float:
        frozen = self._frozen_at
        return frozen if frozen is not None and not self._second_answered else time.time()

    def _intercept(self, method: str, url: str, body: bytes) -> Callable[[], None] | None:
        if self._creates_item(method, url, body):
            with self._changed:
                self._creations += 1
                if self._creations == 1:
                    self._both_looked = self._changed.wait_for(lambda: self._looks >= 2, timeout=WAIT_SECONDS)
                    self._frozen_at = time.time()
                    return partial(self._note, "_first_answered")
                if self._creations == 2:
                    self._changed.wait_for(lambda: self._looks_since_first >= 1, timeout=self._hold)
                    self._second_released = True
                    return partial(self._note, "_second_answered")
            return None
        if self._looks_for_item(method, url, body):
            with self._changed:
                if self._second_released:
                    self._changed.wait_for(lambda: self._second_answered, timeout=WAIT_SECONDS)
            return self._looked
        return None

    def _note(self, flag: str) -> None:
        with self._changed:
            setattr(self, flag, True)
            self._changed.notify_all()

    def _looked(self) -> None:
        with self._changed:
            self._looks += 1
            self._looks_since_first += self._first_answered
            self._changed.notify_all()


WAIT_SECONDS = 10.0  # a writer that never comes: give up waiting, and `forced` says so


def creates_folder(name: str) -> Predicate:
    def match(method: str, url: str, body: bytes) -> bool:
        if method != "POST" or urllib.parse.urlsplit(url).path != "/drive/v3/files":
            return False
        meta = json.loads(body or b"{}")
        return bool(meta.get("name") == name and meta.get("mimeType") == FOLDER_MIME)

    return match


def lists_folder(name: str) -> Predicate:
    return lists_matching(f"name = '{name}'")


def lists_matching(text: str) -> Predicate:
    """files.list calls whose query contains `text`."""

    def match(method: str, url: str, body: bytes) -> bool:
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        return method == "GET" and parts.path == "/drive/v3/files" and text in query.get("q", "")

    return match


def uploads(method: str, url: str, body: bytes) -> bool:
    """The chunks of resumable uploads: the last one creates the file."""
    return method == "PUT" and url.startswith("/upload/")
