"""What the QA report shows of a NIfTI file: shape, voxel size, volumes and a three-view thumbnail.

The thumbnail is the three orthogonal mid-slices (sagittal, coronal, axial) of the first volume, in the
closest-to-RAS orientation, each panel scaled to `PANEL_HEIGHT` pixels with its physical aspect ratio,
intensities windowed between the 1st and 99th percentiles, written as an 8-bit greyscale PNG.

The PNG is written here with zlib (PNG specification, ISO/IEC 15948: signature, IHDR, one IDAT, IEND,
filter type 0 on every row) instead of with an image library: greyscale PNG needs nothing more, numpy
and nibabel already do the image work, the bytes are the same on every machine and version (the report
is deterministic), and the worker image gains no dependency.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Final

import nibabel as nib
import numpy as np
import numpy.typing as npt

from dicomflow.domain.facts import OutputImage
from dicomflow.report import ImageInfo

PANEL_HEIGHT: Final = 96
MAX_PANEL_WIDTH: Final = 2 * PANEL_HEIGHT  # thin slabs would otherwise give long strips
GAP: Final = 2  # pixels of black between panels
_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def describe(path: Path) -> ImageInfo:
    """Read a NIfTI file's header and first volume; never raises for a drawable 3D/4D image."""
    img = nib.load(path)
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise TypeError(f"{path.name} is not a NIfTI image")
    shape = tuple(int(n) for n in img.shape)
    # nibabel 5 ships type hints but leaves these header methods unannotated.
    zooms = tuple(round(float(z), 4) for z in img.header.get_zooms()[: len(shape)])  # type: ignore[no-untyped-call]
    volumes = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    drawable = len(shape) >= 3 and img.get_data_dtype().fields is None  # type: ignore[no-untyped-call]  # not RGB
    png, size = _thumbnail(img) if drawable else (None, (0, 0))
    return ImageInfo(shape, zooms, volumes, png, size)


def _thumbnail(img: nib.Nifti1Image | nib.Nifti2Image) -> tuple[bytes | None, tuple[int, int]]:
    # Only the three mid-slices of the first volume are read: from an uncompressed file nibabel maps them
    # from disk, so a 500 MB fMRI run costs what three slices cost. The window is the 1st..99th percentile
    # of those slices.
    planes = [_canonical_plane(img, axis) for axis in range(3)]
    if any(p.size == 0 for p in planes):
        return None, (0, 0)
    zx, zy, zz = _canonical_zooms(img)
    # Rows top to bottom = superior to inferior (or anterior to posterior for the axial view); columns
    # left to right = anterior (sagittal) or the subject's left to right (neurological convention).
    views = (
        (planes[0].T[::-1], zz, zy),  # sagittal: rows S->I, columns P->A
        (planes[1].T[::-1], zz, zx),  # coronal: rows S->I, columns R-L axis
        (planes[2].T[::-1], zy, zx),  # axial: rows A->P, columns R-L axis
    )
    values = np.concatenate([p.ravel() for p in planes])
    lo, hi = (float(v) for v in np.percentile(values, [1.0, 99.0]))
    if hi <= lo:
        hi = lo + 1.0
    panels = [_panel(view, row_mm, col_mm, lo, hi) for view, row_mm, col_mm in views]
    gap = np.zeros((PANEL_HEIGHT, GAP), dtype=np.uint8)
    parts: list[npt.NDArray[np.uint8]] = []
    for i, panel in enumerate(panels):
        parts.extend([gap, panel] if i else [panel])
    image = np.concatenate(parts, axis=1)
    return encode_png(image), (int(image.shape[1]), int(image.shape[0]))


def _orientation(img: nib.Nifti1Image | nib.Nifti2Image) -> tuple[dict[int, int], dict[int, bool]]:
    """For each closest-to-RAS axis: the file's axis that holds it, and whether it runs backwards."""
    ornt = nib.io_orientation(img.affine)  # type: ignore[no-untyped-call]
    axis_of = {int(target): axis for axis, (target, _) in enumerate(ornt)}
    flipped = {int(target): bool(direction < 0) for target, direction in ornt}
    return axis_of, flipped


def _canonical_zooms(img: nib.Nifti1Image | nib.Nifti2Image) -> tuple[float, float, float]:
    axis_of, _ = _orientation(img)
    zooms = img.header.get_zooms()  # type: ignore[no-untyped-call]
    x, y, z = (float(zooms[axis_of[t]]) for t in range(3))
    return x, y, z


def _canonical_plane(img: nib.Nifti1Image | nib.Nifti2Image, fixed: int) -> npt.NDArray[np.float64]:
    """The middle plane across RAS axis `fixed` of the first volume, its two other RAS axes in order and
    running in their positive direction: what `as_closest_canonical(img)` would give, without loading the
    volume."""
    axis_of, flipped = _orientation(img)
    length = img.shape[axis_of[fixed]]
    middle = length // 2
    index: list[int | slice] = [slice(None)] * 3
    index[axis_of[fixed]] = length - 1 - middle if flipped[fixed] else middle
    extra = (0,) * (len(img.shape) - 3)
    plane = np.asarray(img.dataobj[(*index, *extra)], dtype=np.float64)
    plane = np.where(np.isfinite(plane), plane, 0.0)
    kept = [t for t in range(3) if t != fixed]  # RAS axes of the plane, ascending
    if axis_of[kept[0]] > axis_of[kept[1]]:
        plane = plane.T  # the file stores them the other way round
    for position, target in enumerate(kept):
        if flipped[target]:
            plane = np.flip(plane, axis=position)
    return plane


def _panel(view: npt.NDArray[np.float64], row_mm: float, col_mm: float, lo: float, hi: float) -> npt.NDArray[np.uint8]:
    rows, cols = view.shape
    height_mm, width_mm = rows * max(row_mm, 1e-6), cols * max(col_mm, 1e-6)
    width = min(MAX_PANEL_WIDTH, max(1, round(PANEL_HEIGHT * width_mm / height_mm)))
    # Nearest-neighbour resampling to the panel size (pixel centres mapped back to voxel indices).
    r = np.minimum(((np.arange(PANEL_HEIGHT) + 0.5) * rows / PANEL_HEIGHT).astype(int), rows - 1)
    c = np.minimum(((np.arange(width) + 0.5) * cols / width).astype(int), cols - 1)
    scaled = (np.clip(view[np.ix_(r, c)], lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """An 8-bit greyscale PNG of a 2D uint8 array."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError("encode_png takes a 2D uint8 array")
    height, width = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


class NiftiInspector:
    """The ImageInspector port: `describe` as the series record keeps it (domain.facts.OutputImage)."""

    def describe(self, path: Path) -> OutputImage | None:
        try:
            info = describe(path)
        except (OSError, TypeError, ValueError, nib.filebasedimages.ImageFileError, EOFError):
            return None  # not an image nibabel reads: the report shows the file without one
        return OutputImage(path.name, info.shape, info.voxel_size, info.volumes, info.thumbnail_png,
                           info.thumbnail_size)  # fmt: skip
