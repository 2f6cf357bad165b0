"""Failure reasons that name what to fix: the file dcm2niix complained about, and its own words.

dcm2niix names the file it could not use ("Warning: File not large enough to store image data:
/…/IM-0001-0003.dcm"), but the generic reason for its exit code does not, and the warnings kept with the
series have their paths removed (they may hold folder names). This module maps the paths in dcm2niix's
console back to the series' files and adds its message to the reason:
- locally (local state and logs stay on the user's machine) by the file's path:
  "… dcm2niix said: File not large enough to store image data: /data/sub-02/ses-01/T2/IM-0001-0003.dcm";
- in the cloud, never by name (DESIGN.md §10: errors never reveal names): by position in the series and
  Drive file id ("file 3 of 6, Drive id 1AbC…"), which the user can open in Drive.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath

from dicomflow.domain.failures import DicomflowError
from dicomflow.domain.series import FileRef

# A line of dcm2niix's console that says something went wrong.
_COMPLAINT = re.compile(r"^\s*(?:warning|error)\b[:\s]*(.*)$", re.IGNORECASE)
_PATH = re.compile(r"(?:/[^\s:'\"]+)+")
_DRIVE_ID = re.compile(r"^[A-Za-z0-9_-]{10,200}$")
_PATH_END = frozenset(" \t'\",;:)")
MAX_QUOTED = 2  # dcm2niix messages quoted in one reason
MAX_LINE = 300


def _labels(files: Sequence[FileRef], *, names: bool) -> dict[str, str]:
    """What to call each file, by the names dcm2niix may print for it: its own name (a source folder
    used in place) and the numbered name of a link or download (`000002.dcm`, see the Source port)."""
    labels: dict[str, str] = {}
    for index, ref in enumerate(files):
        if names:
            label = ref.ref  # locally, the file's own path (an item keeps no source path, model.positioned)
        else:
            label = f"file {index + 1} of {len(files)}" + (f", Drive id {ref.ref}" if _DRIVE_ID.match(ref.ref) else "")
        labels[f"{index:06d}.dcm"] = label
        if names:
            labels.setdefault(PurePath(ref.ref).name, label)
    return labels


def _placeholder(index: int) -> str:
    # A private-use character: no letter or digit, so scrubbing (a token rule) neither removes nor joins it.
    return chr(0xE000 + index)


def _quoted(console: str, input_dir: Path, labels: dict[str, str], scrub: Callable[[str], str]) -> list[str]:
    """dcm2niix's complaints, each file of the series replaced by its label and any other path by
    `<path>`. Paths of the series are found whole (folder names may hold spaces), before the rest is
    scrubbed of other paths and by `scrub` (dcm2niix quotes protocol names); labels go in last, as they
    are (a label is the user's own path, locally, or a position and Drive id in the cloud)."""
    about_files: list[str] = []
    others: list[str] = []
    folder = str(input_dir).rstrip("/") + "/"
    for line in console.splitlines():
        match = _COMPLAINT.match(line)
        if not match:
            continue
        message, used = _mark_files(match.group(1).strip(), folder, labels)
        message = scrub(_PATH.sub("<path>", message))[:MAX_LINE]
        for index, label in enumerate(used):
            message = message.replace(_placeholder(index), label)
        bucket = about_files if used else others
        if message and message not in bucket:
            bucket.append(message)
    return (about_files or others)[:MAX_QUOTED]


def _mark_files(message: str, folder: str, labels: dict[str, str]) -> tuple[str, list[str]]:
    """Replace each `folder/<file of the series>` in `message` by a placeholder; returns the labels in order.
    The longest name that ends where the path ends wins (`000002.dcm`, not a file called `000`)."""
    used: list[str] = []
    out: list[str] = []
    rest = message
    while (at := rest.find(folder)) >= 0:
        out.append(rest[:at])
        tail = rest[at + len(folder) :]
        fits = [n for n in labels if tail.startswith(n) and (len(tail) == len(n) or tail[len(n)] in _PATH_END)]
        if not fits:
            out.append(folder)
            rest = tail
            continue
        name = max(fits, key=len)
        out.append(_placeholder(len(used)))
        used.append(labels[name])
        rest = tail[len(name) :]
    out.append(rest)
    return "".join(out), used


def name_what_failed(
    error: DicomflowError,
    console: str,
    input_dir: Path,
    files: Sequence[FileRef],
    *,
    names: bool,
    scrub: Callable[[str], str],
) -> DicomflowError:
    """Add to the reason of `error` (raised for a dcm2niix run over `files` in `input_dir`) dcm2niix's own
    message about the file it could not use; returns the same error. `names`: the reason may name files
    (local mode). `scrub` removes identifiers from dcm2niix's words, not from the labels put in for files."""
    quoted = _quoted(console, input_dir, _labels(files, names=names), scrub)
    if quoted:
        error.reason = f"{error.reason} dcm2niix said: {'; '.join(quoted)}"
        error.args = (error.reason,)
    return error
