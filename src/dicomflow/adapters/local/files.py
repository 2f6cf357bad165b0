"""Local folders as a source of DICOM files and a destination for NIfTI outputs."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from dicomflow.adapters.local.private import private_dir, private_file
from dicomflow.domain.failures import (
    AccessDenied,
    DestinationConflict,
    DestinationNotWritable,
    DiskFull,
    PermanentError,
    SeriesChanged,
    SourceNotFound,
)
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import OutputFile
from dicomflow.domain.paths import encode_component, join, safe_local_name, safe_local_parts
from dicomflow.domain.series import FileRef, Ignored, IgnoredKind
from dicomflow.ports import Progress, SkippedFile

STATE_DIR = ".dicomflow"
LEDGER = "outputs.ledger"
_CHUNK = 1024 * 1024
# dcm2niix (the pinned 1.0.20260724) refuses an input or output folder whose path is 512 bytes or longer:
# it exits 5 ("input folder invalid") or 6 without a message, whatever the length of the file names in it
# (measured: folders of 511 bytes convert, 512 fail; files of 762-byte paths in a 511-byte folder convert).
DCM2NIIX_MAX_FOLDER_BYTES = 511
# What a conversion adds to the work folder: "/series-<12>-<8 random>/out-inflated" (services/convert_series.py
# and adapters/dcm2niix.py), with a margin.
SCRATCH_NAME_BYTES = 48
# The longest path the operating system accepts (Linux PATH_MAX, terminating NUL included).
OS_MAX_PATH_BYTES = 4095


class PathTooLong(PermanentError):
    """A path exceeds what dcm2niix or the file system accepts; retrying cannot help."""

    code = "path_too_long"


def _path_bytes(path: str | Path) -> int:
    return len(os.fsencode(str(path)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _require_local(location: Location) -> Path:
    if location.kind is not LocationKind.LOCAL:
        raise ValueError(f"not a local location: {location}")
    return Path(location.ref)


class LocalFolderSource:
    """Reads DICOM files from a local folder tree. File refs are absolute paths."""

    def check(self, location: Location) -> str:
        root = _require_local(location)
        if not root.exists():
            raise SourceNotFound(f"source folder {root} does not exist; check the path")
        if not root.is_dir():
            raise SourceNotFound(f"source {root} is a file, not a folder; give the folder that holds the series")
        if not os.access(root, os.R_OK | os.X_OK):
            raise AccessDenied(
                f"cannot read source folder {root} (permission denied); fix its permissions or run as its owner"
            )
        return root.name

    def list_files(self, location: Location) -> Iterator[FileRef | SkippedFile]:
        root = _require_local(location)
        stack: list[tuple[Path, str]] = [(root, "")]
        while stack:
            folder, rel = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except PermissionError:
                yield SkippedFile(rel or ".", Ignored(IgnoredKind.UNREADABLE, "permission denied (folder)"))
                continue
            except FileNotFoundError:
                continue  # removed while listing
            for entry in entries:
                child_rel = join(rel, encode_component(entry.name))
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name == STATE_DIR:
                            continue  # our own state and ledger, when the destination is inside the source
                        stack.append((Path(entry.path), child_rel))
                    elif entry.is_file(follow_symlinks=True):
                        size = entry.stat(follow_symlinks=True).st_size
                        yield FileRef(ref=entry.path, path=child_rel, size=size)
                    elif entry.is_symlink() and not entry.is_dir(follow_symlinks=True):
                        # Reported, not silently dropped: an archive of links whose targets moved.
                        yield SkippedFile(child_rel, Ignored(IgnoredKind.UNREADABLE, "broken symbolic link"))
                except OSError as exc:
                    yield SkippedFile(
                        child_rel, Ignored(IgnoredKind.UNREADABLE, errno.errorcode.get(exc.errno or 0, ""))
                    )

    def read_prefix(self, ref: FileRef, size: int) -> bytes:
        with open(ref.ref, "rb") as handle:
            return handle.read(size)

    def refresh(self, refs: Sequence[FileRef]) -> list[FileRef]:
        fresh: list[FileRef] = []
        for ref in refs:
            try:
                fresh.append(FileRef(ref.ref, ref.path, Path(ref.ref).stat().st_size))
            except FileNotFoundError:
                continue
        return fresh

    def fetch(self, refs: Sequence[FileRef], dest_dir: Path, progress: Progress | None = None) -> Path:
        """The folder dcm2niix should read. When the series' source folder holds exactly its files (the
        usual nested layout) that folder is used as it is; otherwise (a flat export mixing series) the
        files are linked into `dest_dir` — symlinks, no copy — so dcm2niix sees only this series."""
        self._check_unchanged(refs)
        folder = self._sole_folder(refs)
        # dcm2niix cannot read a folder of a path that long: give it links in the (shorter) work folder.
        if folder is not None and _path_bytes(folder) <= DCM2NIIX_MAX_FOLDER_BYTES:
            if progress:
                progress(sum(r.size for r in refs), sum(r.size for r in refs))
            return folder
        if _path_bytes(dest_dir) > DCM2NIIX_MAX_FOLDER_BYTES:
            raise PathTooLong(
                f"the work folder {dest_dir} is {_path_bytes(dest_dir)} bytes long, more than dcm2niix accepts "
                f"({DCM2NIIX_MAX_FOLDER_BYTES}): set DICOMFLOW_WORK_DIR to a folder with a shorter path"
            )
        dest_dir.mkdir(parents=True, exist_ok=True)
        total = sum(r.size for r in refs)
        done = 0
        for index, ref in enumerate(refs):
            (dest_dir / f"{index:06d}.dcm").symlink_to(Path(ref.ref).resolve())
            done += ref.size
            if progress:
                progress(done, total)
        return dest_dir

    @staticmethod
    def _sole_folder(refs: Sequence[FileRef]) -> Path | None:
        """The common folder of `refs` if it contains exactly those regular files (sub-folders are fine:
        dcm2niix runs with -d 0)."""
        parents = {os.path.dirname(r.ref) for r in refs}
        if len(parents) != 1:
            return None
        folder = parents.pop()
        wanted = {os.path.basename(r.ref) for r in refs}
        try:
            with os.scandir(folder) as entries:
                present = {e.name for e in entries if e.is_file(follow_symlinks=True)}
        except OSError:
            return None
        return Path(folder) if present == wanted else None

    @staticmethod
    def _check_unchanged(refs: Sequence[FileRef]) -> None:
        for ref in refs:
            source = Path(ref.ref)
            try:
                size = os.stat(ref.ref).st_size
            except FileNotFoundError:
                raise SeriesChanged(
                    "a file of this series disappeared since it was discovered; it will be retried "
                    "(if the folder was reorganised, submit it again)"
                ) from None
            except PermissionError:
                raise AccessDenied(f"cannot read {source} (permission denied); fix its permissions") from None
            if not os.access(ref.ref, os.R_OK):
                raise AccessDenied(
                    f"cannot read {source} (permission denied): fix its permissions, then retry the series "
                    "with `dicomflow dlq retry`"
                )
            if size != ref.size:
                raise SeriesChanged(
                    "a file of this series changed since it was discovered (still being copied?); it will be "
                    "retried. If you replaced it on purpose, retry the series with `dicomflow dlq retry` "
                    "or submit the folder again."
                )


class LocalFolderSink:
    """Writes outputs under a local folder, mirroring the source's relative folders.

    Idempotent and safe: each file is written to a temporary name in the target folder and renamed into
    place (a reader never sees half a file); publishing identical content again changes nothing; an
    existing file is replaced only if the ledger (DEST/.dicomflow/outputs.ledger) shows dicomflow wrote
    it for the same series. The ledger entry is appended *before* the rename, so a crash between the two
    still leaves the file recognisably ours.
    """

    def check(self, location: Location) -> str:
        root = _require_local(location)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise DestinationNotWritable(
                f"cannot create destination folder {root} (permission denied); choose a folder you can write to"
            ) from None
        except FileExistsError:
            raise DestinationNotWritable(f"destination {root} exists and is not a folder") from None
        except OSError as exc:
            raise DestinationNotWritable(f"cannot create destination folder {root}: {exc.strerror}") from None
        if not root.is_dir():
            raise DestinationNotWritable(f"destination {root} exists and is not a folder")
        if not os.access(root, os.W_OK | os.X_OK):
            raise DestinationNotWritable(
                f"cannot write to destination folder {root} (permission denied); fix its permissions "
                "or choose another folder"
            )
        return root.name

    def subfolder(self, location: Location, name: str) -> Location:
        target = _require_local(location) / safe_local_name(name)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._write_error(exc, target) from None
        return Location(LocationKind.LOCAL, str(target))

    def publish(
        self,
        location: Location,
        rel_dir: str,
        files: Sequence[Path],
        owner_key: str,
        progress: Progress | None = None,
    ) -> tuple[OutputFile, ...]:
        root = _require_local(location)
        parts = safe_local_parts(rel_dir)
        target_dir = root.joinpath(*parts)
        longest = max((target_dir / f.name for f in files), key=_path_bytes, default=target_dir)
        if _path_bytes(longest) > OS_MAX_PATH_BYTES:
            raise PathTooLong(
                f"the output {longest} would be a {_path_bytes(longest)}-byte path, more than the file system "
                f"accepts ({OS_MAX_PATH_BYTES}): choose a destination with a shorter path, or shorten the source's "
                "folder names (the output tree mirrors them)"
            )
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._write_error(exc, target_dir) from None
        owned: set[str] | None = None  # read from the ledger only when a name is already taken
        results: list[OutputFile] = []
        total = sum(f.stat().st_size for f in files)
        done = 0
        for source in files:
            name = self._name(rel_dir, source)
            target = target_dir / source.name
            digest = sha256_file(source)
            size = source.stat().st_size
            if target.exists():
                if target.is_file() and sha256_file(target) == digest:
                    results.append(OutputFile(name=name, size=size, sha256=digest, ref=str(target)))
                    continue
                if owned is None:
                    owned = self._owned_names(root, owner_key)
                if name not in owned:
                    raise DestinationConflict(
                        f"{target} already exists and was not written by dicomflow for this series; "
                        "move it away or choose another destination (nothing was overwritten)"
                    )
            self._append_ledger(root, owner_key, name)
            self._copy_into_place(source, target)
            results.append(OutputFile(name=name, size=size, sha256=digest, ref=str(target)))
            done += size
            if progress:
                progress(done, total)
        return tuple(results)

    @staticmethod
    def _name(rel_dir: str, file: Path) -> str:
        return "/".join([*safe_local_parts(rel_dir), file.name])

    def intended(self, rel_dir: str, files: Sequence[Path]) -> tuple[OutputFile, ...]:
        return tuple(OutputFile(self._name(rel_dir, f), f.stat().st_size, sha256_file(f)) for f in files)

    def retract(self, location: Location, outputs: Sequence[OutputFile], owner_key: str) -> int:
        root = _require_local(location)
        owned: set[str] | None = None
        removed = 0
        for output in outputs:
            target = root.joinpath(*safe_local_parts(output.name))
            try:
                if not target.is_file() or sha256_file(target) != output.sha256:
                    continue  # gone already, or changed since: not ours to remove
            except OSError:
                continue
            if owned is None:
                owned = self._owned_names(root, owner_key)
            if output.name not in owned:
                continue  # a file dicomflow did not write for this series is never touched
            try:
                target.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._write_error(exc, target.parent) from None
            removed += 1
        return removed

    def move(self, location: Location, output: OutputFile, name: str, owner_key: str) -> OutputFile:
        """A rename inside the destination (one file system: no copy). The ledger records the new name for
        `owner_key` before the rename, like a publish."""
        root = _require_local(location)
        parts = safe_local_parts(name)
        target = root.joinpath(*parts)
        source = root.joinpath(*safe_local_parts(output.name))
        moved = OutputFile("/".join(parts), output.size, output.sha256, str(target), origin=output.original)
        if source == target:
            return moved
        try:
            if target.is_file() and sha256_file(target) == output.sha256:
                if source.is_file() and source.stat().st_size == output.size:
                    # Both present (a copy of the same bytes is already in place): keep one.
                    self._remove_if_owned(root, source, output.name, owner_key)
                return moved
            if not source.is_file() or source.stat().st_size != output.size:
                raise SourceNotFound(
                    f"{source} is gone (or changed) before it could be moved to {target}; convert the series again "
                    "(dicomflow convert --force)"
                )
            if target.exists() and "/".join(parts) not in self._owned_names(root, owner_key):
                raise DestinationConflict(
                    f"{target} already exists and was not written by dicomflow for this series; move it away "
                    "(nothing was overwritten)"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            self._append_ledger(root, owner_key, "/".join(parts))
            source.replace(target)
        except OSError as exc:
            raise self._write_error(exc, target.parent) from None
        self._prune(root, source.parent)
        return moved

    def read(self, location: Location, name: str, owner_key: str) -> bytes | None:
        target = _require_local(location).joinpath(*safe_local_parts(name))
        try:
            return target.read_bytes() if target.is_file() else None
        except OSError as exc:
            raise self._write_error(exc, target.parent) from None

    def _remove_if_owned(self, root: Path, path: Path, name: str, owner_key: str) -> None:
        if name in self._owned_names(root, owner_key):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @staticmethod
    def _prune(root: Path, folder: Path) -> None:
        """Remove folders a move left empty (staging folders), up to the destination's root."""
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty, or already gone
            folder = folder.parent

    @staticmethod
    def _write_error(exc: OSError, where: Path) -> Exception:
        if exc.errno == errno.ENOSPC:
            return DiskFull(f"no space left on the device holding {where}; free some space (it will be retried)")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return DestinationNotWritable(f"cannot write to {where} ({exc.strerror}); fix its permissions")
        if exc.errno == errno.ENAMETOOLONG:
            return PathTooLong(
                f"cannot write to {where}: a file or folder name, or the whole path, is longer than the file system "
                "accepts; choose a destination with a shorter path or shorten the source's folder names"
            )
        return DestinationNotWritable(f"cannot write to {where}: {exc.strerror}")

    def _copy_into_place(self, source: Path, target: Path) -> None:
        """Durably put `source` at `target`: a rename when both are on one file system (the usual case:
        the work folder lives in DEST/.dicomflow), else a copy to a temporary name and a rename."""
        temp = target.with_name(f".{target.name}.dicomflow-partial")
        try:
            with source.open("rb+") as handle:
                os.fsync(handle.fileno())  # dcm2niix does not sync; the state will soon say "succeeded"
            try:
                source.replace(target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            else:
                return
            with source.open("rb") as src, temp.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
            temp.replace(target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise self._write_error(exc, target.parent) from None

    @staticmethod
    def _ledger_path(root: Path) -> Path:
        return root / STATE_DIR / LEDGER

    def _append_ledger(self, root: Path, owner_key: str, name: str) -> None:
        path = self._ledger_path(root)
        try:
            private_dir(path.parent)
            line = json.dumps({"key": owner_key, "name": name}, separators=(",", ":")) + "\n"
            with path.open("a", encoding="utf-8") as ledger:
                private_file(path)
                fcntl.flock(ledger, fcntl.LOCK_EX)
                ledger.write(line)
                ledger.flush()
                os.fsync(ledger.fileno())
        except OSError as exc:
            raise self._write_error(exc, path.parent) from None

    def _owned_names(self, root: Path, owner_key: str) -> set[str]:
        path = self._ledger_path(root)
        if not path.exists():
            return set()
        owned: set[str] = set()
        with path.open(encoding="utf-8") as ledger:
            for line in ledger:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line after a crash
                if entry.get("key") == owner_key:
                    owned.add(str(entry.get("name")))
        return owned
