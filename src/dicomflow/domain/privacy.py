"""The de-identification profile applied to everything dicomflow writes or reports (docs/privacy.md).

Grounded in DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile, Table E.1-1, with
the Clean Descriptors Option for SeriesDescription and ProtocolName) and HIPAA Safe Harbor
(45 CFR 164.514(b)(2)). Pure: the identifying values of a series come in as a mapping of raw header
strings (built by the fast header scanner or by `adapters/dicom_identifiers.py`), never as a pydicom
dataset, and they are never stored: an `Identifiers` lives in memory while one series is named or
converted.

Three things are decided here:

* free text (SeriesDescription, ProtocolName, folder names) loses exactly the tokens that match an
  identifier of the same header, and anything shaped like a date, a time of day or a long digit run
  (`scrub_text`); the rest is kept so `ep2d_DTI_20_dir_AP` keeps its meaning;
* output names: `series_stem` (file names), and for mirrored folders `scrub_dirs` (per series, at scan
  time) + `merge_dirs` (over the batch) or `scrub_rel_dirs` (both in one process);
* JSON sidecars go through an allow-list of dcm2niix keys (`filter_sidecar`).
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "ALWAYS_DROPPED_SIDECAR_KEYS",
    "DEFAULT_SIDECAR_KEYS",
    "FREE_TEXT_SIDECAR_KEYS",
    "IDENTIFIER_KEYS",
    "DirScrub",
    "Identifiers",
    "destination_dir",
    "filter_sidecar",
    "is_always_dropped",
    "merge_dirs",
    "parse_extra_keys",
    "scrub_dirs",
    "scrub_path_component",
    "scrub_rel_dirs",
    "scrub_text",
    "series_stem",
]

# ------------------------------------------------------------------------------------ identifiers

# The keys `Identifiers.from_values` reads, with the DICOM attribute each one holds and its role. The fast
# header scanner (adapters/dicom_fastscan.WANTED) and adapters/dicom_identifiers.py use the same names.
# Every attribute is one PS3.15 Table E.1-1 removes (X), empties (Z) or replaces (D) in the Basic Profile.
PERSON_KEYS: Final = {
    "patient_name": "(0010,0010) PatientName",  # Z; HIPAA (A) names
    "other_patient_names": "(0010,1001) OtherPatientNames",  # X
    "patient_birth_name": "(0010,1005) PatientBirthName",  # X
    "patient_mother_birth_name": "(0010,1060) PatientMotherBirthName",  # X; HIPAA: names of relatives
    "referring_physician_name": "(0008,0090) ReferringPhysicianName",  # Z
    "performing_physician_name": "(0008,1050) PerformingPhysicianName",  # X
    "operators_name": "(0008,1070) OperatorsName",  # X/Z/D
    "physicians_of_record": "(0008,1048) PhysiciansOfRecord",  # X
    "name_of_physicians_reading_study": "(0008,1060) NameOfPhysiciansReadingStudy",  # X
    "requesting_physician": "(0032,1032) RequestingPhysician",  # X
}
ID_KEYS: Final = {
    "patient_id": "(0010,0020) PatientID",  # Z; HIPAA (H) medical record numbers
    "other_patient_ids": "(0010,1000) OtherPatientIDs",  # X
    "accession_number": "(0008,0050) AccessionNumber",  # Z; HIPAA (R) any other unique identifying number
    "study_id": "(0020,0010) StudyID",  # Z
    "device_serial_number": "(0018,1000) DeviceSerialNumber",  # X/Z/D; HIPAA (M) device serial numbers
}
PLACE_KEYS: Final = {
    "institution_name": "(0008,0080) InstitutionName",  # X/Z/D
    "institution_address": "(0008,0081) InstitutionAddress",  # X; HIPAA (B) geographic subdivisions
    "institutional_department_name": "(0008,1040) InstitutionalDepartmentName",  # X
    "station_name": "(0008,1010) StationName",  # X/Z/D
}
DATE_KEYS: Final = {
    "patient_birth_date": "(0010,0030) PatientBirthDate",  # Z; HIPAA (C) all elements of dates but the year
    "study_date": "(0008,0020) StudyDate",  # Z
    "series_date": "(0008,0021) SeriesDate",  # X/D
    "acquisition_date": "(0008,0022) AcquisitionDate",  # X/Z
    "content_date": "(0008,0023) ContentDate",  # Z/D
}
IDENTIFIER_KEYS: Final = {**PERSON_KEYS, **ID_KEYS, **PLACE_KEYS, **DATE_KEYS}


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words of institution names, departments, addresses and station names that identify nobody on their own.
# Only these are spared when a place's words are scrubbed one by one (the whole name is still removed
# where its words follow one another); people's names have no such list: every part of a name counts.
_GENERIC_PLACE_WORDS: Final = _word_set(
    """
    hospital hospitals hopital hospitalier klinik klinikum kliniken clinic clinics clinique clinica clinical
    university universitat universitaet universite universidad universita univ college school faculty
    medical medicine medizin medicina center centre centrum centro zentrum institute institut instituto
    department dept abteilung service services radiology radiologie radiologia neuroradiology neuroimaging
    imaging diagnostic diagnostics research health healthcare care general national regional county city
    children childrens memorial foundation trust nhs saint sainte san santa street str strasse road avenue
    ave lane drive way plaza boulevard blvd suite floor building campus unit lab laboratory main north south
    east west new the and for und der die das des de la le les du di del mri mr ct pet scanner console host
    neuro neurology neurosurgery neuroscience neurosciences cardio cardiology oncology pediatric pediatrics
    paediatric paediatrics emergency orthopedics orthopaedics surgery internal nuclear body head brain spine
    """
)
_TOKEN: Final = re.compile(r"[^\W_]+")  # letters and digits of any script; "_" separates like "-" does
_LETTERS: Final = re.compile(r"[^\W\d_]+")
_PN_COMPONENTS_KEPT: Final = 3  # PS3.5 6.2: family^given^middle^prefix^suffix; "Dr."/"Jr." identify nobody
_MIN_FRAGMENT: Final = 4  # IDs this long are removed even inside a longer token ("MRN12345678x")
_MIN_NAME_RUN: Final = 3  # name parts this long are removed even glued to other letters ("T1Smith")


def _fold(text: str) -> str:
    """Comparison form: accents dropped (NFKD), case folded, so "Müller" matches "MULLER"."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _words(text: str) -> list[str]:
    return [_fold(w) for w in _TOKEN.findall(text)]


def _values(raw: str) -> list[str]:
    """A DICOM multi-valued string: values separated by a backslash (PS3.5 6.4)."""
    return [v.strip() for v in raw.split("\\") if v.strip()]


@dataclass(frozen=True, slots=True, repr=False)
class Identifiers:
    """What identifies the people, places and dates of one series, in the form `scrub_text` matches.

    Built with `from_values`; combine several with `union` (the values of a series' first and last
    files, when an operator or station changed mid-series). The repr never shows the values, so an
    Identifiers that slips into a log line or an exception message leaks nothing.
    """

    # a token (a run of letters and digits) equal to one of these is removed
    words: frozenset[str] = field(default_factory=frozenset)
    # alphabetic parts of people's names: removed inside a token where a run of letters is one part of 3+
    # letters, or is made of several parts and initials ("T1Smith", "JohnSmith", "JSmith")
    name_parts: frozenset[str] = field(default_factory=frozenset)
    # IDs (4+ characters): removed wherever they occur inside a token
    fragments: frozenset[str] = field(default_factory=frozenset)
    # multi-word values (institution names, addresses): removed where their words follow one another
    phrases: frozenset[tuple[str, ...]] = field(default_factory=frozenset)
    # (year, month, day) of the header's dates: their day-month forms are removed too ("0131", "31.01")
    dates: frozenset[tuple[int, int, int]] = field(default_factory=frozenset)

    def __repr__(self) -> str:
        count = len(self.words) + len(self.fragments) + len(self.phrases) + len(self.dates)
        return f"Identifiers(<{count} values withheld>)"

    def __bool__(self) -> bool:
        return bool(self.words or self.name_parts or self.fragments or self.phrases or self.dates)

    @classmethod
    def from_values(cls, values: Mapping[str, str]) -> Identifiers:
        """Identifiers from raw header strings keyed as in IDENTIFIER_KEYS (other keys are ignored:
        series_description, protocol_name and study_description are the text to scrub, not identifiers).

        Raw means as stored: person names with `^` between components and `=` between representations,
        several values separated by `\\`, dates as YYYYMMDD.
        """
        words: set[str] = set()
        name_parts: set[str] = set()
        fragments: set[str] = set()
        phrases: set[tuple[str, ...]] = set()
        dates: set[tuple[int, int, int]] = set()
        for key, raw in values.items():
            if not raw or not raw.strip():
                continue
            if key in PERSON_KEYS:
                _add_person(raw, words, name_parts)
            elif key in ID_KEYS:
                _add_ids(raw, words, fragments)
            elif key in PLACE_KEYS:
                _add_place(raw, words, phrases)
            elif key in DATE_KEYS:
                dates.update(d for d in (_parse_date(v) for v in _values(raw)) if d is not None)
        return cls(frozenset(words), frozenset(name_parts), frozenset(fragments), frozenset(phrases), frozenset(dates))

    def union(self, *others: Identifiers) -> Identifiers:
        return Identifiers(
            self.words.union(*(o.words for o in others)),
            self.name_parts.union(*(o.name_parts for o in others)),
            self.fragments.union(*(o.fragments for o in others)),
            self.phrases.union(*(o.phrases for o in others)),
            self.dates.union(*(o.dates for o in others)),
        )


def _add_person(raw: str, words: set[str], name_parts: set[str]) -> None:
    """Every part of a person's name, of any length (a two-letter family name is still a name; HIPAA (A)),
    and each component with its pieces glued ("O'Brien" typed "OBrien"). Parts glued to each other
    ("JohnSmith") are found by `_is_name_run`."""
    for value in _values(raw):
        for group in value.split("="):  # alphabetic = ideographic = phonetic representations
            components = group.split("^")[:_PN_COMPONENTS_KEPT]
            parts: list[str] = []
            for component in components:
                pieces = _words(component)
                parts.extend(pieces)
                if len(pieces) > 1:
                    words.add("".join(pieces))  # "O'Brien" typed as "OBrien", "Smith-Jones" as "SmithJones"
            words.update(parts)
            name_parts.update(p for p in parts if p.isalpha())


def _add_ids(raw: str, words: set[str], fragments: set[str]) -> None:
    """IDs are removed as whole tokens, their parts as tokens ("AB-1234" typed "AB_1234"), and, from
    4 characters on, wherever they appear inside a token. A purely numeric ID of 1-2 digits (StudyID is
    often "1") is skipped: it identifies nobody and equals ordinary numbering such as "run_1"."""
    for value in _values(raw):
        pieces = _words(value)
        squashed = "".join(pieces)
        if not squashed or (squashed.isdigit() and len(squashed) <= 2):
            continue
        words.add(squashed)
        if len(squashed) >= _MIN_FRAGMENT:
            fragments.add(squashed)
        for piece in pieces:
            # letter/digit runs of the ID: "ab1234" -> "ab", "1234"; only runs of 3+ are distinctive
            for run in re.findall(r"[^\W\d_]+|\d+", piece):
                if len(run) >= 3:
                    words.add(run)


def _add_place(raw: str, words: set[str], phrases: set[tuple[str, ...]]) -> None:
    for value in _values(raw):
        for line in re.split(r"[\r\n;]+", value):  # addresses arrive as one line or several
            pieces = _words(line)
            if not pieces:
                continue
            if len(pieces) > 1:
                phrases.add(tuple(pieces))
                words.add("".join(pieces))  # "StMaryHospital"
            words.update(p for p in pieces if len(p) >= 3 and p not in _GENERIC_PLACE_WORDS)


def _parse_date(raw: str) -> tuple[int, int, int] | None:
    """DA is YYYYMMDD; ACR-NEMA files use YYYY.MM.DD."""
    match = re.fullmatch(r"(\d{4})\D?(\d{2})\D?(\d{2})", raw.strip())
    if not match:
        return None
    year, month, day = (int(g) for g in match.groups())
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    return year, month, day


# -------------------------------------------------------------------------------------- scrubbing

_D: Final = r"(?:0?[1-9]|[12][0-9]|3[01])"  # a day (1-31), or a month (1-12) in day-first forms
_M: Final = r"(?:0?[1-9]|1[0-2])"
_Y4: Final = r"(?:1[89][0-9]{2}|2[0-9]{3})"
_Y2: Final = r"[0-9]{2}"
_SEP: Final = r"[-./_ ]"
_SEP2: Final = r"[-./_ ,]{0,2}"
_NOT_DIGIT_BEFORE: Final = r"(?<![0-9])"
_NOT_DIGIT_AFTER: Final = r"(?![0-9])"
# A day or month glued to letters is part of a name ("T1_Jan" is not the 1st of January); a year is not.
_NOT_ALNUM_BEFORE: Final = r"(?<![0-9A-Za-z])"
# "MAR_3mm" and "MAR_2.0" (metal artefact reduction) are not the 3rd or 2nd of March
_END: Final = r"(?![0-9A-Za-z]|[.,][0-9])"
_MON: Final = (
    r"(?<![A-Za-z])(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)(?![A-Za-z])"
)
_TIME: Final = r"(?:[01]?[0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:[.,][0-9]+)?)?"
# HIPAA (C): every element of a date but the year; PS3.15 removes dates and times of day alike.
_DATE_PATTERNS: Final = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        rf"{_NOT_DIGIT_BEFORE}{_Y4}{_SEP}{_M}{_SEP}{_D}(?:[T ]{_TIME})?{_NOT_DIGIT_AFTER}",  # 2024-01-31
        rf"{_NOT_ALNUM_BEFORE}{_D}{_SEP}{_D}{_SEP}{_Y4}{_NOT_DIGIT_AFTER}",  # 31.01.2024, 01/31/2024
        # two-digit years only with the same "-", "." or "/" twice, and not inside a dotted number (UIDs)
        rf"(?<![0-9A-Za-z.]){_D}(?P<s>[-./]){_D}(?P=s){_Y2}(?![0-9]|\.[0-9])",  # 31.01.24, 01/31/24
        rf"{_NOT_ALNUM_BEFORE}{_D}{_SEP2}{_MON}(?:{_SEP2}(?:{_Y4}|{_Y2}))?{_END}",  # 31-Jan-2024, 31JAN24
        rf"{_MON}{_SEP2}{_D}(?:{_SEP2}(?:{_Y4}|{_Y2}))?{_END}",  # Jan-31-2024, Jan 31
        rf"{_MON}{_SEP2}{_Y4}{_END}",  # January 2024
        rf"{_NOT_DIGIT_BEFORE}{_Y4}{_SEP2}{_MON}(?:{_SEP2}{_D})?{_END}",  # 2024-Jan-31
        rf"{_NOT_DIGIT_BEFORE}{_TIME}{_NOT_DIGIT_AFTER}",  # 09:31, 09:31:00.000
    )
)
# Five digits or more. Scanner descriptions use up to four (b1000, b3000, TR2000, 1024 matrices, a year),
# while five and more are MRNs, accession numbers, ZIP codes (HIPAA (B)), phone numbers and compact dates
# (YYMMDD, YYYYMMDD, HHMMSS). The price: a five-digit b-value ("b10000") loses its number.
_LONG_DIGITS: Final = re.compile(r"[0-9]{5,}")
_DAY_MONTH: Final = re.compile(rf"{_NOT_ALNUM_BEFORE}([0-9]{{1,2}})[-./]([0-9]{{1,2}}){_END}")
_FOUR_DIGITS: Final = re.compile(rf"{_NOT_DIGIT_BEFORE}[0-9]{{4}}{_END}")


_Marker = Callable[[int, int], None]  # marks text[start:end] as removed


def scrub_text(text: str, identifiers: Identifiers, *, patterns: bool = True) -> str:
    """`text` without the tokens that match `identifiers`, and without dates, times and long digit runs.

    A token is a run of letters and digits; everything else (`_`, `-`, spaces, dots) separates tokens.
    Removed, case- and accent-insensitively:

    * a token equal to a part of a person's name (any length: "Li", "Wu", "J"), to an ID or a part of it
      (3+ characters), or to a distinctive word of the institution, department, address or station;
    * inside a token, letters between changes of case or next to digits that are a name part of 3+
      letters, or several name parts and initials one of which has 3+ letters ("T1Smith" -> "T1",
      "JohnSmith", "JSmith", "QUIXLEYep2d" -> "ep2d");
    * an ID of 4+ characters anywhere inside a token ("MRN12345678" loses the ID);
    * a multi-word institution, department, address or station name where its words follow one another;
    * with `patterns` (the default): anything shaped like a date (20240131 and 240131 as digit runs;
      2024-01-31, 31.01.2024, 01/31/2024, 31.01.24, Jan-31-2024, 31JAN2024, January 2024, 2024-Jan-31),
      a time of day (09:31), a run of 5+ digits, and the day and month of the header's own dates
      ("0131", "31.01"). Without it only identifier tokens go (for values a site chose to keep).

    The rest is kept as it was, separators included; where tokens were removed, the separators around
    them collapse to one. Text in which nothing matches comes back unchanged. The trade-off: a token
    equal to a name part IS removed from this series' text even when it is also an ordinary word (a
    phantom named "fMRI" turns its own "fMRI_rest_PA" into "rest_PA"); other series are scrubbed with
    their own identifiers and keep theirs.
    """
    # Removing a token joins its neighbours, which can form a new match ("2024_SMITH_01_31" becomes the
    # date "2024_01_31"): passes repeat until nothing changes. Each pass only removes, so this ends.
    while True:
        scrubbed = _scrub_once(text, identifiers, patterns=patterns)
        if scrubbed == text:
            return scrubbed
        text = scrubbed


def _scrub_once(text: str, identifiers: Identifiers, *, patterns: bool) -> str:
    if not text:
        return text
    removed = bytearray(len(text))

    def mark(start: int, end: int) -> None:
        removed[start:end] = b"\x01" * (end - start)

    if patterns:
        for pattern in (*_DATE_PATTERNS, _LONG_DIGITS):
            for m in pattern.finditer(text):
                mark(m.start(), m.end())
        if identifiers.dates:
            _mark_known_dates(text, identifiers.dates, mark)
    tokens = [(m.start(), m.end(), _fold(m.group())) for m in _TOKEN.finditer(text)]
    for start, end, _ in tokens:
        _mark_token(start, end, text[start:end], identifiers, mark)
    if identifiers.phrases:
        _mark_phrases(tokens, identifiers.phrases, mark)
    return _rebuild(text, removed)


def _mark_known_dates(text: str, dates: frozenset[tuple[int, int, int]], mark: _Marker) -> None:
    day_months = {(d, m) for _, m, d in dates} | {(m, d) for _, m, d in dates}
    compact = {f"{m:02d}{d:02d}" for _, m, d in dates} | {f"{d:02d}{m:02d}" for _, m, d in dates}
    for m in _DAY_MONTH.finditer(text):
        if (int(m.group(1)), int(m.group(2))) in day_months:
            mark(m.start(), m.end())
    for m in _FOUR_DIGITS.finditer(text):
        if m.group() in compact:
            mark(m.start(), m.end())


def _mark_token(start: int, end: int, token: str, identifiers: Identifiers, mark: _Marker) -> None:
    folded = _fold(token)
    if folded in identifiers.words:
        mark(start, end)
        return
    # Offsets inside the folded token map back to the text only when folding kept the length ("ß" -> "ss"
    # does not); otherwise a match inside the token removes the whole token.
    aligned = len(folded) == end - start
    for fragment in identifiers.fragments:
        for hit in re.finditer(re.escape(fragment), folded):
            if aligned:
                mark(start + hit.start(), start + hit.end())
            else:
                mark(start, end)
    if identifiers.name_parts:
        for run in _LETTERS.finditer(token):
            _mark_name_runs(start + run.start(), run.group(), identifiers.name_parts, mark)


def _mark_name_runs(start: int, letters: str, parts: frozenset[str], mark: _Marker) -> None:
    """Names glued to other words inside a run of letters, cut where the case changes: "JohnSmith",
    "QUIXLEYep", "ZoranEPI" all hold a name between two case changes. A name glued in one case to a
    word in the same case ("smithbold") is not found: cutting anywhere would also cut "Field" out of
    "fieldmap" for a patient named Field."""
    cuts = [0, *(i for i in range(1, len(letters)) if letters[i].isupper() != letters[i - 1].isupper()), len(letters)]
    for i, a in enumerate(cuts):
        for b in cuts[i + 1 :]:
            if _is_name_run(_fold(letters[a:b]), parts):
                mark(start + a, start + b)


def _is_name_run(run: str, parts: frozenset[str]) -> bool:
    """`run` (letters only) is one name part of 3+ letters, or splits into name parts and initials with at
    least one part of 3+ letters. Short parts alone stay: the initial "T" never touches "T1"."""
    if run in parts:
        return len(run) >= _MIN_NAME_RUN
    pieces = parts | {p[0] for p in parts}
    # reach[i]: run[:i] splits into pieces; long[i]: one of them has 3+ letters
    reach = [True] + [False] * len(run)
    long = [False] * (len(run) + 1)
    for i in range(len(run)):
        if not reach[i]:
            continue
        for piece in pieces:
            if run.startswith(piece, i):
                j = i + len(piece)
                reach[j] = True
                long[j] = long[j] or long[i] or len(piece) >= _MIN_NAME_RUN
    return long[len(run)]


def _mark_phrases(tokens: list[tuple[int, int, str]], phrases: frozenset[tuple[str, ...]], mark: _Marker) -> None:
    folds = [folded for _, _, folded in tokens]
    for phrase in phrases:
        size = len(phrase)
        for i in range(len(folds) - size + 1):
            if tuple(folds[i : i + size]) == phrase:
                mark(tokens[i][0], tokens[i + size - 1][1])


_PIECES: Final = re.compile(r"(?P<token>[^\W_]+)|(?P<sep>[\W_]+)")
_BRACKETS: Final = "()[]{}<>'\"`"


def _rebuild(text: str, removed: bytearray) -> str:
    """Keep what was not removed. Between two kept tokens the original separator stays when nothing was
    removed between them; otherwise the first surviving separator (brackets and quotes stripped, since
    what they enclosed is gone), or "_", joins them. Separators before the first kept token, or after the
    last one, go when something next to them was removed: "(SMITH) T1" -> "T1", "T1 - SMITH" -> "T1"."""
    if not any(removed):
        return text
    out: list[str] = []
    between = ""  # the separators since the last kept token, as they were
    survivors: list[str] = []  # the same separators without removed characters
    removal = False  # something was removed since the last kept token
    for m in _PIECES.finditer(text):
        piece = m.group()
        kept = "".join(ch for i, ch in enumerate(piece, m.start()) if not removed[i])
        if m.lastgroup == "sep":
            removal = removal or kept != piece
            between += piece
            survivors.append(kept)
            continue
        if not kept:
            removal = True
            continue
        if not removal:
            out.append(between)
        elif out:
            joins = (s.strip(_BRACKETS) for s in survivors)
            out.append(next((j for j in joins if j), "_"))
        # A token that lost only part of itself ("MRN12345678_T1" -> "MRN") keeps its separators.
        out.append(kept)
        between, survivors, removal = "", [], False
    if out and not removal:
        out.append(between)
    return "".join(out)


# ------------------------------------------------------------------------------------------ names

_UNSAFE_NAME: Final = re.compile(r"[^A-Za-z0-9_-]+")
STEM_LIMIT: Final = 64


def _ascii_name(text: str) -> str:
    """[A-Za-z0-9_-] only: accents dropped, every other run of characters becomes one "_"."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE_NAME.sub("_", ascii_text)
    return re.sub(r"_{2,}", "_", cleaned).strip("_-")


def _elide(name: str, limit: int) -> str:
    """Shorten to `limit` characters by dropping the middle, so the end survives: acquisition names put
    the phase-encoding direction (_AP/_PA), the run and the echo last. Cuts fall between "_"-separated
    pieces where possible; "__" marks the cut (it cannot occur otherwise: runs of "_" are collapsed)."""
    if len(name) <= limit:
        return name
    pieces = name.split("_")
    tail_budget = limit // 2
    tail: list[str] = []
    for piece in reversed(pieces):
        if len("_".join([piece, *tail])) > tail_budget:
            break
        tail.insert(0, piece)
    tail_text = "_".join(tail) or name[-tail_budget:]
    head_budget = limit - len(tail_text) - 2
    head: list[str] = []
    for piece in pieces:
        if len("_".join([*head, piece])) > head_budget:
            break
        head.append(piece)
    head_text = "_".join(head) or name[:head_budget]
    return f"{head_text}__{tail_text}"


def series_stem(
    series_number: int | None, description: str, modality: str, identifiers: Identifiers, *, limit: int = STEM_LIMIT
) -> str:
    """The output file name of a series (dcm2niix `-f`): `<SeriesNumber>_<description>`.

    The description (SeriesDescription, or ProtocolName when empty) is scrubbed with `scrub_text`, reduced
    to [A-Za-z0-9_-] and, when longer than `limit`, shortened in the middle so `..._dir_AP` keeps `_AP`.
    An empty result falls back to the modality (a coded value, not free text), then to "series".
    """
    if limit < 8:
        raise ValueError("limit must be at least 8 characters")
    name = _ascii_name(scrub_text(description, identifiers)) or _ascii_name(modality) or "series"
    number = str(series_number) if series_number is not None else "x"
    return f"{number}_{_elide(name, limit)}"


_PATH_UNSAFE: Final = re.compile(r"[/\\\x00-\x1f\x7f]+")
_TAG_HEX: Final = 10


def _tag(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:_TAG_HEX]


def scrub_path_component(name: str, identifiers: Identifiers, *, key: bytes) -> str:
    """A source folder name, as it may appear in the destination tree.

    Scrubbed with `scrub_text`; a name in which nothing matched is kept as it was (path separators and
    control characters aside). A name that lost something gets a tag so sibling folders do not merge:
    `exams_SMITH` -> `exams-<tag>`, `SMITH^JOHN` or `20240131` -> `anon-<tag>`. The tag is an HMAC of the
    original name under `key`: the same folder always gets the same name (re-runs and watch mode add to
    it instead of creating a copy), different folders get different names, and without the key nobody
    can test guessed names against it (a plain hash of a name could be reversed with a list of names).
    `key` must be a secret of the destination, never shipped with the outputs.
    """
    if not key:
        raise ValueError("a non-empty pseudonym key is required")
    cleaned = _PATH_UNSAFE.sub("_", name).strip()
    scrubbed = scrub_text(cleaned, identifiers)
    if scrubbed == cleaned and cleaned.strip(".") != "":
        return cleaned
    scrubbed = scrubbed.strip(" ._-")
    tag = _anonymous_tag(name, key)
    return f"{scrubbed}-{tag}" if scrubbed else f"anon-{tag}"


def _anonymous_tag(name: str, key: bytes) -> str:
    # The name's words, not its spelling: "SMITH^JOHN" and "smith john" are one folder.
    return _tag(key, " ".join(_words(name)))


@dataclass(frozen=True, slots=True)
class DirScrub:
    """One folder of a series' source path, as discovery may record it: no source name in clear.

    `folder` identifies the source folder (an HMAC of its path under the key), `name` is its name scrubbed
    with this series' identifiers, `fallback` the name it gets when the series below it disagree.
    """

    folder: str
    name: str
    fallback: str

    def to_dict(self) -> dict[str, str]:
        return {"folder": self.folder, "name": self.name, "fallback": self.fallback}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DirScrub:
        return cls(str(data["folder"]), str(data["name"]), str(data["fallback"]))


def scrub_dirs(rel_dir: str | Sequence[str], identifiers: Identifiers, *, key: bytes) -> tuple[DirScrub, ...]:
    """Every folder of `rel_dir` (POSIX, relative to the source root; or its folder names, when a name may
    itself contain "/", as Drive names can) scrubbed with one series' identifiers: what a scan records, in
    memory while it holds the header, instead of the path."""
    parts = [p for p in rel_dir.strip("/").split("/") if p] if isinstance(rel_dir, str) else list(rel_dir)
    return tuple(
        DirScrub(
            folder=_tag(key, "\x00".join(parts[: depth + 1])),
            name=scrub_path_component(part, identifiers, key=key),
            fallback=f"anon-{_anonymous_tag(part, key)}",
        )
        for depth, part in enumerate(parts)
    )


def merge_dirs(per_series: Iterable[tuple[DirScrub, ...]]) -> dict[str, str]:
    """The destination name of every folder, from the scrubs of ALL series of a batch.

    A folder gets the name its series agree on. When they disagree, it gets its fallback `anon-<tag>`: a
    folder `import_SMITH` holding series of Smith and of Jones is `import-<tag>` for Smith's series but
    `import_SMITH` for Jones' (his identifiers do not know "SMITH"); writing Jones' series under the name
    his scrub left would publish Smith's name. Agreement is safe: a name every series produced contains
    none of their identifiers. Returns {DirScrub.folder: destination name}.
    """
    names: dict[str, set[str]] = defaultdict(set)
    fallbacks: dict[str, str] = {}
    for scrubs in per_series:
        for scrub in scrubs:
            names[scrub.folder].add(scrub.name)
            fallbacks[scrub.folder] = scrub.fallback
    return {folder: next(iter(seen)) if len(seen) == 1 else fallbacks[folder] for folder, seen in names.items()}


def destination_dir(scrubs: tuple[DirScrub, ...], merged: Mapping[str, str]) -> str:
    """The destination folder (POSIX, relative) of a series whose folders scrubbed to `scrubs`."""
    return posixpath.join(*(merged[s.folder] for s in scrubs)) if scrubs else ""


def scrub_rel_dirs(series_dirs: Iterable[tuple[str, Identifiers]], *, key: bytes) -> dict[str, str]:
    """`scrub_dirs` + `merge_dirs` + `destination_dir` in one process: {source folder: destination folder}
    for the folders of a batch's series, each given with its series' identifiers."""
    pairs = list(series_dirs)
    scrubbed: dict[str, list[tuple[DirScrub, ...]]] = {rel_dir.strip("/"): [] for rel_dir, _ in pairs}
    for rel_dir, identifiers in pairs:
        scrubbed[rel_dir.strip("/")].append(scrub_dirs(rel_dir, identifiers, key=key))
    merged = merge_dirs(s for scrubs in scrubbed.values() for s in scrubs)
    return {rel_dir: destination_dir(scrubs[0], merged) for rel_dir, scrubs in sorted(scrubbed.items())}


# --------------------------------------------------------------------------------------- sidecars

# The keys of dcm2niix's BIDS sidecar that analysis needs (every one is a string the pinned dcm2niix
# 1.0.20260724 binary can write; tests/integration/test_privacy_outputs.py checks that): acquisition and
# timing parameters, geometry, phase encoding, slice timing, scanner make, model, software and field
# strength (PS3.15 Table E.1-1 lists none of them), coils, diffusion, ASL, PET, MRS, vendor scaling, and
# dcm2niix's own BidsGuess and version. Nothing else is kept unless a site adds it
# (DICOMFLOW_SIDECAR_EXTRA_KEYS, `parse_extra_keys`).
DEFAULT_SIDECAR_KEYS: Final = _word_set(
    """
    Modality MagneticFieldStrength ImagingFrequency Manufacturer ManufacturersModelName SoftwareVersions
    BodyPart PatientPosition MRAcquisitionType SeriesDescription ProtocolName ScanningSequence SequenceVariant
    ScanOptions PulseSequenceType PulseSequenceName PulseSequenceDetails InternalPulseSequenceName SequenceName
    ImageType ImageTypeText RawImage NonlinearGradientCorrection SeriesNumber AcquisitionNumber
    SliceThickness SpacingBetweenSlices SAR NumberOfAverages AveragesDouble EchoNumber EchoTime EchoTime1
    EchoTime2 RepetitionTime RepetitionTimeExcitation RepetitionTimeInversion RepetitionTimePreparation
    InversionTime FlipAngle VariableFlipAngleFlag PartialFourier PartialFourierDirection PartialFourierEnabled
    BaseResolution ShimSetting TxRefAmp PhaseResolution PhaseOversampling VendorReportedEchoSpacing
    DerivedVendorReportedEchoSpacing EffectiveEchoSpacing EstimatedEffectiveEchoSpacing TotalReadoutTime
    EstimatedTotalReadoutTime AcquisitionMatrixPE ReconMatrixPE BandwidthPerPixelPhaseEncode PixelBandwidth
    DwellTime PhaseEncodingDirection PhaseEncodingAxis PhaseEncodingPolarityGE PhaseEncodingDirectionDisplayed
    PhaseEncodingSteps PhaseEncodingStepsNoPartialFourier PhaseEncodingStepsOutOfPlane FrequencyEncodingSteps
    PercentPhaseFOV PercentSampling SliceTiming MultibandAccelerationFactor ParallelReductionFactorInPlane
    ParallelReductionFactorOutOfPlane ParallelAcquisitionTechnique RefLinesPE CoilCombinationMethod
    MatrixCoilMode ReceiveCoilName ReceiveCoilActiveElements TransmitCoilName CoilString
    ImageOrientationPatientDICOM ImageOrientationText InPlanePhaseEncodingDirectionDICOM AcquisitionVoxelSize
    WaterFatShift SpoilingState SpoilingType MTState DiffusionScheme DiffGradientCyclingGE
    NumberOfDiffusionDirectionGE NumberOfDiffusionT2GE TensorFileNumberGE NumberOfExcitations EchoTrainLength
    Interpolation2D Interpolation3D CompressedSensingFactor DeepLearning MultiEchoShots NumberOfArms
    NumberOfPointsPerArm NumberOfKSpaceTrajectories AcquisitionDuration TriggerDelayTime Quadruped
    XRayExposure XRayTubeCurrent ExposureTime ConvolutionKernel ReconstructionMethod TablePosition
    TracerName TracerRadionuclide InjectedRadioactivity InjectedRadioactivityUnits InjectedVolume
    RadionuclideHalfLife RadionuclidePositronFraction IsotopeHalfLife DecayCorrection DecayCorrectionFactor
    DecayFactor DoseCalibrationFactor Dosage FrameDuration FrameTimesStart FrameReferenceTime
    ImageDecayCorrected ImageDecayCorrectionTime AttenuationCorrection AttenuationCorrectionMethod
    ScatterCorrectionMethod ScatterFraction RandomsCorrectionMethod ReconMethodName ReconMethodParameterLabels
    ReconMethodParameterValues ReconFilterType ReconFilterSize ScanStart Units MolarActivity MolarActivityUnits
    DelayTime
    ArterialSpinLabelingType PostLabelingDelay LabelingDuration BolusDuration M0Type PASLType LabelingDistance
    LabelingPulseAverageGradient LabelingPulseDuration LabelingPulseFlipAngle LabelingPulseMaximumGradient
    InitialPostLabelDelay PostInversionDelay NumRFBlocks RFGap MeanGzx10 PhiAdjust T1 TagDuration
    TagRFFlipAngle TagRFDuration TagRFSeparation TagPlaneDThickness TagPlaneSNormalDTra TagPlaneSPositionDTra
    TagPlaneUlShape MaximumT1Opt
    PhilipsRWVSlope PhilipsRWVIntercept PhilipsRescaleSlope PhilipsRescaleIntercept PhilipsScaleSlope
    UsePhilipsFloatNotDisplayScaling
    ResonantNucleus SpectrometerFrequency SpectralWidth NumberOfSpectralPoints NumberOfTransients
    WaterSuppressed MRSpectroscopyAcquisitionType
    BidsGuess ConversionSoftware ConversionSoftwareVersion
    """
)

# Never kept, whatever a site configures: patient identity and characteristics HIPAA names, people,
# institution and device identity, UIDs, free text Table E.1-1 removes outright (X), and every key naming
# a date (`is_always_dropped`). dcm2niix's `-ba y` already leaves out some of them; the list does not
# rely on that.
ALWAYS_DROPPED_SIDECAR_KEYS: Final = _word_set(
    """
    PatientName PatientID PatientBirthDate PatientAge AccessionNumber StudyID StudyInstanceUID
    SeriesInstanceUID ReferringPhysicianName PerformingPhysicianName OperatorsName InstitutionName
    InstitutionAddress InstitutionalDepartmentName StationName DeviceSerialNumber ImageComments
    StudyDescription ProcedureStepDescription AcquisitionDateTime
    """
)

# Kept keys whose values are free text a technologist can type into: scrubbed like names are. Coded and
# vendor-set values (ImageType, SequenceName, ManufacturersModelName, ...) are kept verbatim: scrubbing
# ImageType ["ORIGINAL", "PRIMARY", "M"] for a patient with the initial "M" would break analysis.
FREE_TEXT_SIDECAR_KEYS: Final = frozenset({"SeriesDescription", "ProtocolName", "PulseSequenceDetails", "BidsGuess"})

_DATE_KEY: Final = re.compile(r"Date(?![a-z])")  # AcquisitionDateTime, PatientBirthDate; not "Validated"
_KEY_SYNTAX: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def is_always_dropped(key: str) -> bool:
    return key in ALWAYS_DROPPED_SIDECAR_KEYS or bool(_DATE_KEY.search(key))


def parse_extra_keys(raw: str) -> frozenset[str]:
    """The site's additions to the sidecar allow-list (DICOMFLOW_SIDECAR_EXTRA_KEYS: comma-separated,
    off by default). Fails on a key that can never be kept, so a site learns at start-up rather than
    from an output that silently lacks it."""
    keys = frozenset(k.strip() for k in raw.split(",") if k.strip())
    malformed = sorted(k for k in keys if not _KEY_SYNTAX.fullmatch(k))
    if malformed:
        raise ValueError(f"not sidecar key names: {', '.join(malformed)}")
    refused = sorted(k for k in keys if is_always_dropped(k))
    if refused:
        raise ValueError(
            "these sidecar keys identify a person, a place, a device or a date and cannot be kept: "
            + ", ".join(refused)
        )
    return keys


def filter_sidecar(
    sidecar: Mapping[str, object], identifiers: Identifiers, extra_keys: frozenset[str] = frozenset()
) -> dict[str, object]:
    """The sidecar as it may be shared: allow-listed keys only, in dcm2niix's order.

    Free-text values (FREE_TEXT_SIDECAR_KEYS) are scrubbed with `scrub_text`, strings inside lists too
    (BidsGuess); a free-text value that scrubs to nothing is left out. The values of keys a site added
    lose identifier tokens but keep dates, times and numbers: the site asked for them (AcquisitionTime).
    """
    allowed = DEFAULT_SIDECAR_KEYS | {k for k in extra_keys if not is_always_dropped(k)}
    result: dict[str, object] = {}
    for key, value in sidecar.items():
        if key not in allowed or is_always_dropped(key):
            continue
        if key in FREE_TEXT_SIDECAR_KEYS or key in extra_keys:
            scrubbed = _scrub_value(value, identifiers, patterns=key in FREE_TEXT_SIDECAR_KEYS)
            if scrubbed not in ("", []):
                result[key] = scrubbed
            continue
        result[key] = value
    return result


def _scrub_value(value: object, identifiers: Identifiers, *, patterns: bool) -> object:
    if isinstance(value, str):
        return scrub_text(value, identifiers, patterns=patterns)
    if isinstance(value, list):
        return [_scrub_value(v, identifiers, patterns=patterns) for v in value]
    return value
