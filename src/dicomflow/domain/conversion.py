"""What a dcm2niix run means: its exit code and console, mapped to an outcome a user can act on.

Exit codes of dcm2niix (pinned version; DESIGN.md §5, and nii_dicom.h `EXIT_*` in rordenlab/dcm2niix):
0 ok · 1 unspecified · 2 no DICOM found · 3 version report · 4 corrupt file · 5 input folder invalid ·
6 output folder invalid · 7 output not writable · 8 some converted, some not · 9 rename error ·
10 incomplete volumes · 11 nothing expected to convert · 12 bad option; 137/139 (or -9/-11 from
Python's subprocess) = killed (often out of memory) or crashed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

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


@dataclass(frozen=True, slots=True)
class Classified:
    verdict: ConversionVerdict
    warnings: tuple[str, ...]
    skip_reason: str = ""


_WARNING = re.compile(r"^\s*(warning|error)\b[:\s]", re.IGNORECASE)
# dcm2niix prints paths of the folder it was given; we never keep them (they may hold folder names).
_PATHISH = re.compile(r"(/[^\s:]+)+")


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
    """How many input files dcm2niix says it used ("Convert 96 DICOM as ...", once per output)."""
    return sum(int(n) for n in _CONVERTED.findall(console))


def check_input_count(console: str, expected: int) -> tuple[str, ...]:
    """dcm2niix must not have used files that are not part of the series (a folder that changed while
    it ran); using fewer is normal for some series (derived images) and only worth a warning."""
    used = converted_files(console)
    if used > expected:
        raise SeriesChanged(
            f"dcm2niix found {used} images where the series has {expected}: files were added to its folder "
            "during conversion. It will be retried."
        )
    if 0 < used < expected:
        return (f"dcm2niix used {used} of the {expected} files of this series",)
    return ()


def classify(exit_code: int, output_count: int, console: str) -> Classified:
    """Turn a finished dcm2niix run into an outcome, or raise the error the user should see.

    Raises a `DicomflowError`: `ConversionFailed` (permanent: the data must change), or a
    `TransientError` subclass when another attempt may succeed (crash, OOM kill, I/O trouble).
    """
    warnings = console_warnings(console)
    tail = "\n".join(warnings[-5:])
    if exit_code == 0 and output_count > 0:
        return Classified(ConversionVerdict.CONVERTED, warnings)
    if exit_code in (0, 2, 11):
        # 2 on a report-only series (Siemens PhoenixZIPReport SR) is "nothing to convert" (DESIGN.md §9).
        return Classified(
            ConversionVerdict.NOTHING_TO_CONVERT,
            warnings,
            skip_reason="dcm2niix found no images to convert in this series (e.g. a report or a secondary capture)",
        )
    if exit_code == 8 and output_count > 0:
        return Classified(
            ConversionVerdict.CONVERTED,
            (*warnings, "dcm2niix converted only part of this series (exit code 8); check the outputs"),
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
