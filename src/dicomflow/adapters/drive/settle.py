"""Which of several same-named Drive items is *the* one, and from when that choice can no longer change.

Drive lets a folder hold several items of one name (GCP_FACTS gotcha 7), so writers that race to create
the same output folder, or the same output file, may each create one. They converge on one rule: the
oldest by `(createdTime, id)` is kept. createdTime has millisecond resolution, and ids are random: two
items created in the same millisecond rank by chance. A writer that listed before a same-millisecond
sibling became visible saw only its own item and kept it; the sibling's writer then saw both and kept
its own, which ranked first by id. Both choices looked final and disagreed.

A listing can be trusted to be final once Drive answers it later than the winner's createdTime plus a
`MARGIN`: anything not visible by then is created later, gets a later createdTime and can only rank after
the winner. We never learn when Drive answered, but we can bound it from below: every createdTime Drive
returns is an instant its clock had passed, and the local monotonic clock measures how long ago we
received it (DriveClock). So a choice is *settled* when a listing made it whose send time, in Drive's
clock, is provably past `createdTime + MARGIN` of the item it ranks first; until then a writer waits and
lists again. Old items settle with the listing that finds them; an item created moments ago costs one
more listing after at most MARGIN (usually already spent uploading).

The rule also keeps every writer's clean-up safe: an item that ranks after another in any listing never
ranks first later (whatever outranked it is only ever removed for something that outranks it too), so
deleting or trashing items that lost in some listing never removes the eventual winner.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

# Covers createdTime's millisecond resolution, differences between the clocks of Drive's servers (Google
# keeps them synchronized to a few milliseconds; Drive documents no bound) and the drift of our monotonic
# clock while an anchor ages. It is what an item created just now costs: a pause of up to MARGIN before the
# listing that settles it, mostly overlapped by the uploads that follow a new folder.
MARGIN = 0.5
# An anchor older than this is dropped rather than extrapolated: a monotonic clock that runs 100 ppm fast
# drifts 30 ms in 300 s, well inside MARGIN.
ANCHOR_MAX_AGE = 300.0


def rank(entry: Mapping[str, Any]) -> tuple[str, str]:
    """The order in which same-named items are kept: oldest first, then by id (createdTime strings of one
    format compare like the instants they name)."""
    return str(entry.get("createdTime", "")), str(entry.get("id", ""))


def drive_time(created: str) -> float:
    """A Drive timestamp (RFC 3339, e.g. `2025-11-06T10:15:30.123Z`) as seconds since the epoch."""
    return datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()


def settled(created: str, sent: float | None, margin: float = MARGIN) -> bool:
    """Whether a listing sent when Drive's clock was at least `sent` can no longer be outranked by an item
    it did not see, when the item it ranks first was created at `created`."""
    return sent is not None and bool(created) and sent > drive_time(created) + margin


class DriveClock:
    """A lower bound on Drive's clock now: the latest createdTime Drive returned, plus the time since we
    received it (measured here, so local wall-clock errors do not matter)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._anchor: tuple[float, float] | None = None  # (Drive time, our monotonic time when received)
        self._lock = threading.Lock()

    def saw(self, stamps: Iterable[str | None]) -> None:
        """Drive returned these timestamps just now: its clock has passed each of them."""
        latest = max((drive_time(s) for s in stamps if s), default=None)
        if latest is None:
            return
        local = self._monotonic()
        with self._lock:
            current = self._bound(local)
            if current is None or latest > current:
                self._anchor = (latest, local)

    def now(self) -> float | None:
        """Drive's clock is at least this far; None while we know nothing recent about it."""
        local = self._monotonic()
        with self._lock:
            return self._bound(local)

    def _bound(self, local: float) -> float | None:
        if self._anchor is None or local - self._anchor[1] > ANCHOR_MAX_AGE:
            return None
        return self._anchor[0] + (local - self._anchor[1])

    def wait_past(self, created: str, sleep: Callable[[float], None], margin: float = MARGIN) -> None:
        """Return once Drive's clock is provably past `created + margin` (`created` was returned by Drive,
        so this takes at most about `margin`)."""
        self.saw([created])
        target = drive_time(created) + margin
        while (now := self.now()) is None or now <= target:
            sleep(target - now + 0.001 if now is not None else margin)
