"""Lease renewal in the background while a worker converts one series (GCP_FACTS gotcha 25).

A conversion can outlast any fixed lease (a slow Drive download, a large dcm2niix run), and a lease long
enough for the worst case would let a crashed worker hold its series for half an hour. So the lease is
short and renewed by a thread while the work goes on; a renewal that reports the claim lost (another
attempt took the series after this worker stalled) marks the work dead, and the worker stops before it
publishes anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class _Beating:
    def __init__(self, beat: Callable[[], bool], every: float) -> None:
        self._beat = beat
        self._every = every
        self._stop = threading.Event()
        self._alive = True
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._alive

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if not self._beat():
                    self._alive = False
                    return
            except Exception:  # a passing store outage: the next tick tries again, the lease has slack
                log.warning("lease renewal failed; retrying at the next beat", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


class ThreadHeartbeat:
    """The Heartbeat port with a daemon thread per piece of work."""

    def start(self, beat: Callable[[], bool], every: float) -> _Beating:
        return _Beating(beat, every)
