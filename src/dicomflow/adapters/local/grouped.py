"""Small series converted together, locally: one dcm2niix process for several convert tasks (issue 13).

The local runner hands a worker process a group of convert tasks of small series (local_runtime.py); the
process runs each task in its own thread, through the same use case as always (services/convert_series:
claim, fetch, convert, de-identify, publish, record), with a `GroupingConverter` as the converter. Its
`convert` waits until every thread of the group has either asked for its conversion or finished its task
without one (a duplicate, a skip), then one dcm2niix run converts every waiting series and the outputs
are handed back per series (domain/grouping.py says when that is exact). When it is not, each thread
converts its own series alone, exactly as without grouping, so failures, warnings and skips stay per
series. The cloud keeps one series per task and never groups.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from dicomflow.adapters.dcm2niix import Dcm2niixConverter, GroupInput
from dicomflow.domain.series import ConversionOptions
from dicomflow.log_privacy import guard
from dicomflow.ports import ConverterRun

log = logging.getLogger(__name__)

# A thread whose fetch is slow does not hold the others back longer than this.
LINGER_SECONDS = 2.0


@dataclass(eq=False)
class _Member:
    input_dir: Path
    output_dir: Path
    stem: str
    options: ConversionOptions
    timeout: float | None
    decided: bool = False
    run: ConverterRun | None = None  # None once decided: convert this series alone


class GroupingConverter:
    """The converter shared by the `threads` threads that run one group of convert tasks."""

    def __init__(self, base: Dcm2niixConverter, threads: int, scratch: Path, *, timeout_seconds: float) -> None:
        self._base = base
        self._expected = threads
        self._scratch = scratch
        self._timeout = timeout_seconds
        self._cond = threading.Condition()
        self._waiting: list[_Member] = []
        self._settled: set[int] = set()  # threads that got their conversion or finished without one
        self.runs = 0  # dcm2niix processes started for groups (for tests and logs)

    @property
    def version(self) -> str:
        return self._base.version

    def done(self) -> None:
        """The calling thread has finished its task (with or without a conversion)."""
        with self._cond:
            self._settled.add(threading.get_ident())
            self._cond.notify_all()

    def convert(
        self,
        input_dir: Path,
        output_dir: Path,
        stem: str,
        options: ConversionOptions,
        *,
        timeout_seconds: float | None = None,
    ) -> ConverterRun:
        member = _Member(input_dir, output_dir, stem, options, timeout_seconds)
        group: list[_Member] = []
        deadline = time.monotonic() + LINGER_SECONDS
        with self._cond:
            self._waiting.append(member)
            self._cond.notify_all()
            while not member.decided:
                everyone = len(self._waiting) + len(self._settled) >= self._expected
                if member in self._waiting and (everyone or time.monotonic() >= deadline):
                    group, self._waiting = self._waiting, []
                    break
                self._cond.wait(timeout=max(0.01, deadline - time.monotonic()))
        if group:
            self._convert_together(group)
        self.done()
        if member.run is not None:
            return member.run
        return self._base.convert(input_dir, output_dir, stem, options, timeout_seconds=timeout_seconds)

    def _convert_together(self, group: list[_Member]) -> None:
        try:
            by_options: dict[ConversionOptions, list[_Member]] = {}
            for member in group:
                by_options.setdefault(member.options, []).append(member)
            for options, members in by_options.items():
                self._run(options, members)
        except Exception:  # a bug here must not fail the series: each converts alone
            log.exception("a group conversion failed; its series are converted one by one")
        finally:
            with self._cond:
                for member in group:
                    member.decided = True
                self._cond.notify_all()

    def _run(self, options: ConversionOptions, members: list[_Member]) -> None:
        inputs: list[tuple[_Member, GroupInput]] = []
        uids: set[str] = set()
        for member in members:
            files = tuple(sorted(p for p in member.input_dir.iterdir() if p.is_file()))
            uid = series_uid(files[0]) if files else None
            if uid is None or uid in uids:
                continue  # converted alone: unreadable, or a second copy of a series in this group
            uids.add(uid)
            inputs.append((member, GroupInput(files, member.output_dir, member.stem, uid)))
        if len(inputs) < 2:
            return
        timeout = min([self._timeout, *(m.timeout for m, _ in inputs if m.timeout is not None)])
        self._scratch.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=self._scratch, prefix="group-"))
        try:
            self.runs += 1
            result = self._base.convert_group([g for _, g in inputs], scratch, options, timeout)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(result, str):
            log.info("%d series converted one by one instead of together: %s", len(inputs), result)
            for member, _ in inputs:
                shutil.rmtree(member.output_dir, ignore_errors=True)  # a member alone starts from nothing
            return
        log.info("%d series converted in one dcm2niix run", len(inputs))
        for (member, _), run in zip(inputs, result, strict=True):
            member.run = run


def series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID of one file, or None (never logged: pydicom's records are redacted)."""
    from pydicom import dcmread  # noqa: PLC0415 - worker processes import pydicom for the identifiers anyway

    guard(logging.getLogger("pydicom"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"], force=True).get(
                "SeriesInstanceUID"
            )
        except Exception:
            return None
    text = str(value or "").strip()
    return text if text and all(c.isdigit() or c == "." for c in text) else None
