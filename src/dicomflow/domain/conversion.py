"""What a dcm2niix run means: its exit code, its console and the files it wrote, mapped to an outcome a
user can act on, with every volume it wrote accounted for (issue 9: no volume is ever lost).

Exit codes of dcm2niix (pinned version; DESIGN.md §5, and nii_dicom.h `EXIT_*` in rordenlab/dcm2niix):
0 ok · 1 unspecified · 2 no DICOM found · 3 version report · 4 corrupt file · 5 input folder invalid ·
6 output folder invalid · 7 output not writable · 8 some converted, some not · 9 rename error ·
10 incomplete volumes · 11 nothing expected to convert · 12 bad option; 137/139 (or -9/-11 from
Python's subprocess) = killed (often out of memory) or crashed.

What the console of dcm2niix 1.0.20260724 says, measured on generated series and on every DICOM file
shipped with pydicom and nibabel (tests/integration/test_volumes.py):
- `Found N DICOM file(s)`: the files it listed in the folder it was given (files, not frames);
- `Convert N DICOM as <output dir>/<name> (XxYxZxT)`: once per volume written, N = DICOM objects used
  (an enhanced multi-frame file counts once, and may give several volumes); the line can run straight
  into an error without a newline ("(10x10x1x2)Error: RLE header corrupted");
- volumes it derives from one it reported carry that name plus its own suffix and get no Convert line
  (`_Eq_1` equalised slices, `_ROI1` overlays, `_Tilt_1` gantry tilt, `_ADC`, `_Crop_1`);
- with `-w 1`, `Warning: Overwriting existing file with the name <path>` before the second volume of the
  same name (the first is lost); with `-w 0`, `Warning: Skipping existing file named <path>`;
- with `-w 2`, a clashing name gets `a`, `b`, `c`... appended (`3_T1`, `3_T1a`): that is how it keeps
  volumes it cannot tell apart by its own suffixes (several SeriesNumbers in one SeriesInstanceUID,
  original and derived images of a Philips fieldmap, a classic and an enhanced copy);
- `Warning: Missing images? Expected N images, but instance number (0020,0013) ranges from A to B`, or
  exit 10, or exit 8 (`Error: Converted X of Y files`): something of the series is not in the outputs;
- `Warning: Unsupported transfer syntax '<uid>'`: the files were skipped, so exit 2 does not mean "no
  images" then.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePath
from typing import Protocol

from dicomflow.domain.failures import (
    ConversionFailed,
    ConverterCrashed,
    DicomflowError,
    DiskFull,
    SeriesChanged,
    TransientError,
)


class ConversionVerdict(StrEnum):
    CONVERTED = "converted"
    NOTHING_TO_CONVERT = "nothing_to_convert"


class VolumeLost(ConversionFailed):
    """dcm2niix reported a volume that is not among the outputs, or wrote two under one name."""

    code = "volume_lost"


class UnsupportedTransferSyntax(ConversionFailed):
    """The series is stored in a transfer syntax the pinned dcm2niix cannot decode."""

    code = "unsupported_transfer_syntax"


@dataclass(frozen=True, slots=True)
class Volume:
    """One image volume dcm2niix wrote, by file name (no folders: they may name the patient).

    `name` is the NIfTI's name without extension; `files` are the NIfTI and the files that belong to it
    (.json sidecar, .bval/.bvec). `images` is the number of DICOM objects dcm2niix says it used and
    `dims` the dimensions it printed; both are 0/() for a volume dcm2niix derived from another one
    without reporting it (`derived_from` names that one) or for one it did not report at all.
    """

    name: str
    files: tuple[str, ...]
    images: int = 0
    dims: tuple[int, ...] = ()
    derived_from: str = ""


@dataclass(frozen=True, slots=True)
class Classified:
    verdict: ConversionVerdict
    warnings: tuple[str, ...]
    skip_reason: str = ""
    incomplete: bool = False
    """dcm2niix says something of the series is missing from the outputs (exit 8 or 10, or its
    "Missing images?" warning): the outputs are kept, and the series must be shown as incomplete."""
    volumes: tuple[Volume, ...] = ()


class Run(Protocol):
    """What a converter run leaves (ports.ConverterRun has these fields)."""

    @property
    def exit_code(self) -> int: ...

    @property
    def outputs(self) -> Sequence[PurePath]: ...

    @property
    def console(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Reported:
    """One `Convert N DICOM as <path> (dims)` line: the name (last path component) it wrote."""

    name: str
    images: int
    dims: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ConsoleReport:
    found: int | None
    converted: tuple[Reported, ...]
    clobbered: tuple[str, ...]  # names dcm2niix overwrote (-w 1) or refused to write (-w 0)
    missing_images: bool
    converted_of: tuple[int, int] | None  # "Converted X of Y files" (exit 8)
    unsupported_syntaxes: tuple[str, ...]


_WARNING = re.compile(r"^\s*(warning|error)\b[:\s]", re.IGNORECASE)
# dcm2niix prints paths of the folder it was given; we never keep them (they may hold folder names).
_PATHISH = re.compile(r"(/[^\s:]+)+")
_FOUND = re.compile(r"^Found (\d+) DICOM file", re.MULTILINE)
# The name runs up to the last " (" before the dimensions: output names never contain " (" because
# dicomflow passes a literal [A-Za-z0-9_-] stem, and dcm2niix's suffixes are [A-Za-z0-9_].
_CONVERT = re.compile(r"^Convert (\d+) DICOM as (.+?) \((\d+(?:x\d+)*)\)", re.MULTILINE)
_CLOBBERED = re.compile(
    r"(?:Overwriting existing file with the name|Skipping existing file named) (.+?)\s*$", re.MULTILINE
)
_MISSING = re.compile(r"Missing images\?", re.IGNORECASE)
_CONVERTED_OF = re.compile(r"Converted (\d+) of (\d+) files")
_UNSUPPORTED = re.compile(r"Unsupported transfer syntax '([0-9.]+)'")
_COLLISION_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# What dcm2niix writes next to a NIfTI, longest first so ".nii.gz" wins over ".gz".
_EXTENSIONS = (".nii.gz", ".nii", ".json", ".bval", ".bvec", ".nrrd", ".nhdr", ".mgz", ".txt")
_NIFTI = (".nii.gz", ".nii")
_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (12-bit lossy)",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
}


def _name_of(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip())[-1]


def parse_console(console: str) -> ConsoleReport:
    """What dcm2niix says it did (see the module docstring for the lines and why each matters)."""
    found = _FOUND.search(console)
    converted = tuple(
        Reported(_name_of(m.group(2)), int(m.group(1)), tuple(int(d) for d in m.group(3).split("x")))
        for m in _CONVERT.finditer(console)
    )
    of = _CONVERTED_OF.search(console)
    return ConsoleReport(
        found=int(found.group(1)) if found else None,
        converted=converted,
        clobbered=tuple(_name_of(m.group(1)) for m in _CLOBBERED.finditer(console)),
        missing_images=bool(_MISSING.search(console)),
        converted_of=(int(of.group(1)), int(of.group(2))) if of else None,
        unsupported_syntaxes=tuple(dict.fromkeys(_UNSUPPORTED.findall(console))),
    )


def console_warnings(console: str, limit: int = 20) -> tuple[str, ...]:
    """The Warning:/Error: lines of a dcm2niix console, paths removed, de-duplicated, capped."""
    seen: list[str] = []
    for line in console.splitlines():
        if _WARNING.match(line):
            cleaned = _PATHISH.sub("<path>", line.strip())[:300]
            if cleaned not in seen:
                seen.append(cleaned)
        if len(seen) >= limit:
            break
    return tuple(seen)


_CONVERTED = re.compile(r"^Convert (\d+) DICOM", re.MULTILINE)


def converted_files(console: str) -> int:
    """How many DICOM objects dcm2niix says it used ("Convert 96 DICOM as ...", once per output). One
    object can feed several outputs (an enhanced file holding magnitude and phase), so this may exceed
    the series' file count without anything being wrong."""
    return sum(int(n) for n in _CONVERTED.findall(console))


def check_input_count(console: str, expected: int) -> tuple[str, ...]:
    """A warning when dcm2niix used fewer DICOM objects than the series has files.

    Never an error: the image count is not a file count (multi-frame objects, one object in several
    outputs), so using "more" is normal for some data and proves nothing. A folder that changes under
    dcm2niix shows in its file listing instead (`assess`: "Found N DICOM file(s)").
    """
    used = converted_files(console)
    if 0 < used < expected:
        return (f"dcm2niix used {used} of the {expected} files of this series",)
    return ()


def split_name(file_name: str) -> tuple[str, str]:
    """(name, extension) of an output file: `3_T1_e2.nii.gz` -> (`3_T1_e2`, `.nii.gz`)."""
    for extension in _EXTENSIONS:
        if file_name.endswith(extension) and len(file_name) > len(extension):
            return file_name[: -len(extension)], extension
    return file_name, ""


def collision_groups(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Names dcm2niix made unique with `-w 2`: `B`, `Ba`, `Bb`, ... (it tries the letters in order while
    a file of that name exists), each group in that order. Names that clash with nothing are left out.

    A dcm2niix suffix never ends a name with a single extra letter after another reported name (its
    suffixes start with `_`), so `B` + one letter reported next to `B` is always such a clash.
    """
    present = set(names)
    taken: set[str] = set()
    groups: list[tuple[str, ...]] = []
    for base in sorted(present):
        if base in taken:
            continue
        members = [base]
        for letter in _COLLISION_LETTERS:
            if base + letter not in present:
                break
            members.append(base + letter)
        if len(members) > 1:
            groups.append(tuple(members))
            taken.update(members)
    return groups


def deterministic_names(groups: Sequence[tuple[str, ...]], keys: Mapping[str, tuple[object, ...]]) -> dict[str, str]:
    """Which name each clashing volume gets so the result does not depend on dcm2niix's processing order.

    dcm2niix hands out `B`, `Ba`, `Bb`... in the order it meets the volumes, which follows the order the
    file system lists the files in (`tinydir_open`, unsorted) — different for a local folder, a folder
    of links and a download. `keys[name]` is a sort key computed from the volume's own content (the
    adapter uses SeriesNumber, then original before derived, then a digest of the voxels); the volume
    with the smallest key gets `B`, the next `Ba`, and so on. Returns old name -> new name for the
    volumes that must move (possibly in a cycle: rename through temporary names).
    """
    moves: dict[str, str] = {}
    for group in groups:
        ordered = sorted(group, key=lambda name: (keys[name], name))
        for old, new in zip(ordered, group, strict=True):
            if old != new:
                moves[old] = new
    return moves


def volumes_of(file_names: Sequence[str], reported: Sequence[Reported]) -> tuple[Volume, ...]:
    """Group output files into volumes: a NIfTI and the files sharing its name. A NIfTI whose name is a
    reported name plus `_...` and that was not reported itself is derived from that one."""
    by_name: dict[str, list[str]] = {}
    for file_name in sorted(file_names):
        name, _extension = split_name(file_name)
        by_name.setdefault(name, []).append(file_name)
    facts = {r.name: r for r in reported}
    volumes = []
    for name, files in sorted(by_name.items()):
        if not any(f.endswith(_NIFTI) for f in files):
            continue  # a sidecar of no NIfTI: reported below as a missing volume if dcm2niix named it
        fact = facts.get(name)
        parent = "" if fact else max((r for r in facts if name.startswith(r + "_")), key=len, default="")
        volumes.append(
            Volume(name, tuple(files), fact.images if fact else 0, fact.dims if fact else (), derived_from=parent)
        )
    return tuple(volumes)


def assess(run: Run, *, files: int) -> Classified:
    """Account for every volume of one dcm2niix run over one series of `files` DICOM files.

    Returns the outcome with the volumes (by file name) and whether the series is `incomplete`; raises
    a `DicomflowError` the user can act on:
    - `VolumeLost` (permanent): dcm2niix reported a volume that is not among `outputs`, reported two
      volumes under one name, or overwrote/skipped one because of a name clash;
    - `UnsupportedTransferSyntax` (permanent): it skipped files it cannot decode (not "nothing to convert");
    - `SeriesChanged` (transient): it listed more DICOM files than the series has, so files were added to
      the folder while it ran (the folder it reads holds exactly the series' files when it starts);
    - `ConversionFailed` (permanent) for data errors, `TransientError` subclasses for crashes, kills and
      I/O trouble (see `classify`).
    Report-only series (exit 2/11, or 0 with nothing written) are NOTHING_TO_CONVERT, a skip. A
    conversion is `incomplete` on exit 8 or 10, on dcm2niix's "Missing images?" warning, or when it
    listed fewer files than the series has.
    """
    exit_code = run.exit_code
    report = parse_console(run.console)
    warnings = console_warnings(run.console)
    names = [p.name for p in run.outputs]
    if report.found is not None and report.found > files:
        raise SeriesChanged(
            f"dcm2niix found {report.found} DICOM files in the folder of this series, which has {files}: files "
            "were added to it while it was being converted. It will be retried."
        )
    if report.unsupported_syntaxes and not report.converted:
        syntax = report.unsupported_syntaxes[0]
        label = _SYNTAX_NAMES.get(syntax, syntax)
        raise UnsupportedTransferSyntax(
            f"this series is stored as {label} ({syntax}), which dcm2niix cannot read. Convert the files to an "
            "uncompressed transfer syntax (for example `dcmconv +te` or `gdcmconv -w`) and upload them again.",
            detail="\n".join(warnings[-5:]),
        )
    if exit_code not in (0, 8, 10):
        return _without_volumes(exit_code, len(names), warnings)
    _check_accounted(report, names)
    volumes = volumes_of(names, report.converted)
    if not volumes:
        if exit_code == 0:
            return _nothing_to_convert(warnings)
        raise _error_for(exit_code, "\n".join(warnings[-5:]))
    notes = list(warnings)
    # Fewer files listed than the series has: dcm2niix did not take some of them for DICOM (or they
    # vanished from the folder while it ran); either way they are not in the outputs.
    unseen = report.found is not None and report.found < files
    incomplete = exit_code in (8, 10) or report.missing_images or unseen
    if exit_code == 8:
        done = f" ({report.converted_of[0]} of {report.converted_of[1]} files)" if report.converted_of else ""
        notes.append(f"dcm2niix converted only part of this series{done}; the rest is not in the outputs")
    elif exit_code == 10:
        notes.append("dcm2niix found incomplete volumes in this series (exit code 10): some slices are missing")
    elif report.missing_images:
        notes.append("dcm2niix suspects missing images in this series (instance numbers have gaps)")
    if unseen:
        notes.append(f"dcm2niix found only {report.found} of the {files} files of this series")
    used = sum(r.images for r in report.converted)
    if 0 < used < files and not incomplete:
        notes.append(f"dcm2niix used {used} of the {files} files of this series")
    return Classified(ConversionVerdict.CONVERTED, tuple(notes), incomplete=incomplete, volumes=volumes)


def _check_accounted(report: ConsoleReport, names: Sequence[str]) -> None:
    """Every volume dcm2niix reports is among the outputs, once; nothing was overwritten or skipped."""
    if report.clobbered:
        raise VolumeLost(
            f"dcm2niix wrote {len(report.clobbered) + 1} volumes of this series under one name, so only one "
            "was kept. This is a dicomflow bug (the output names must be unique): please report it.",
            detail=", ".join(sorted(set(report.clobbered))),
        )
    reported = [r.name for r in report.converted]
    twice = sorted({n for n in reported if reported.count(n) > 1})
    if twice:
        raise VolumeLost(
            f"dcm2niix reported {len(reported)} volumes but {len(twice)} of their names twice, so volumes "
            "replaced each other. This is a dicomflow bug: please report it.",
            detail=", ".join(twice),
        )
    have = {split_name(n)[0] for n in names if n.endswith(_NIFTI)}
    lost = [n for n in reported if n not in have]
    if lost:
        raise VolumeLost(
            f"dcm2niix reported converting {len(reported)} volumes but {len(lost)} of them are not among its "
            "outputs. The series was not published; please report it.",
            detail=", ".join(lost),
        )


def _nothing_to_convert(warnings: tuple[str, ...]) -> Classified:
    # 2 on a report-only series (Siemens PhoenixZIPReport SR) is "nothing to convert" (DESIGN.md §9).
    return Classified(
        ConversionVerdict.NOTHING_TO_CONVERT,
        warnings,
        skip_reason="dcm2niix found no images to convert in this series (e.g. a report or a secondary capture)",
    )


def _without_volumes(exit_code: int, output_count: int, warnings: tuple[str, ...]) -> Classified:
    """Exit codes that never mean "converted": nothing to convert, or an error."""
    if exit_code in (2, 11):
        return _nothing_to_convert(warnings)
    raise _error_for(exit_code, "\n".join(warnings[-5:]))


def classify(exit_code: int, output_count: int, console: str) -> Classified:
    """Turn a finished dcm2niix run into an outcome from its exit code alone (no volume accounting).

    Kept for callers that have not moved to `assess`. Raises a `DicomflowError`: `ConversionFailed`
    (permanent: the data must change), or a `TransientError` subclass when another attempt may succeed.
    """
    warnings = console_warnings(console)
    tail = "\n".join(warnings[-5:])
    if exit_code == 0 and output_count > 0:
        return Classified(ConversionVerdict.CONVERTED, warnings)
    if exit_code in (0, 2, 11):
        return _nothing_to_convert(warnings)
    if exit_code == 8 and output_count > 0:
        return Classified(
            ConversionVerdict.CONVERTED,
            (*warnings, "dcm2niix converted only part of this series (exit code 8); check the outputs"),
            incomplete=True,
        )
    raise _error_for(exit_code, tail)


def _error_for(exit_code: int, tail: str) -> DicomflowError:
    if exit_code in (137, 139, -9, -11, -6, 134):
        return ConverterCrashed(
            f"dcm2niix was killed or crashed (exit code {exit_code}); this is often a lack of memory. "
            "It will be retried; if it keeps failing, give the worker more memory.",
            detail=tail,
        )
    if exit_code == 7:
        return DiskFull(
            "dcm2niix could not write its output (exit code 7): the disk may be full or read-only. "
            "Free some space; the series will be retried.",
            detail=tail,
        )
    if exit_code in (5, 6, 9):
        return TransientError(
            f"dcm2niix could not use its working folders (exit code {exit_code}); it will be retried.",
            detail=tail,
        )
    reasons = {
        0: "dcm2niix reported success but wrote no image; this is a dicomflow bug, please report it.",
        1: "dcm2niix could not convert this series (exit code 1), often because slices are missing "
        "or the images are inconsistent. Check that the series was exported completely.",
        3: "dcm2niix only reported its version (exit code 3); this is a dicomflow bug, please report it.",
        4: "a file of this series is corrupt (dcm2niix exit code 4). Re-export the series from the scanner "
        "or PACS and upload it again.",
        8: "dcm2niix could convert only part of this series and wrote nothing usable (exit code 8).",
        10: "the series has incomplete volumes (dcm2niix exit code 10): some slices or volumes are missing. "
        "Re-export the complete series.",
        12: "dcm2niix rejected the conversion options (exit code 12); check the batch options.",
    }
    reason = reasons.get(
        exit_code, f"dcm2niix failed with an unexpected exit code {exit_code}; see the warnings for details."
    )
    return ConversionFailed(reason, detail=tail)
