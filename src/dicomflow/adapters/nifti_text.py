"""The text fields of NIfTI headers carry nothing from free text (docs/privacy.md, "NIfTI headers").

A NIfTI header has free-text fields any tool may print: `descrip` (80 bytes), `aux_file` (24),
`intent_name` (16) and, in NIfTI-1, the ANALYZE leftovers `db_name` (18) and `data_type` (10).
dcm2niix 1.0.20260724 writes ImageComments (0020,4000) into `aux_file` (PS3.15 Table E.1-1: X) unless it
runs with `-c ""`, and `TE=<ms>;Time=<HHMMSS.fff>` (plus `;phase=<n>`, `;mb=<n>`) into `descrip`: the
time of day of the acquisition (0008,0032), which the Basic Profile removes with the dates. After this
module: `descrip` keeps only the numeric `TE=`, `phase=` and `mb=` items, every other text field is
zeroed, and NIfTI extensions (bytes between the header and the voxels, which can hold any metadata) are
zeroed with the extension flag, so `vox_offset` and the voxel bytes do not move or change.

Costs (110 MB 4D series, docs/privacy.md has the table): patching a `.nii` in place takes microseconds;
a `.nii.gz` must be decompressed and compressed again, so the cheap way is to let dcm2niix write `.nii`
(`-z n`), patch it, and compress it here with `gzip_nifti`: deterministic (mtime 0, no file name) and, with
`threads > 1`, in parallel blocks the way pigz does it. `scrub_nifti` on a `.nii.gz` first reads only the
header and rewrites the file only when something must change.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final

__all__ = ["NiftiFormatError", "TextScrub", "gzip_nifti", "header_text", "scrub_header", "scrub_nifti"]

_NIFTI1_SIZE: Final = 348
_NIFTI2_SIZE: Final = 540
# (offset, length) of the text fields, from nifti1.h / nifti2.h.
_NIFTI1_TEXT: Final = {"data_type": (4, 10), "db_name": (14, 18), "descrip": (148, 80), "aux_file": (228, 24),
                       "intent_name": (328, 16)}  # fmt: skip
_NIFTI2_TEXT: Final = {"descrip": (240, 80), "aux_file": (320, 24), "intent_name": (508, 16)}
_NIFTI1_VOX_OFFSET: Final = 108  # float32
_NIFTI2_VOX_OFFSET: Final = 168  # int64
_NIFTI1_MAGIC: Final = (344, (b"n+1\x00", b"ni1\x00"))
_NIFTI2_MAGIC: Final = (4, (b"n+2\x00", b"ni2\x00"))
# The items of dcm2niix's descrip that may stay: echo time, phase map number, multiband factor, all numbers.
_DESCRIP_KEEP: Final = re.compile(r"(?:TE|phase|mb)=[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?")

GZIP_BLOCK: Final = 1 << 20  # uncompressed bytes per independently compressed block
_READ: Final = 64 * 1024  # compressed bytes read at a time: checking a clean header inflates ~256 KiB, not 4 MiB
_WINDOW: Final = 32 * 1024  # deflate's history: each block is primed with the previous block's last 32 KiB


class NiftiFormatError(ValueError):
    """The file is not a single-file NIfTI-1 or NIfTI-2 image this module can check."""


@dataclass(frozen=True, slots=True)
class TextScrub:
    """What `scrub_header` changed. Names and counts only, never the removed text: safe to log."""

    fields: tuple[str, ...] = ()
    extension_bytes: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.fields or self.extension_bytes)


@dataclass(frozen=True, slots=True)
class _Layout:
    header_size: int
    vox_offset: int
    text: dict[str, tuple[int, int]]


def _layout(head: bytes) -> _Layout:
    if len(head) < 4:
        raise NiftiFormatError("shorter than a NIfTI header")
    for order in ("<", ">"):
        (size,) = struct.unpack_from(order + "i", head, 0)
        if size == _NIFTI1_SIZE and len(head) >= _NIFTI1_SIZE:
            at, magics = _NIFTI1_MAGIC
            vox = int(struct.unpack_from(order + "f", head, _NIFTI1_VOX_OFFSET)[0])
            layout = _Layout(_NIFTI1_SIZE, vox, _NIFTI1_TEXT)
        elif size == _NIFTI2_SIZE and len(head) >= _NIFTI2_SIZE:
            at, magics = _NIFTI2_MAGIC
            vox = int(struct.unpack_from(order + "q", head, _NIFTI2_VOX_OFFSET)[0])
            layout = _Layout(_NIFTI2_SIZE, vox, _NIFTI2_TEXT)
        else:
            continue
        if head[at : at + 4] not in magics:
            raise NiftiFormatError("NIfTI magic missing")
        if magics[0] != head[at : at + 4]:
            raise NiftiFormatError("a header/image pair (.hdr/.img), not a single-file NIfTI")
        if layout.vox_offset < layout.header_size + 4:
            raise NiftiFormatError("vox_offset points into the header")
        return layout
    raise NiftiFormatError("not a NIfTI-1 or NIfTI-2 header")


def header_text(head: bytes) -> dict[str, str]:
    """The text fields of a header, decoded (for tests and checks)."""
    layout = _layout(head)
    return {
        name: head[at : at + length].split(b"\x00", 1)[0].decode("latin-1")
        for name, (at, length) in layout.text.items()
    }


def _clean_descrip(raw: bytes) -> bytes:
    text = raw.split(b"\x00", 1)[0].decode("latin-1")
    kept = [item for item in text.split(";") if _DESCRIP_KEEP.fullmatch(item.strip())]
    return ";".join(item.strip() for item in kept).encode("ascii")


def scrub_header(head: bytes) -> tuple[bytes, TextScrub]:
    """`head` (the file's first bytes, at least up to `vox_offset`) with clean text fields and no
    extensions; bytes from `vox_offset` on are returned as they were."""
    layout = _layout(head)
    if len(head) < layout.vox_offset:
        raise NiftiFormatError("the header is cut short of vox_offset")
    out = bytearray(head)
    changed: list[str] = []
    for name, (at, length) in layout.text.items():
        value = _clean_descrip(bytes(out[at : at + length])) if name == "descrip" else b""
        field = value.ljust(length, b"\x00")
        if out[at : at + length] != field:
            out[at : at + length] = field
            changed.append(name)
    extension = out[layout.header_size : layout.vox_offset]
    removed = 0
    if any(extension):
        # The 4-byte extender flag goes to zero with the rest: readers then skip to vox_offset.
        removed = len(extension) - 4 if extension[0] else len(extension)
        out[layout.header_size : layout.vox_offset] = bytes(len(extension))
    return bytes(out), TextScrub(tuple(changed), removed)


# ------------------------------------------------------------------------------------------- files


def scrub_nifti(path: Path, *, level: int = 6, threads: int = 1) -> TextScrub:
    """Clean the header text of one `.nii` (patched in place) or `.nii.gz` (rewritten only when needed,
    with `gzip_nifti`'s deterministic writer). Voxel bytes are never touched."""
    name = path.name
    if name.endswith(".nii"):
        return _scrub_plain(path)
    if name.endswith(".nii.gz"):
        return _scrub_gzipped(path, level=level, threads=threads)
    raise NiftiFormatError(f"not a .nii or .nii.gz file: {name}")


def _scrub_plain(path: Path) -> TextScrub:
    with path.open("r+b") as fh:
        head = fh.read(_NIFTI2_SIZE + 4)
        layout = _layout(head)
        fh.seek(0)
        head = fh.read(layout.vox_offset)
        clean, report = scrub_header(head)
        if report.changed:
            fh.seek(0)
            fh.write(clean)
    return report


def _decompressed(fh: BinaryIO) -> Iterator[bytes]:
    """The uncompressed bytes of a gzip file, every member of it (gzip files may be concatenations)."""
    decoder = zlib.decompressobj(31)
    fed = False  # the current decoder has been given bytes of a member
    try:
        while chunk := fh.read(_READ):
            while chunk:
                fed = True
                data = decoder.decompress(chunk)
                if data:
                    yield data
                if not decoder.eof:
                    break
                chunk, decoder, fed = decoder.unused_data, zlib.decompressobj(31), False
    except zlib.error as exc:
        raise NiftiFormatError(f"not a valid gzip stream ({exc})") from None
    if fed and not decoder.eof:
        raise NiftiFormatError("the gzip stream is truncated")


def _read_head(stream: Iterator[bytes]) -> tuple[bytes, bytes]:
    """(the bytes up to vox_offset, what was read beyond them)."""
    buffer = bytearray()
    needed = _NIFTI2_SIZE + 4  # enough to tell NIfTI-1 from NIfTI-2 and read vox_offset
    known = False
    for data in stream:
        buffer += data
        if not known and len(buffer) >= needed:
            needed, known = _layout(bytes(buffer)).vox_offset, True
        if known and len(buffer) >= needed:
            break
    if not known:
        needed = _layout(bytes(buffer)).vox_offset  # a file shorter than 544 bytes: raises if not NIfTI
    if len(buffer) < needed:
        raise NiftiFormatError("the file ends inside its header")
    return bytes(buffer[:needed]), bytes(buffer[needed:])


def _scrub_gzipped(path: Path, *, level: int, threads: int) -> TextScrub:
    with path.open("rb") as fh:
        stream = _decompressed(fh)
        head, rest = _read_head(stream)
        clean, report = scrub_header(head)
        if not report.changed:
            return report
        tmp = path.with_name(f".{path.name}.scrub-{os.getpid()}")
        try:
            with tmp.open("wb") as raw, _GzipWriter(raw, level=level, threads=threads) as gz:
                gz.write(clean)
                gz.write(rest)
                for data in stream:
                    gz.write(data)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return report


def gzip_nifti(src: Path, *, level: int = 6, threads: int = 1, remove_source: bool = True) -> Path:
    """Compress `x.nii` to `x.nii.gz` next to it, deterministically: no time stamp and no file name in
    the gzip header, and blocks compressed independently (each primed with the previous 32 KiB), so the
    bytes depend on the data, `level` and the zlib build only, not on `threads` or on when it ran."""
    if not src.name.endswith(".nii"):
        raise NiftiFormatError(f"not a .nii file: {src.name}")
    dst = src.with_name(src.name + ".gz")
    tmp = dst.with_name(f".{dst.name}.part-{os.getpid()}")
    try:
        with src.open("rb") as fh, tmp.open("wb") as raw, _GzipWriter(raw, level=level, threads=threads) as gz:
            while data := fh.read(GZIP_BLOCK):
                gz.write(data)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    if remove_source:
        src.unlink()
    return dst


def _deflate_block(data: bytes, history: bytes, level: int, last: bool) -> bytes:
    if history:
        encoder = zlib.compressobj(level, zlib.DEFLATED, -15, zdict=history)
    else:
        encoder = zlib.compressobj(level, zlib.DEFLATED, -15)
    # A sync flush ends the block on a byte boundary, so the next block's deflate data can follow it.
    return encoder.compress(data) + encoder.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class _GzipWriter:
    """One gzip member written from blocks deflated independently, optionally on several threads (zlib
    releases the GIL while it compresses). Memory stays bounded: at most 2 x threads blocks in flight."""

    def __init__(self, raw: BinaryIO, *, level: int, threads: int) -> None:
        if not 0 <= level <= 9:
            raise ValueError("level must be between 0 and 9")
        self._raw = raw
        self._level = level
        self._pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        self._limit = 2 * max(1, threads)
        self._pending: deque[Future[bytes]] = deque()
        self._buffer = bytearray()
        self._history = b""
        self._crc = 0
        self._size = 0
        xfl = 2 if level == 9 else 4 if level == 1 else 0  # RFC 1952: slowest / fastest compressor
        # magic, deflate, no flags, mtime 0, xfl, OS 255 ("unknown": the bytes must not depend on the host)
        raw.write(b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + bytes((xfl, 255)))

    def __enter__(self) -> _GzipWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self._submit(bytes(self._buffer), last=True)
                self._drain(0)
                self._raw.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)

    def write(self, data: bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self._buffer += data
        while len(self._buffer) > GZIP_BLOCK:  # more data follows this block, so it is not the last
            block = bytes(self._buffer[:GZIP_BLOCK])
            del self._buffer[:GZIP_BLOCK]
            self._submit(block, last=False)

    def _submit(self, block: bytes, *, last: bool) -> None:
        history = self._history
        self._history = (history + block)[-_WINDOW:]
        if self._pool is None:
            self._raw.write(_deflate_block(block, history, self._level, last))
            return
        self._pending.append(self._pool.submit(_deflate_block, block, history, self._level, last))
        self._drain(self._limit)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._raw.write(self._pending.popleft().result())
