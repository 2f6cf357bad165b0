"""How a batch lays out its outputs: a mirror of the source folders (the default) or a BIDS dataset.

A `Layout` is part of the batch request (CLI `--layout bids`, the batch API's `layout`, a watch's
options) and is recorded on the batch. It is validated whole when it is built, so a bad label, mapping
row or rule is refused at submission with the field at fault, before anything is converted.

The subjects mapping (`--subjects FILE`: source folder → subject[, session]) names source folders, and
source folder names may carry a patient's name or a record number (docs/privacy.md). The layout keeps
only a SHA-256 of each normalised folder path: expansion hashes the folders of every series the same
way and looks them up, and no folder name is stored with the batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from dicomflow.domain.bids import FieldmapStyle, LayoutOptions
from dicomflow.domain.bids_labels import LabelPolicy, Labels, normalise_folder, validate_label
from dicomflow.domain.bids_rules import BidsConfigError, Rule, rules_from_data

MIRROR: Final = "mirror"
BIDS: Final = "bids"
KINDS: Final = (MIRROR, BIDS)
FIELDMAP_STYLES: Final = ("intended_for", "b0field", "both")


def folder_key(folder: str) -> str:
    """What the layout keeps of a mapped source folder: the SHA-256 of its normalised path."""
    return hashlib.sha256(normalise_folder(folder).encode()).hexdigest()


class _HashedFolders(Mapping[str, Labels]):
    """The subjects mapping as `labels_for` reads it (folder path → labels), answered from digests."""

    def __init__(self, rows: Sequence[tuple[str, str, str | None]]) -> None:
        self._labels = {digest: Labels(subject, session) for digest, subject, session in rows}

    def __getitem__(self, folder: str) -> Labels:
        return self._labels[folder_key(folder)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels)  # digests: the folder names themselves are not kept

    def __len__(self) -> int:
        return len(self._labels)


@dataclass(frozen=True, slots=True)
class Layout:
    """`kind` is mirror or bids; the other fields apply to bids only.

    `subjects` holds (folder digest, subject, session or None) rows, sorted; `rules` the rules document
    as canonical JSON ("" = no rules file)."""

    kind: str = MIRROR
    subject: str | None = None
    session: str | None = None
    subjects: tuple[tuple[str, str, str | None], ...] = ()
    rules: str = ""
    fieldmaps: str = "intended_for"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BidsConfigError(f"layout must be one of {', '.join(KINDS)}, not {self.kind!r}", field="layout")
        if self.kind == MIRROR and (self.subject or self.session or self.subjects or self.rules):
            raise BidsConfigError(
                "--subject, --session, --subjects and --rules apply to --layout bids only", field="layout"
            )
        if self.fieldmaps not in FIELDMAP_STYLES:
            raise BidsConfigError(
                f"fieldmaps must be one of {', '.join(FIELDMAP_STYLES)}, not {self.fieldmaps!r}", field="fieldmaps"
            )
        if self.subject is not None and self.subjects:
            raise BidsConfigError(
                "give either --subject (a source holding one subject) or --subjects (a mapping file), not both",
                field="subjects",
            )
        self.policy()  # validates the labels (a session needs a subject)
        if self.rules:
            self.parsed_rules()

    # --- building ---------------------------------------------------------------------------------------

    @classmethod
    def bids(
        cls,
        *,
        subject: str | None = None,
        session: str | None = None,
        subjects: Mapping[str, Labels] | None = None,
        rules: object = None,
        fieldmaps: str = "intended_for",
    ) -> Layout:
        """A BIDS layout from what a user gives: labels, a parsed subjects mapping (folder → labels) and
        the rules document (the parsed JSON/TOML object). Raises BidsConfigError naming the field."""
        rows = tuple(
            sorted((folder_key(folder), labels.subject, labels.session) for folder, labels in (subjects or {}).items())
        )
        text = ""
        if rules is not None:
            rules_from_data(rules)  # validated before anything is kept
            text = json.dumps(rules, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return cls(BIDS, subject, session, rows, text, fieldmaps)

    # --- reading ----------------------------------------------------------------------------------------

    @property
    def is_bids(self) -> bool:
        return self.kind == BIDS

    def policy(self) -> LabelPolicy:
        return LabelPolicy(self.subject, self.session, _HashedFolders(self.subjects))

    def parsed_rules(self) -> tuple[Rule, ...]:
        return rules_from_data(json.loads(self.rules)) if self.rules else ()

    def options(self) -> LayoutOptions:
        style: FieldmapStyle = "intended_for"
        if self.fieldmaps == "b0field":
            style = "b0field"
        elif self.fieldmaps == "both":
            style = "both"
        return LayoutOptions(fieldmaps=style)

    def summary(self) -> dict[str, Any]:
        """What the API and the CLI show of the layout (never the mapped folders)."""
        data: dict[str, Any] = {"kind": self.kind}
        if self.is_bids:
            data |= {
                "subject": self.subject,
                "session": self.session,
                "subjects": len(self.subjects),
                "rules": [rule.id for rule in self.parsed_rules()],
                "fieldmaps": self.fieldmaps,
            }
        return data

    # --- storing ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        if not self.is_bids:
            return {"kind": self.kind}
        return {
            "kind": self.kind,
            "subject": self.subject,
            "session": self.session,
            "subjects": [{"folder": f, "subject": sub, "session": ses} for f, sub, ses in self.subjects],
            "rules": self.rules,
            "fieldmaps": self.fieldmaps,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Layout:
        if not data:
            return cls()
        return cls(
            kind=str(data.get("kind", MIRROR)),
            subject=_opt(data.get("subject")),
            session=_opt(data.get("session")),
            subjects=tuple(
                (str(row["folder"]), str(row["subject"]), _opt(row.get("session")))
                for row in data.get("subjects") or ()
            ),
            rules=str(data.get("rules") or ""),
            fieldmaps=str(data.get("fieldmaps") or "intended_for"),
        )

    def canonical(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _opt(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def subjects_from_rows(rows: object, *, field: str = "subjects") -> dict[str, Labels]:
    """The subjects mapping as the batch API takes it: a list of {folder, subject, session?} objects.
    Errors name the row and the key (`layout.subjects[2].subject`)."""
    if not isinstance(rows, list):
        raise BidsConfigError("must be a list of {folder, subject, session} objects", field=field)
    mapping: dict[str, Labels] = {}
    for n, row in enumerate(rows):
        where = f"{field}[{n}]"
        if not isinstance(row, dict) or not set(row) <= {"folder", "subject", "session"}:
            raise BidsConfigError("must be an object with folder, subject and optionally session", field=where)
        folder, subject, session = row.get("folder"), row.get("subject"), row.get("session")
        if not isinstance(folder, str) or not normalise_folder(folder):
            raise BidsConfigError("must be a folder path relative to the source", field=f"{where}.folder")
        if not isinstance(subject, str):
            raise BidsConfigError("must be a label (letters and digits)", field=f"{where}.subject")
        if session is not None and not isinstance(session, str):
            raise BidsConfigError("must be a label (letters and digits)", field=f"{where}.session")
        key = normalise_folder(folder)
        if key in mapping:
            raise BidsConfigError("this folder is listed twice", field=f"{where}.folder")
        mapping[key] = Labels(
            validate_label("sub", subject, field=f"{where}.subject"),
            validate_label("ses", session, field=f"{where}.session") if session else None,
        )
    return mapping


_API_KEYS: Final = ("kind", "subject", "session", "subjects", "rules", "fieldmaps")


def layout_from_json(raw: object, *, field: str = "layout") -> Layout:
    """The batch API's (and a watch's) `layout` object: {"kind": "bids", "subject": "01", "session": "pre",
    "subjects": [{"folder": ..., "subject": ..., "session": ...}], "rules": [rule, ...], "fieldmaps": ...}.
    Errors name the field inside it (`layout.rules[1].match.SeriesDescription.regex`)."""
    if raw is None:
        return Layout()
    if not isinstance(raw, dict):
        raise BidsConfigError('must be an object such as {"kind": "bids"}', field=field)
    unknown = sorted(set(raw) - set(_API_KEYS))
    if unknown:
        raise BidsConfigError(
            f"unknown key {unknown[0]!r}; allowed: {', '.join(_API_KEYS)}", field=f"{field}.{unknown[0]}"
        )
    kind = raw.get("kind", MIRROR)
    if kind not in KINDS:
        raise BidsConfigError(f"must be one of {', '.join(KINDS)}", field=f"{field}.kind")
    for name in ("subject", "session", "fieldmaps"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise BidsConfigError("must be a string", field=f"{field}.{name}")
    if kind == MIRROR:
        extra = [k for k in _API_KEYS[1:] if raw.get(k) not in (None, [], "")]
        if extra:
            raise BidsConfigError(f"{extra[0]} applies to the bids layout only", field=f"{field}.{extra[0]}")
        return Layout()
    rules = raw.get("rules")
    if rules is not None and not isinstance(rules, list):
        raise BidsConfigError("must be a list of rules (docs/bids.md)", field=f"{field}.rules")
    try:
        return Layout.bids(
            subject=raw.get("subject"),
            session=raw.get("session"),
            subjects=subjects_from_rows(raw["subjects"], field="subjects") if raw.get("subjects") is not None else None,
            rules={"rules": rules} if rules is not None else None,
            fieldmaps=raw.get("fieldmaps") or "intended_for",
        )
    except BidsConfigError as exc:
        raise BidsConfigError(exc.reason, field=f"{field}.{exc.field}" if exc.field else field) from None
