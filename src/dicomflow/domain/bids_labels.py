"""Subject and session labels for `--layout bids`, and where each one comes from.

In order of precedence, per series (issue 14):
1. source folders already named `sub-<label>` (and `ses-<label>` below it);
2. `--subject LABEL [--session LABEL]`, for a source that holds one subject;
3. a mapping file (`--subjects FILE`): CSV rows `source folder,subject[,session]`, the deepest listed
   folder containing the series wins.
A `ses-<label>` folder names the session whichever way the subject was found. Labels are never taken
from PatientName or PatientID (DESIGN.md invariant 6): those are identifiers, and dicomflow does not
read them. A label must be letters and digits only (BIDS Common principles, "Entities": a label is
alphanumeric), so a bad one is an error at submission, not a dataset the validator rejects later.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from dicomflow.domain import bids_schema as schema
from dicomflow.domain.bids_rules import BidsConfigError
from dicomflow.domain.paths import decode_component, split

_SUB: Final = re.compile(r"sub-(.*)", re.DOTALL)
_SES: Final = re.compile(r"ses-(.*)", re.DOTALL)
_HEADER_WORDS: Final = frozenset({"folder", "source", "source_folder", "path", "directory"})


def validate_label(kind: str, value: str, *, field: str, where: str = "") -> str:
    """`value` if it is a valid BIDS label; a `sub-`/`ses-` prefix is accepted and removed."""
    prefix = f"{kind}-"
    label = value[len(prefix) :] if value.startswith(prefix) else value
    if not schema.LABEL_PATTERN.fullmatch(label):
        noun = "subject" if kind == "sub" else "session"
        raise BidsConfigError(
            f"invalid {noun} label {value!r}{where}: BIDS labels are letters and digits only (e.g. 01, ctrl07, pre)",
            field=field,
        )
    return label


@dataclass(frozen=True, slots=True)
class Labels:
    subject: str
    session: str | None = None


@dataclass(frozen=True, slots=True)
class LabelPolicy:
    """Where labels come from when source folders are not named `sub-<label>`."""

    subject: str | None = None
    session: str | None = None
    mapping: Mapping[str, Labels] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.subject is not None:
            object.__setattr__(self, "subject", validate_label("sub", self.subject, field="subject"))
        if self.session is not None:
            if self.subject is None:
                raise BidsConfigError("--session needs --subject", field="session")
            object.__setattr__(self, "session", validate_label("ses", self.session, field="session"))


def parse_subjects_csv(text: str) -> dict[str, Labels]:
    """Read a `--subjects` mapping file: `source folder,subject[,session]` per row, an optional header.

    Folders are relative to the source root, '/'-separated. Errors name the line.
    """
    mapping: dict[str, Labels] = {}
    reader = csv.reader(io.StringIO(text))
    rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    if rows and rows[0][1][0].strip().lower() in _HEADER_WORDS:
        rows = rows[1:]
    for line_no, row in rows:  # the line of the file, as an editor numbers it
        where = f"subjects line {line_no}"
        cells = [cell.strip() for cell in row]
        if len(cells) not in (2, 3) or not cells[0] or not cells[1]:
            raise BidsConfigError(
                f"{where}: expected `source folder,subject[,session]`, got {len(cells)} column(s)", field="subjects"
            )
        folder = normalise_folder(cells[0])
        if folder in mapping:
            raise BidsConfigError(f"{where}: the folder {cells[0]!r} is listed twice", field="subjects")
        subject = validate_label("sub", cells[1], field=f"{where}, subject")
        session = validate_label("ses", cells[2], field=f"{where}, session") if len(cells) == 3 and cells[2] else None
        mapping[folder] = Labels(subject, session)
    return mapping


def normalise_folder(folder: str) -> str:
    """A mapped folder as it is matched: '/'-separated, no empty, '.' or trailing parts."""
    parts = [p for p in folder.replace("\\", "/").split("/") if p and p != "."]
    return "/".join(parts)


def labels_for(rel_dir: str, policy: LabelPolicy) -> Labels | None:
    """The labels of a series whose files sit in `rel_dir` (an encoded source path), or None when nothing
    gives it a subject. Raises `BidsConfigError` for a `sub-`/`ses-` folder whose label is invalid, unless
    the flags or the mapping file supply that label instead."""
    names = [decode_component(c) for c in split(rel_dir)]
    return source_labels(names, names, policy)


def source_labels(raw: Sequence[str], shown: Sequence[str], policy: LabelPolicy) -> Labels | None:
    """`labels_for` at expansion, where the series' source folders are known by name (`raw`, decoded,
    root first) and as dicomflow may show them (`shown`: the same folders scrubbed of the series'
    identifiers, docs/privacy.md; equal to `raw` where nothing was scrubbed). A `sub-`/`ses-` folder whose
    name carries one of the patient's identifiers (a name, an ID, a date) is refused like an invalid
    label: dicomflow never writes identifiers into file names. Errors name folders by `shown` only."""
    found: dict[str, str] = {}
    invalid: dict[str, BidsConfigError] = {}
    for name, visible in zip(raw, [*shown, *raw[len(shown) :]], strict=False):
        for kind, pattern in (("sub", _SUB), ("ses", _SES)):
            m = pattern.fullmatch(name)
            if not m or kind in found or kind in invalid:
                continue
            where = f"source folder {visible!r}"
            if visible != name:
                noun = "subject" if kind == "sub" else "session"
                invalid[kind] = BidsConfigError(
                    f"the {where} would take its {noun} label from the patient's identifiers (a name, an ID "
                    "or a date), which dicomflow never writes into file names",
                    field=where,
                )
                continue
            try:
                found[kind] = validate_label(kind, m.group(1), field=where, where=f" in the {where}")
            except BidsConfigError as exc:
                invalid[kind] = exc
    fallback = _fallback(list(raw), policy)
    subject = found.get("sub") or (fallback.subject if fallback else None)
    if subject is None:
        if "sub" in invalid:
            raise invalid["sub"]
        return None
    session = found.get("ses") or (fallback.session if fallback else None)
    if session is None and "ses" in invalid:
        raise invalid["ses"]
    return Labels(subject, session)


def _fallback(names: list[str], policy: LabelPolicy) -> Labels | None:
    if policy.subject is not None:
        return Labels(policy.subject, policy.session)
    for depth in range(len(names), -1, -1):
        mapped = policy.mapping.get("/".join(names[:depth]))
        if mapped is not None:
            return mapped
    return None


def check_labels(rel_dirs: Iterable[str], policy: LabelPolicy) -> None:
    """Fail fast (at submission or expansion) on every folder whose `sub-`/`ses-` name is not a valid
    label, listing them all, so a user fixes them at once instead of one batch at a time."""
    folders = {rel_dir: [decode_component(c) for c in split(rel_dir)] for rel_dir in set(rel_dirs)}
    labels_of_series({k: (v, v) for k, v in folders.items()}, policy)


def labels_of_series(
    folders: Mapping[str, tuple[Sequence[str], Sequence[str]]], policy: LabelPolicy
) -> dict[str, Labels | None]:
    """`source_labels` for every series (key → (raw folder names, shown folder names)); every bad folder
    is reported in one error."""
    result: dict[str, Labels | None] = {}
    bad: set[str] = set()
    reasons: list[str] = []
    for key in sorted(folders):
        raw, shown = folders[key]
        try:
            result[key] = source_labels(raw, shown, policy)
        except BidsConfigError as exc:
            if exc.field not in bad:
                reasons.append(exc.reason)
            bad.add(exc.field)
    if bad:
        shown_fields = ", ".join(sorted(bad)[:10])
        raise BidsConfigError(
            f"folder names that look like BIDS labels but cannot be used (letters and digits only after sub-/ses-, "
            f"and no patient identifiers): {shown_fields}. Rename them, or use --subjects to map folders to labels. "
            f"First problem: {reasons[0]}",
            field="source",
        )
    return result
