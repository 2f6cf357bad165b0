"""Several small series in one dcm2niix run, mapped back to their series exactly (issue 13, item 9).

On archives of many small series, starting dcm2niix once per series costs more than the conversion.
Locally, dicomflow may therefore give dcm2niix a folder holding the folders of several series at once
(`-d 1`), each output named by its SeriesInstanceUID (`-f %j`). The result is used only if it can be
taken apart without guessing; otherwise every series of the group is converted again on its own, so
failures, warnings and skips stay per series.

Taken apart without guessing means all of this holds (`split_group`):
- dcm2niix exited 0 and printed no warning or error (a warning could not be told apart by series);
- it listed exactly the files of the group (`Found N DICOM file(s)`), and read no file it cannot decode;
- every volume it reported and every file it wrote starts with the UID of exactly one series, followed
  by nothing or by one of dcm2niix's own suffixes (`_e2`, `_ph`, `a` for a name clash...), never by a
  digit or a dot (so UID `1.2.3` cannot claim the outputs of `1.2.3.4`);
- each series' volumes used exactly as many DICOM files as the series has, and it has at least one:
  a volume that mixed two series (dcm2niix's `-m 2` may merge across SeriesInstanceUIDs) would count
  files of the other, a series split in an unexpected way would not add up.

No two series of a group may share a SeriesInstanceUID (the caller checks); their outputs could not be
told apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from dicomflow.domain.conversion import ConsoleReport, console_warnings, parse_console, split_name

_NOT_A_SUFFIX_START = frozenset("0123456789.")


@dataclass(frozen=True, slots=True)
class GroupMember:
    uid: str  # SeriesInstanceUID: the name dcm2niix gives this series' outputs in the group run
    stem: str  # the name its outputs must have (what a run of this series alone would have used)
    files: int  # files in its input folder


@dataclass(frozen=True, slots=True)
class MemberOutputs:
    renames: tuple[tuple[str, str], ...]  # (file written by the group run, its name for this series)
    console: str  # the group console's lines about this series, as a run of it alone would print them


def split_group(
    exit_code: int, console: str, file_names: Sequence[str], members: Sequence[GroupMember]
) -> tuple[MemberOutputs, ...] | str:
    """Each member's outputs and console, in the order of `members`; or why the group run cannot be
    taken apart (then every member must be converted on its own)."""
    report = parse_console(console)
    refusal = _refusal(exit_code, console, report, members)
    if refusal:
        return refusal
    lines: list[list[str]] = [[] for _ in members]
    used = [0] * len(members)
    for volume in report.converted:
        owner = _owner(volume.name, members)
        if owner is None:
            return f"a reported volume belongs to no single series of the group ({len(volume.name)} characters)"
        index, rest = owner
        used[index] += volume.images
        dims = "x".join(str(d) for d in volume.dims)
        lines[index].append(f"Convert {volume.images} DICOM as {members[index].stem}{rest} ({dims})")
    for member, count in zip(members, used, strict=True):
        if count != member.files:
            return f"the volumes of one series used {count} DICOM files, the series has {member.files}"
    renames: list[list[tuple[str, str]]] = [[] for _ in members]
    for file_name in sorted(file_names):
        name, extension = split_name(file_name)
        owner = _owner(name, members)
        if owner is None:
            return "an output file belongs to no single series of the group"
        index, rest = owner
        renames[index].append((file_name, f"{members[index].stem}{rest}{extension}"))
    return tuple(
        MemberOutputs(tuple(renames[i]), "\n".join([f"Found {m.files} DICOM file(s)", *lines[i], ""]))
        for i, m in enumerate(members)
    )


def _refusal(exit_code: int, console: str, report: ConsoleReport, members: Sequence[GroupMember]) -> str:
    if len({m.uid for m in members}) != len(members):
        return "two series of the group share a SeriesInstanceUID"
    if exit_code != 0:
        return f"dcm2niix exited with {exit_code}"
    if console_warnings(console, limit=1):
        return "dcm2niix printed a warning or an error"
    if report.unsupported_syntaxes:
        return "dcm2niix skipped files in a transfer syntax it cannot read"
    expected = sum(m.files for m in members)
    if report.found != expected:
        return f"dcm2niix listed {report.found} DICOM files, the group has {expected}"
    return ""


def _owner(name: str, members: Sequence[GroupMember]) -> tuple[int, str] | None:
    """(member index, the rest of the name after its UID), if exactly one member can own `name`."""
    owners = [
        (index, name[len(member.uid) :])
        for index, member in enumerate(members)
        if name.startswith(member.uid) and (name == member.uid or name[len(member.uid)] not in _NOT_A_SUFFIX_START)
    ]
    if len(owners) != 1 or not _SUFFIX.fullmatch(owners[0][1]):
        return None
    return owners[0]


# What dcm2niix appends to a name: its own suffixes (`_e2`, `_ph`, `_ROI1`, `_Eq_1`...) and clash letters.
_SUFFIX = re.compile(r"[A-Za-z0-9_]*")
