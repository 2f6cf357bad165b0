"""Series discovery results, grouping and fingerprints.

Files are grouped by (SeriesInstanceUID, SOPClassUID), never by SeriesNumber or folder: one vendor
exports the classic and the enhanced copy of a series under the same SeriesInstanceUID, and mixing them
breaks conversion (DESIGN.md §9; heudiconv issues #813/#624 for why SeriesNumber is not enough).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from dicomflow.domain.paths import encode_component
from dicomflow.domain.privacy import DirScrub, Identifiers, merge_dirs, series_stem


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file in a source. `ref` is what the source adapter needs to read it (a relative path for a
    local folder, a file id for Drive); `path` is its POSIX path relative to the source root."""

    ref: str
    path: str
    size: int
    md5: str | None = None

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"ref": self.ref, "path": self.path, "size": self.size}
        if self.md5:
            data["md5"] = self.md5
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> FileRef:
        md5 = data.get("md5")
        return cls(
            ref=str(data["ref"]),
            path=str(data["path"]),
            size=int(str(data["size"])),
            md5=str(md5) if md5 else None,
        )


@dataclass(frozen=True, slots=True)
class SeriesKey:
    series_uid: str
    sop_class_uid: str

    @property
    def item_id(self) -> str:
        """Stable id of the series within a batch: usable as a Firestore document id and inside a Cloud
        Tasks task id (no dots allowed there; GCP_FACTS gotcha 10)."""
        digest = hashlib.sha256(f"{self.series_uid}|{self.sop_class_uid}".encode()).hexdigest()
        return digest[:32]


@dataclass(frozen=True, slots=True)
class DicomHeader:
    """What discovery keeps of a file's first bytes. Patient identifiers are not part of it: the
    description is already scrubbed of them (domain/privacy.py), and the file's folders are recorded only
    as keyed scrubs (`folders`), never by name. Scan results are stored between expansion steps."""

    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    series_number: int | None = None
    modality: str = ""
    series_description: str = ""
    image_type: tuple[str, ...] = ()
    folders: tuple[DirScrub, ...] = ()

    @property
    def key(self) -> SeriesKey:
        return SeriesKey(self.series_uid, self.sop_class_uid)


class IgnoredKind(StrEnum):
    NOT_DICOM = "not_dicom"
    EMPTY = "empty"
    TRUNCATED = "truncated"
    UNREADABLE = "unreadable"
    DICOMDIR = "dicomdir"
    NO_SERIES = "no_series"  # DICOM, but without the identifiers a series needs
    NOT_BINARY = "not_binary"  # e.g. a Google Doc in a Drive folder


@dataclass(frozen=True, slots=True)
class Ignored:
    """A file discovery skipped, and why (counted and reported, never silently dropped)."""

    kind: IgnoredKind
    detail: str = ""


ScanResult = DicomHeader | Ignored


@dataclass(frozen=True, slots=True)
class ConversionOptions:
    """The options a user can choose; all of them enter the fingerprint."""

    compress: bool = True
    merge_2d: str = "auto"  # dcm2niix -m: "auto" (2), "yes" (y), "no" (n)

    MERGE_CHOICES = ("auto", "yes", "no")

    def __post_init__(self) -> None:
        if self.merge_2d not in self.MERGE_CHOICES:
            raise ValueError(f"merge_2d must be one of {', '.join(self.MERGE_CHOICES)}")

    def to_dict(self) -> dict[str, object]:
        return {"compress": self.compress, "merge_2d": self.merge_2d}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ConversionOptions:
        return cls(compress=bool(data.get("compress", True)), merge_2d=str(data.get("merge_2d", "auto")))

    def canonical(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def fingerprint(
    key: SeriesKey, sop_instance_uids: Iterable[str], converter_version: str, options: ConversionOptions
) -> str:
    """DESIGN.md §4: SeriesInstanceUID + hash of the sorted SOPInstanceUIDs + converter version + options.

    SOPClassUID is included too because it is part of the series key (classic vs enhanced copies).
    """
    instances = hashlib.sha256("\n".join(sorted(set(sop_instance_uids))).encode()).hexdigest()
    material = "\n".join([key.series_uid, key.sop_class_uid, instances, converter_version, options.canonical()])
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SeriesGroup:
    """One series found in a source, ready to become a batch item."""

    key: SeriesKey
    files: tuple[FileRef, ...]
    sop_instance_uids: tuple[str, ...]
    rel_dir: str
    series_number: int | None
    modality: str
    description: str
    output_stem: str = ""
    duplicate_instances: int = 0

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_component(text: str, *, limit: int = 48) -> str:
    """A file-name fragment with only [A-Za-z0-9_-]: safe on every file system and in dcm2niix's -f."""
    cleaned = _UNSAFE.sub("_", text).strip("_")
    return cleaned[:limit].rstrip("_")


def _common_scrubs(per_file: Sequence[tuple[DirScrub, ...]]) -> tuple[DirScrub, ...]:
    """The folders all files of a series share (their common ancestors), as scrubs."""
    common = list(per_file[0]) if per_file else []
    for scrubs in per_file[1:]:
        depth = 0
        while depth < min(len(common), len(scrubs)) and common[depth].folder == scrubs[depth].folder:
            depth += 1
        del common[depth:]
    return tuple(common)


def _common_dir(paths: Sequence[str]) -> str:
    dirs = [posixpath.dirname(p) for p in paths]
    if len(set(dirs)) == 1:
        return dirs[0]
    common = posixpath.commonpath(dirs) if all(dirs) else ""
    return common


@dataclass
class _Accumulator:
    """One series while its files stream in: only what grouping needs per file (its reference, its
    SOPInstanceUID and its folders, shared between the files of a folder) and the header of the first
    file by path."""

    header: DicomHeader
    first_path: str
    files: dict[str, tuple[FileRef, tuple[DirScrub, ...]]] = field(default_factory=dict)  # by SOPInstanceUID
    folders: dict[tuple[DirScrub, ...], tuple[DirScrub, ...]] = field(default_factory=dict)  # one copy of each
    duplicates: int = 0

    def add(self, ref: FileRef, header: DicomHeader) -> None:
        if ref.path < self.first_path:
            self.header, self.first_path = header, ref.path
        kept = self.files.get(header.sop_instance_uid)
        if kept is not None:
            self.duplicates += 1
            if ref.path >= kept[0].path:
                return
        self.files[header.sop_instance_uid] = (ref, self.folders.setdefault(header.folders, header.folders))

    def scrubs(self) -> tuple[DirScrub, ...] | None:
        """The folders all kept files share, or None when discovery did not scrub every file's folders."""
        per_file = [folders for _, folders in self.files.values()]
        return _common_scrubs(per_file) if all(per_file) else None


def group_series(scanned: Iterable[tuple[FileRef, DicomHeader]]) -> list[SeriesGroup]:
    """Group scanned files into series by (SeriesInstanceUID, SOPClassUID).

    Two files with the same SOPInstanceUID are the same image stored twice (a common result of copying
    exports into one folder); only the first (by path) is kept so dcm2niix does not see duplicates.
    Output stems are made unique per destination folder: when two series would share a name (same
    SeriesNumber and description, e.g. a classic and an enhanced copy) both get a short key suffix.

    Destination folders come from the files' folder scrubs when discovery recorded them (always, in
    dicomflow's own runs): a folder keeps the name every series below it scrubbed it to, and gets its
    keyed `anon-<tag>` name when they disagree (privacy.merge_dirs) — a source folder name reaches the
    destination only if it holds no identifier of any series in it.

    `scanned` may be a stream in any order (a 10,000-series batch has two million files): the result is
    the same as for the files sorted by path, and a file's header is not kept once it is counted.
    """
    acc: dict[SeriesKey, _Accumulator] = {}
    for ref, header in scanned:
        slot = acc.get(header.key)
        if slot is None:
            slot = acc[header.key] = _Accumulator(header, ref.path)
        slot.add(ref, header)

    scrubbed = {key: scrubs for key, slot in acc.items() if (scrubs := slot.scrubs()) is not None}
    merged = merge_dirs(scrubbed.values())
    groups: list[SeriesGroup] = []
    for key, slot in sorted(acc.items(), key=lambda pair: pair[1].first_path):
        head = slot.header
        files = sorted((ref for ref, _ in slot.files.values()), key=lambda f: f.path)
        if key in scrubbed:
            rel_dir = "/".join(encode_component(merged[s.folder]) for s in scrubbed[key])
        else:  # no scrubs recorded (a direct caller without a pseudonym key): the folders as they are
            rel_dir = _common_dir([f.path for f in files])
        groups.append(
            SeriesGroup(
                key=key,
                files=tuple(files),
                sop_instance_uids=tuple(sorted(slot.files)),
                rel_dir=rel_dir,
                series_number=head.series_number,
                modality=head.modality,
                description=head.series_description,
                duplicate_instances=slot.duplicates,
            )
        )
    return _assign_stems(groups)


def base_stem(group: SeriesGroup) -> str:
    """`<SeriesNumber>_<description>`: the description was scrubbed at discovery; `series_stem` also drops
    what looks like a date or a record number, keeps [A-Za-z0-9_-] and shortens in the middle so the end
    (`_AP`, `_PA`, `_run2`) survives."""
    return series_stem(group.series_number, group.description, group.modality, Identifiers())


def _assign_stems(groups: list[SeriesGroup]) -> list[SeriesGroup]:
    by_name: dict[tuple[str, str], list[SeriesGroup]] = defaultdict(list)
    for group in groups:
        by_name[(group.rel_dir, base_stem(group))].append(group)
    result: list[SeriesGroup] = []
    for (_, stem), members in sorted(by_name.items()):
        for group in sorted(members, key=lambda g: g.key.item_id):
            unique = stem if len(members) == 1 else f"{stem}_{group.key.item_id[:8]}"
            result.append(_with_stem(group, unique))
    return result


def _with_stem(group: SeriesGroup, stem: str) -> SeriesGroup:
    return SeriesGroup(
        key=group.key,
        files=group.files,
        sop_instance_uids=group.sop_instance_uids,
        rel_dir=group.rel_dir,
        series_number=group.series_number,
        modality=group.modality,
        description=group.description,
        output_stem=stem,
        duplicate_instances=group.duplicate_instances,
    )
