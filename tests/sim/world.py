"""The simulated world around the services: a source archive, the header scanner, dcm2niix, heartbeats.

The sink is the real LocalFolderSink on a temporary folder (its idempotence is part of what is tested);
everything else is a small model whose durations run on the simulated clock:
- the archive: series of a few kinds (good, corrupt: dcm2niix exits 4, report: nothing to convert,
  multi-output: an extra echo, fixable: corrupt until the user re-exports it, which a redrive reads
  again, and then slow to convert), with some non-DICOM files, in nested folders;
- downloads and conversions take simulated time proportional to their size, and some series are slow
  enough that a conversion outlives a lease (and must keep it alive by heartbeats);
- the converter writes outputs whose bytes are a pure function of the series and its files, as dcm2niix's
  are, so a re-delivered conversion publishes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicomflow.domain.facts import OutputImage
from dicomflow.domain.failures import ConverterTimeout
from dicomflow.domain.locations import Location
from dicomflow.domain.privacy import Identifiers
from dicomflow.domain.series import ConversionOptions, DicomHeader, FileRef, Ignored, IgnoredKind, ScanResult
from dicomflow.ports import ConverterRun, Progress, SkippedFile
from tests.sim.kernel import Sim

MR = "1.2.840.10008.5.1.4.1.1.4"
REEXPORTED = 1_000_000  # added to a file's size once the user has re-exported its series
KINDS = ("good", "good", "good", "good", "multi", "corrupt", "report", "slow")


@dataclass(frozen=True)
class SeriesSpec:
    uid: str
    folder: str
    number: int
    files: int
    kind: str

    def refs(self) -> list[FileRef]:
        return [FileRef(f"{self.uid}/{n}", f"{self.folder}/IM{n:04d}.dcm", 4096 + n) for n in range(self.files)]


@dataclass
class Archive:
    name: str
    series: list[SeriesSpec]
    junk: list[str] = field(default_factory=list)  # files that are not DICOM
    list_seconds: float = 0.0  # extra time a listing takes (a very large Drive folder)

    def by_uid(self) -> dict[str, SeriesSpec]:
        return {s.uid: s for s in self.series}


def make_archive(
    sim: Sim, name: str, count: int, *, kinds: tuple[str, ...] = (), files: int = 0, list_seconds: float = 0.0
) -> Archive:
    """`kinds` and `files` fix what is otherwise drawn from the seed (named scenarios need them)."""
    series = []
    for n in range(count):
        kind = kinds[n % len(kinds)] if kinds else sim.rng.choice(KINDS)
        uid = f"2.25.{sim.rng.getrandbits(48)}.{n}"
        folder = f"sub-{n % 3:02d}/ses-01/{n:02d}_{kind}"
        series.append(SeriesSpec(uid, folder, n + 1, files or sim.rng.randint(2, 6), kind))
    junk = [f"sub-{n:02d}/notes.txt" for n in range(sim.rng.randint(0, 2))]
    return Archive(name, series, junk, list_seconds)


class SimSource:
    """A local-looking source folder whose reads take simulated time."""

    def __init__(self, sim: Sim, archives: dict[str, Archive]) -> None:
        self._sim = sim
        self._archives = archives  # by location ref
        self.fetches: list[tuple[float, tuple[str, ...]]] = []
        self._reexported: set[str] = set()  # archives whose `fixable` series the user has re-exported

    def reexport(self, location_ref: str) -> None:
        """The user re-exports the broken series of an archive (before asking for a redrive): from now on
        its `fixable` files are listed with their new sizes, which a redrive reads again."""
        self._reexported.add(location_ref)

    def _archive(self, location: Location) -> Archive:
        return self._archives[location.ref]

    def check(self, location: Location) -> str:
        return self._archive(location).name

    def list_files(self, location: Location) -> Iterator[FileRef | SkippedFile]:
        archive = self._archive(location)
        fixed = location.ref in self._reexported
        for spec in archive.series:
            if fixed and spec.kind == "fixable":
                yield from (FileRef(r.ref, r.path, r.size + REEXPORTED, r.md5) for r in spec.refs())
            else:
                yield from spec.refs()
        for path in archive.junk:
            yield FileRef(f"junk/{path}", path, 12)
        self._sim.sleep(0.05 * len(archive.series) + archive.list_seconds)

    def read_prefix(self, ref: FileRef, size: int) -> bytes:
        raise AssertionError("the simulated scanner does not read prefixes")

    def refresh(self, refs: Sequence[FileRef]) -> list[FileRef]:
        """The files as they are now: the user re-exported every series that was `fixable` (new sizes)."""
        self._sim.sleep(0.01 * len(refs))
        return [FileRef(r.ref, r.path, r.size + REEXPORTED, r.md5) if self._kind(r) == "fixable" else r for r in refs]

    def _kind(self, ref: FileRef) -> str:
        uid = ref.ref.rsplit("/", 1)[0]
        return next((s.kind for a in self._archives.values() for s in a.series if s.uid == uid), "")

    def fetch(self, refs: Sequence[FileRef], dest_dir: Path, progress: Progress | None = None) -> Path:
        total = sum(r.size for r in refs)
        done = 0
        for ref in refs:
            self._sim.sleep(self._sim.rng.uniform(0.5, 3.0))  # a download per file
            done += ref.size
            if progress:
                progress(done, total)
        dest_dir.mkdir(parents=True, exist_ok=True)
        (dest_dir / "manifest.json").write_text(json.dumps([[r.ref, r.size] for r in refs]))
        self.fetches.append((self._sim.now, tuple(r.ref for r in refs)))
        return dest_dir


class SimScanner:
    def __init__(self, sim: Sim, archives: dict[str, Archive]) -> None:
        self._sim = sim
        self._series = {s.uid: s for a in archives.values() for s in a.series}

    def scan(self, source: object, refs: Sequence[FileRef]) -> list[ScanResult]:
        self._sim.sleep(0.002 * len(refs))
        results: list[ScanResult] = []
        for ref in refs:
            if ref.ref.startswith("junk/"):
                results.append(Ignored(IgnoredKind.NOT_DICOM))
                continue
            uid = ref.ref.rsplit("/", 1)[0]
            spec = self._series[uid]
            results.append(DicomHeader(uid, MR, f"{ref.ref}", spec.number, "MR", f"{spec.kind}_series"))
        return results


@dataclass
class ConverterCall:
    time: float
    series_uid: str
    files: tuple[str, ...]
    generation_hint: str = ""


class SimConverter:
    """dcm2niix, as far as the services can tell: exit codes, outputs, console, duration."""

    def __init__(self, sim: Sim, archives: dict[str, Archive], on_call: Callable[[str], None] | None = None) -> None:
        self._sim = sim
        self._series = {s.uid: s for a in archives.values() for s in a.series}
        self.calls: list[ConverterCall] = []
        self._on_call = on_call

    @property
    def version(self) -> str:
        return "dcm2niix-sim-1"

    def convert(
        self,
        input_dir: Path,
        output_dir: Path,
        stem: str,
        options: ConversionOptions,
        *,
        timeout_seconds: float | None = None,
    ) -> ConverterRun:
        manifest = json.loads((input_dir / "manifest.json").read_text())
        refs = tuple(ref for ref, _ in manifest)
        uid = refs[0].rsplit("/", 1)[0]
        spec = self._series[uid]
        kind = spec.kind
        if kind == "fixable":
            kind = "slow" if all(size >= REEXPORTED for _, size in manifest) else "corrupt"
        self.calls.append(ConverterCall(self._sim.now, uid, refs))
        if self._on_call:
            self._on_call(uid)
        seconds = 5.0 + 2.0 * len(refs) + (900.0 if kind == "slow" else 0.0)
        if timeout_seconds is not None and seconds > timeout_seconds:
            self._sim.sleep(timeout_seconds)
            raise ConverterTimeout(f"dcm2niix did not finish within {timeout_seconds:.0f} s (simulated)")
        self._sim.sleep(seconds)
        output_dir.mkdir(parents=True, exist_ok=True)
        if kind == "corrupt":
            return ConverterRun(4, (), "Error: Unable to decode file (simulated corrupt file)", seconds)
        if kind == "report":
            return ConverterRun(2, (), "No valid DICOM images were found", seconds)
        digest = hashlib.sha256("\n".join([uid, *sorted(refs)]).encode()).hexdigest()
        names = [f"{stem}.nii.gz", f"{stem}.json"] + ([f"{stem}_e2.nii.gz"] if kind == "multi" else [])
        outputs = []
        for name in names:
            path = output_dir / name
            if name.endswith(".json"):
                # dcm2niix's sidecar, as far as --layout bids reads it: its guess names the series a T1w.
                sidecar = {"BidsGuess": ["anat", "_acq-sim_T1w"], "SeriesNumber": spec.number, "digest": digest}
                path.write_text(json.dumps(sidecar) + "\n")
            else:
                path.write_text(f"{name}:{digest}\n")
            outputs.append(path)
        console = f"Convert {len(refs)} DICOM as {output_dir / stem} (64x64x{len(refs)}x1)\n"
        return ConverterRun(0, tuple(sorted(outputs)), console, seconds)


class NoProfile:
    """The simulated converter's outputs are not NIfTI: the profile (tested on real outputs elsewhere)
    leaves them as they are."""

    version = "none"

    def identifiers(self, input_dir: Path) -> Identifiers:
        return Identifiers()

    def apply(self, outputs: Sequence[Path], identifiers: Identifiers, *, compress: bool) -> tuple[Path, ...]:
        return tuple(outputs)

    def acquisition_offset(self, input_dir: Path, outputs: Sequence[Path]) -> float | None:
        return None  # series are ordered by SeriesNumber, as for a site that keeps no acquisition times


class SimInspector:
    """What the report shows of an image: fixed facts (the simulated outputs are not NIfTI)."""

    def describe(self, path: Path) -> OutputImage | None:
        return OutputImage(path.name, (4, 4, 4), (1.0, 1.0, 1.0), 1, b"sim-png", (1, 1))


class _SimBeating:
    def __init__(self, sim: Sim, beat: Callable[[], bool], every: float) -> None:
        self._sim = sim
        self._beat = beat
        self._every = every
        self._stopped = False
        self._alive = True
        self.proc = sim.spawn(f"heartbeat:{sim.current().name}", self._run, child=True)

    @property
    def alive(self) -> bool:
        return self._alive

    def _run(self) -> None:
        while True:
            self._sim.sleep(self._every)
            if self._stopped:
                return
            try:
                alive = self._beat()
            except Exception:  # like the real heartbeat: a failed renewal is tried again at the next beat
                alive = True
            if not alive:
                self._alive = False
                return

    def stop(self) -> None:
        self._stopped = True


class SimHeartbeat:
    """The Heartbeat port as a simulated child process: it dies with the instance that started it."""

    def __init__(self, sim: Sim) -> None:
        self._sim = sim

    def start(self, beat: Callable[[], bool], every: float) -> _SimBeating:
        return _SimBeating(self._sim, beat, every)
