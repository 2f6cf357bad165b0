"""Which local state, and which batch in it, a `status` / `dlq` command is about.

Each destination keeps its own state (`DEST/.dicomflow/state.sqlite`; a Drive destination's lives under
the per-user state folder). A command reads the state of the destination it is given, or of `--state
FILE`. Given only a batch id (or a unique prefix of one), it looks for that batch in the destinations used
recently and insists on exactly one match. Given nothing, the caller lists the recent destinations: no
state is ever chosen silently (issue 13).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomflow import bootstrap
from dicomflow.config import Mode, load_settings
from dicomflow.domain.failures import ConfigError, DicomflowError, NotFound
from dicomflow.domain.locations import DRIVE_SCHEME, parse_location
from dicomflow.domain.model import Batch
from dicomflow.local_runtime import default_state_path, live_holder, recent_states
from dicomflow.ports import StateStore
from dicomflow.services.context import Context

ALL_BATCHES = 1_000_000


@dataclass(frozen=True, slots=True)
class Target:
    state_path: Path
    batch_id: str | None = None  # the full id, when the command is about one batch


def looks_like_destination(text: str) -> bool:
    """A Drive folder, a path with a separator, or an existing folder — never a batch id (ids are hex)."""
    return text.startswith((DRIVE_SCHEME, ".", "~")) or os.sep in text or Path(text).is_dir()


def state_of(destination: str) -> Path:
    """The state file of a destination given on the command line; ConfigError if it has none."""
    if DRIVE_SCHEME in destination:
        location = parse_location(destination, field="destination")
    else:
        resolved = str(Path(destination).expanduser().resolve())
        location = parse_location(destination, field="destination", absolute_path=resolved)
    path = default_state_path(location)
    if not path.exists():
        raise ConfigError(
            f"{location.uri} holds no dicomflow state ({path} does not exist): convert into it first with "
            "`dicomflow convert SOURCE DESTINATION`, or give the state file with --state FILE"
        )
    return path


@contextmanager
def opened(state_path: Path) -> Iterator[Context]:
    """A context on one local state file (read by the caller; nothing runs)."""
    settings = load_settings(mode=Mode.LOCAL, state_path=str(state_path))
    ctx = bootstrap.build(settings)
    try:
        yield ctx
    finally:
        ctx.close()


def find_batch(store: StateStore, prefix: str) -> Batch:
    """The batch whose id is `prefix`, or the only one whose id starts with it."""
    try:
        return store.get_batch(prefix)
    except NotFound:
        pass
    matches = [b for b in store.list_batches(limit=ALL_BATCHES, counted=False) if b.batch_id.startswith(prefix)]
    if len(matches) > 1:
        ids = ", ".join(sorted(b.batch_id for b in matches)[:10])
        raise ConfigError(f"{prefix!r} matches {len(matches)} batches ({ids}); give more of the id")
    if not matches:
        raise NotFound(f"no batch {prefix!r} in this state")
    return store.get_batch(matches[0].batch_id)


def resolve(batch: str | None, destination: str | None, state: str | None) -> Target | None:
    """The target of a command given [BATCH] [DEST] [--state FILE]; None when nothing was given (the
    caller lists the recent destinations). A lone argument that looks like a folder is the DEST."""
    if destination and state:
        raise ConfigError("give either DESTINATION or --state FILE, not both")
    if batch and not destination and not state and looks_like_destination(batch):
        batch, destination = None, batch
    if state:
        path = Path(state).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"the state file {path} does not exist")
    elif destination:
        path = state_of(destination)
    elif batch:
        return search_recent(batch)
    else:
        return None
    if batch is None:
        return Target(path)
    with opened(path) as ctx:
        return Target(path, find_batch(ctx.store, batch).batch_id)


def search_recent(prefix: str) -> Target:
    """The batch `prefix` names among the recently used destinations: exactly one must match."""
    found: list[tuple[Path, str]] = []
    for known in recent_states():
        try:
            with opened(known.path) as ctx:
                found.append((known.path, find_batch(ctx.store, prefix).batch_id))
        except NotFound:
            continue
        except DicomflowError as exc:
            raise ConfigError(f"in {known.path}: {exc.reason}") from None
    if not found:
        raise NotFound(
            f"no batch {prefix!r} in the destinations used recently (`dicomflow status` lists them); "
            "give the destination too: BATCH DESTINATION"
        )
    if len(found) > 1:
        where = "; ".join(f"{batch_id} in {path}" for path, batch_id in found)
        raise ConfigError(f"{prefix!r} matches batches in several destinations ({where}); give the destination too")
    path, batch_id = found[0]
    return Target(path, batch_id)


@dataclass(frozen=True, slots=True)
class Destination:
    """A recently used state, with its latest batch (for the listing shown when no target is given)."""

    state_path: Path
    latest: Batch | None
    run_alive: bool


def recent_destinations() -> list[Destination]:
    listed: list[Destination] = []
    for known in recent_states():
        try:
            with opened(known.path) as ctx:
                batches = ctx.store.list_batches(limit=1)
        except DicomflowError:
            continue
        listed.append(Destination(known.path, batches[0] if batches else None, live_holder(known.path) is not None))
    return listed
