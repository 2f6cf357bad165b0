"""Realistic synthetic DICOM series, for the demo, the integration tests and the benchmarks.

Why this exists: dicomflow must be demonstrable and testable on a fresh machine with no network and
no patient data, and its tests must prove that the *real* dcm2niix turns what we feed it into NIfTI
volumes with the right shape, voxel values and geometry. So every series written here is built to be
converted by dcm2niix exactly like scanner data would be:

* geometry follows PS3.3 C.7.6.2: ImagePositionPatient steps along the slice normal (the cross
  product of the ImageOrientationPatient row and column vectors) by SpacingBetweenSlices, so a
  converter that sorts slices spatially rebuilds the volume whatever the file order or file names;
* pixel data is a deterministic, deliberately asymmetric phantom (an ellipsoid "head" with an
  intensity gradient along every axis, an off-centre inner ellipsoid and a hash-based texture), so a
  flipped or transposed axis, a swapped volume or a mis-sorted slice changes voxel values and is
  caught by comparing against :func:`phantom`;
* MR series are labelled ``SIEMENS``. dcm2niix 1.0.20260724 reads the standard diffusion tags
  DiffusionBValue (0018,9087) and DiffusionGradientOrientation (0018,9089) for SIEMENS, GE, Philips,
  Canon, Hitachi and unknown vendors (it then warns "assuming Philips"), but NOT for UIH, where the
  .bvec comes out all zero. SIEMENS is also the vendor for which dcm2niix derives the BIDS
  ``SliceTiming`` from per-slice AcquisitionTime when no CSA header is present (GE, Philips, Canon and
  Hitachi leave it out), so the EPI kinds (``mr4d``, ``dwi``) carry an interleaved AcquisitionTime;
* everything is a pure function of the seed: UIDs are ``2.25.<int>`` values derived from the seed
  and the series identity (:func:`derive_uid`), the phantom's texture is integer
  hashing (no RNG stream that could change between numpy versions) and file order uses
  :class:`random.Random` seeded with a string. The same seed gives byte-identical files.

Nothing here prints; callers (the CLI, ``make demo``, the tests) report what they get back.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import FileSet
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "COMPREHENSIVE_SR_STORAGE",
    "CT_IMAGE_STORAGE",
    "KINDS",
    "MR_IMAGE_STORAGE",
    "ORIENTATIONS",
    "CorruptionMode",
    "DemoArchive",
    "DemoSeries",
    "FileNaming",
    "Kind",
    "Orientation",
    "Outcome",
    "Patient",
    "SeriesGeometry",
    "SeriesSpec",
    "SliceOrder",
    "Study",
    "WrittenSeries",
    "corrupt_file",
    "derive_uid",
    "diffusion_scheme",
    "iter_datasets",
    "make_bench_archive",
    "make_demo_archive",
    "phantom",
    "phi_patient",
    "series_geometry",
    "slice_timing",
    "write_series",
]

Kind = Literal["mr3d", "mr4d", "dwi", "ct"]
Orientation = Literal["axial", "sagittal", "coronal", "oblique"]
FileNaming = Literal["numbered", "uid", "noext"]
SliceOrder = Literal["interleaved", "ascending", "descending"]
Outcome = Literal["convert", "fail", "skip"]
CorruptionMode = Literal["short_pixel_data", "truncated_file"]

KINDS: Final[tuple[Kind, ...]] = ("mr3d", "mr4d", "dwi", "ct")
ORIENTATIONS: Final[tuple[Orientation, ...]] = ("axial", "sagittal", "coronal", "oblique")

MR_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"
COMPREHENSIVE_SR_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.88.33"

_PIXEL_DATA: Final = 0x7FE00010
# Namespace of the name-based UUIDs behind every UID written here (see derive_uid).
_UID_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicomflow:samples")
# The CT intercept that makes stored values non-negative for air (-1000 HU), as on most scanners.
_CT_INTERCEPT: Final = -1024
# Series start 5 minutes apart (cycling every 100 series numbers, so no series crosses midnight).
_SERIES_SPACING_S: Final = 300.0

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Patient:
    """Patient-level attributes; every value is written verbatim so privacy tests can plant PHI."""

    name: str = "DEMO^PATIENT"
    patient_id: str = "DEMO0001"
    birth_date: str = "19700101"
    sex: Literal["M", "F", "O"] = "O"


def phi_patient(tag: str) -> Patient:
    """A patient whose identifiers are unmistakable, to prove they never leak into outputs or logs.

    The values are chosen so a plain substring search finds them anywhere (file names, NIfTI headers,
    JSON sidecars, log lines): ``ZZPHI^<tag>``, ``PHIID<tag>`` and the unusual birth date 1901-02-03.
    """
    return Patient(name=f"ZZPHI^{tag}", patient_id=f"PHIID{tag}", birth_date="19010203", sex="O")


@dataclass(frozen=True)
class Study:
    """Study-level attributes. ``study_uid=None`` derives the UID from the seed and the patient."""

    study_uid: str | None = None
    study_date: str = "20240115"
    study_time: str = "090000"
    description: str = "RESEARCH^HEAD"
    accession_number: str = "ACC000001"
    study_id: str = "1"
    institution_name: str = "DICOMFLOW SYNTHETIC HOSPITAL"
    referring_physician_name: str = "REFERRER^DEMO"


@dataclass(frozen=True)
class _KindDefaults:
    volumes: int
    tr_ms: float
    te_ms: float
    flip_deg: float
    description: str
    image_type: tuple[str, ...]
    model: str


_KIND_DEFAULTS: Final[dict[Kind, _KindDefaults]] = {
    "mr3d": _KindDefaults(1, 2300.0, 2.98, 9.0, "T1w_MPRAGE", ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), "Prisma_fit"),
    "mr4d": _KindDefaults(
        4, 2000.0, 30.0, 77.0, "fMRI_rest_bold", ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), "Prisma_fit"
    ),
    "dwi": _KindDefaults(
        7,
        3200.0,
        89.0,
        90.0,
        "DWI_b1000",
        ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "NORM"),
        "Prisma_fit",
    ),
    "ct": _KindDefaults(1, 0.0, 0.0, 0.0, "CT_Head", ("ORIGINAL", "PRIMARY", "AXIAL"), "SOMATOM Force"),
}


@dataclass(frozen=True)
class SeriesSpec:
    """What one series looks like. Fields left at ``None`` take the default of ``kind``.

    Small defaults (32x32x12) keep the tests fast; benchmarks ask for bigger. ``pixel_spacing`` is in
    DICOM order: (spacing between rows, spacing between columns) in mm. Slices are
    ``slice_thickness + slice_gap`` mm apart. ``echo_times_ms`` with more than one value makes a
    multi-echo series (``mr3d``/``mr4d``), which dcm2niix splits into ``_e1``, ``_e2``... outputs.
    ``b_values`` are the non-zero shells of a ``dwi`` series: volume 0 is b=0 and the others cycle
    through the shells with distinct gradient directions (see :func:`diffusion_scheme`).
    ``slice_order`` is the EPI acquisition order written into AcquisitionTime (``mr4d``/``dwi``).
    """

    kind: Kind = "mr3d"
    rows: int = 32
    columns: int = 32
    slices: int = 12
    volumes: int | None = None
    series_number: int = 1
    series_description: str | None = None
    orientation: Orientation = "axial"
    pixel_spacing: tuple[float, float] = (3.0, 3.0)
    slice_thickness: float = 3.0
    slice_gap: float = 0.0
    repetition_time_ms: float | None = None
    echo_times_ms: tuple[float, ...] | None = None
    flip_angle_deg: float | None = None
    b_values: tuple[float, ...] = (1000.0,)
    slice_order: SliceOrder = "interleaved"
    center_mm: Vec3 = (0.0, -12.0, 18.0)
    manufacturer: str | None = None
    # Amplitude of deterministic pseudo-random noise added to MR signal. 0 keeps the phantom nearly
    # flat (fast to compress); benchmarks use ~40 so gzip works about as hard as on real scans.
    noise: int = 0
    patient: Patient = field(default_factory=Patient)
    study: Study = field(default_factory=Study)

    def __post_init__(self) -> None:
        """Reject specs dcm2niix could not turn into one well-defined volume, before writing files."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {KINDS}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"unknown orientation {self.orientation!r}; expected one of {ORIENTATIONS}")
        if min(self.rows, self.columns, self.slices) < 2:
            raise ValueError("rows, columns and slices must each be at least 2")
        if min(self.pixel_spacing) <= 0 or self.slice_thickness <= 0 or self.slice_gap < 0:
            raise ValueError("pixel spacing and slice thickness must be positive, slice gap non-negative")
        if self.volumes is not None and self.volumes < 1:
            raise ValueError("volumes must be at least 1")
        if self.kind in ("mr3d", "ct") and self.n_volumes != 1:
            raise ValueError(f"a {self.kind} series has exactly one volume")
        if self.kind == "dwi" and (self.n_volumes < 2 or not self.b_values or min(self.b_values) <= 0):
            raise ValueError("a dwi series needs at least 2 volumes and positive b-values")
        if len(self.echo_times) < 1 or (len(self.echo_times) > 1 and self.kind not in ("mr3d", "mr4d")):
            raise ValueError("multi-echo is supported for mr3d and mr4d only")
        if not 1 <= self.series_number <= 9999:
            raise ValueError("series_number must be in 1..9999")

    @property
    def n_volumes(self) -> int:
        """Number of volumes (time points or diffusion directions)."""
        return self.volumes if self.volumes is not None else _KIND_DEFAULTS[self.kind].volumes

    @property
    def tr_ms(self) -> float:
        """RepetitionTime in ms."""
        if self.repetition_time_ms is not None:
            return self.repetition_time_ms
        return _KIND_DEFAULTS[self.kind].tr_ms

    @property
    def echo_times(self) -> tuple[float, ...]:
        """EchoTime of each echo in ms."""
        return self.echo_times_ms if self.echo_times_ms is not None else (_KIND_DEFAULTS[self.kind].te_ms,)

    @property
    def flip_deg(self) -> float:
        """FlipAngle in degrees."""
        return self.flip_angle_deg if self.flip_angle_deg is not None else _KIND_DEFAULTS[self.kind].flip_deg

    @property
    def description(self) -> str:
        """SeriesDescription (dcm2niix's ``%d``)."""
        if self.series_description is not None:
            return self.series_description
        return _KIND_DEFAULTS[self.kind].description

    @property
    def manufacturer_name(self) -> str:
        """Manufacturer; SIEMENS by default, see the module docstring for why."""
        return self.manufacturer if self.manufacturer is not None else "SIEMENS"

    @property
    def modality(self) -> str:
        """DICOM Modality."""
        return "CT" if self.kind == "ct" else "MR"

    @property
    def sop_class_uid(self) -> str:
        """CT Image Storage or MR Image Storage."""
        return CT_IMAGE_STORAGE if self.kind == "ct" else MR_IMAGE_STORAGE

    @property
    def spacing_between_slices(self) -> float:
        """Centre-to-centre slice distance in mm."""
        return self.slice_thickness + self.slice_gap

    @property
    def expected_shape(self) -> tuple[int, ...]:
        """Shape of each NIfTI dcm2niix writes: (columns, rows, slices[, volumes]), with one exception.

        dcm2niix losslessly reorients single-volume 3D acquisitions (MRAcquisitionType ``3D``, so
        ``mr3d``) to the voxel axes nearest to R, A and S (its ``nii_setOrtho``; ``-x i`` turns that off).
        A sagittal ``mr3d`` therefore comes out as (slices, columns, rows), a coronal one as
        (columns, slices, rows). 2D and 4D series and CT keep the DICOM order.
        """
        base = (self.columns, self.rows, self.slices)
        if self.n_volumes > 1:
            return (*base, self.n_volumes)
        if self.kind == "mr3d":
            geometry = series_geometry(self)
            axes = [
                int(np.argmax(np.abs(v))) for v in (geometry.row_direction, geometry.column_direction, geometry.normal)
            ]
            if sorted(axes) == [0, 1, 2]:
                return tuple(base[axes.index(world_axis)] for world_axis in range(3))
        return base

    @property
    def n_files(self) -> int:
        """One file per slice, volume and echo."""
        return self.slices * self.n_volumes * len(self.echo_times)


@dataclass(frozen=True)
class SeriesGeometry:
    """Where each slice sits in patient (LPS) space, as written to ImagePositionPatient.

    ``row_direction`` is the direction of increasing column index (first ImageOrientationPatient
    triplet), ``column_direction`` that of increasing row index, ``normal`` their cross product.
    ``positions[k]`` is the centre of the first pixel of slice ``k``.
    """

    row_direction: Vec3
    column_direction: Vec3
    normal: Vec3
    positions: tuple[Vec3, ...]
    spacing_between_slices: float


@dataclass(frozen=True)
class WrittenSeries:
    """What :func:`write_series` wrote and what dcm2niix must make of it.

    ``paths`` are in InstanceNumber order, i.e. index ``(echo * volumes + volume) * slices + slice``,
    whatever the file names. ``expected_shape`` is the shape of each output; a multi-echo series has
    one output per entry of ``output_suffixes``. ``extra_outputs`` lists sidecar extensions besides
    ``.nii.gz``/``.json`` (``bval``/``bvec`` for DWI), ``bvals`` the expected .bval values.
    """

    spec: SeriesSpec
    folder: Path
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    paths: tuple[Path, ...]
    expected_shape: tuple[int, ...]
    n_files: int
    output_suffixes: tuple[str, ...]
    extra_outputs: tuple[str, ...]
    bvals: tuple[float, ...]

    @property
    def n_outputs(self) -> int:
        """How many NIfTI files dcm2niix writes for this series."""
        return len(self.output_suffixes)


@dataclass(frozen=True)
class DemoSeries:
    """One expected series of the demo archive and what a converter should make of it.

    ``folder`` is relative to the archive root and may hold other series too (``pacs_export``).
    ``dcm2niix_exit_code`` is what ``dcm2niix <folder>`` returns when run on ``folder`` alone, and
    ``console_hint`` a substring of its console output that explains a failure.
    """

    label: str
    kind: Kind | Literal["sr"]
    patient: Patient
    series_uid: str
    study_uid: str
    sop_class_uid: str
    series_number: int
    series_description: str
    folder: Path
    n_files: int
    expected_shape: tuple[int, ...] | None
    outcome: Outcome
    extra_outputs: tuple[str, ...] = ()
    output_suffixes: tuple[str, ...] = ("",)
    dcm2niix_exit_code: int = 0
    console_hint: str | None = None


@dataclass(frozen=True)
class DemoArchive:
    """Manifest of :func:`make_demo_archive`: what is in the tree and what conversion must produce.

    Paths are relative to ``root``. ``tree_exit_code`` is what dcm2niix returns when run once on the
    whole tree (8, "some converted, some failed", because of the corrupt series).
    """

    root: Path
    series: tuple[DemoSeries, ...]
    non_dicom_files: tuple[Path, ...]
    dicomdir: Path | None
    tree_exit_code: int

    def with_outcome(self, outcome: Outcome) -> tuple[DemoSeries, ...]:
        """The series expected to end with ``outcome``."""
        return tuple(s for s in self.series if s.outcome == outcome)

    def by_label(self, label: str) -> DemoSeries:
        """The series called ``label`` (e.g. ``sub-01/ses-01/DWI_b1000``)."""
        for s in self.series:
            if s.label == label:
                return s
        raise KeyError(label)

    @property
    def expected_nifti_count(self) -> int:
        """NIfTI files a correct conversion of the whole tree produces."""
        return sum(len(s.output_suffixes) for s in self.with_outcome("convert"))


# --------------------------------------------------------------------------------------------- UIDs


def derive_uid(seed: int, *parts: object) -> str:
    """A valid, deterministic ``2.25.<int>`` UID (at most 44 characters) from the seed and ``parts``.

    PS3.5 B.2 allows a UUID in integer form under the ``2.25`` root; a name-based (SHA-1, version 5)
    UUID of the seed and parts makes it reproducible. ``pydicom.uid.generate_uid(prefix=None, ...)``
    can not be used for this: with ``prefix=None`` it ignores ``entropy_srcs`` and returns a random
    UUID4 (pydicom 3.0.2).
    """
    name = "\x1f".join(["dicomflow.samples", str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _study_uid(spec: SeriesSpec, seed: int) -> str:
    if spec.study.study_uid is not None:
        return spec.study.study_uid
    return derive_uid(seed, "study", spec.patient, spec.study)


def _series_uid(spec: SeriesSpec, seed: int) -> str:
    return derive_uid(seed, "series", _study_uid(spec, seed), spec.series_number, spec.description, spec.kind)


# ----------------------------------------------------------------------------------------- geometry

_ORIENTATION_VECTORS: Final[dict[Orientation, tuple[Vec3, Vec3]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


def _oblique_vectors() -> tuple[Vec3, Vec3]:
    """Axial tilted 20 degrees about left-right then rotated 10 degrees in-plane, like an AC-PC plan."""
    a, b = math.radians(20.0), math.radians(10.0)
    rot_x = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rot_z = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    m = rot_x @ rot_z
    # Rounded to 6 decimals (what is written to the DS strings), then re-orthonormalised so the
    # written vectors and the positions computed from them agree to well below a micrometre.
    row = np.round(m[:, 0], 6)
    col = np.round(m[:, 1] - row * float(row @ m[:, 1]), 6)
    return (float(row[0]), float(row[1]), float(row[2])), (float(col[0]), float(col[1]), float(col[2]))


def series_geometry(spec: SeriesSpec) -> SeriesGeometry:
    """Slice positions centred on ``spec.center_mm``, stepping along the normal by the slice spacing."""
    row_v, col_v = _oblique_vectors() if spec.orientation == "oblique" else _ORIENTATION_VECTORS[spec.orientation]
    row, col = np.array(row_v), np.array(col_v)
    normal = np.cross(row, col)
    dr, dc = spec.pixel_spacing
    step = spec.spacing_between_slices
    first = (
        np.array(spec.center_mm)
        - row * dc * (spec.columns - 1) / 2
        - col * dr * (spec.rows - 1) / 2
        - normal * step * (spec.slices - 1) / 2
    )
    positions = tuple(_vec(np.round(first + normal * step * k, 4)) for k in range(spec.slices))
    return SeriesGeometry(row_v, col_v, _vec(normal), positions, step)


def _vec(a: npt.NDArray[np.float64]) -> Vec3:
    return float(a[0]), float(a[1]), float(a[2])


# ------------------------------------------------------------------------------ timing and diffusion


def _acquisition_rank(spec: SeriesSpec) -> list[int]:
    """Position of each slice (spatial index) in the acquisition order of one volume."""
    n = spec.slices
    if spec.slice_order == "ascending":
        order = list(range(n))
    elif spec.slice_order == "descending":
        order = list(range(n - 1, -1, -1))
    else:
        order = [*range(0, n, 2), *range(1, n, 2)]
    rank = [0] * n
    for position, k in enumerate(order):
        rank[k] = position
    return rank


def slice_timing(spec: SeriesSpec) -> tuple[float, ...]:
    """Onset of each slice (by spatial index) within a volume, in seconds, for the EPI kinds.

    Empty for ``mr3d`` and ``ct``, which are acquired as a whole volume. This is what dcm2niix should
    report as BIDS ``SliceTiming`` (it derives it from AcquisitionTime for SIEMENS data).
    """
    if spec.kind not in ("mr4d", "dwi"):
        return ()
    per_slice = spec.tr_ms / 1000.0 / spec.slices
    return tuple(round(r * per_slice, 6) for r in _acquisition_rank(spec))


def _directions(count: int) -> list[Vec3]:
    """``count`` well-spread unit vectors on a hemisphere (a Fibonacci spiral), rounded for DICOM FD."""
    out: list[Vec3] = []
    golden = math.pi * (3.0 - math.sqrt(5.0))
    for i in range(count):
        z = 1.0 - (i + 0.5) / count
        r = math.sqrt(max(0.0, 1.0 - z * z))
        v = np.array([r * math.cos(golden * i), r * math.sin(golden * i), z])
        out.append(_vec(np.round(v / np.linalg.norm(v), 6)))
    return out


def diffusion_scheme(spec: SeriesSpec) -> tuple[tuple[float, Vec3], ...]:
    """(b-value, gradient direction in patient LPS) per volume of a ``dwi`` series; empty otherwise.

    Volume 0 is b=0 with a zero vector, as on scanners; the others cycle through ``spec.b_values``.
    """
    if spec.kind != "dwi":
        return ()
    n_dirs = spec.n_volumes - 1
    dirs = _directions(n_dirs)
    scheme: list[tuple[float, Vec3]] = [(0.0, (0.0, 0.0, 0.0))]
    scheme += [(float(spec.b_values[i % len(spec.b_values)]), dirs[i]) for i in range(n_dirs)]
    return tuple(scheme)


# ---------------------------------------------------------------------------------------- phantom


def phantom(spec: SeriesSpec, *, seed: int) -> npt.NDArray[np.int32]:
    """The real-world voxel values of a series, shape (echoes, volumes, slices, rows, columns).

    MR values are raw signal, CT values Hounsfield units (stored as value + 1024). Built in voxel
    index space, so it is the same for every orientation, and asymmetric along every axis so that a
    flip or transpose by the converter changes values. Volumes differ (a slow drift for ``mr4d``,
    b-value dependent attenuation for ``dwi``) and later echoes are darker, so mis-ordered volumes or
    echoes are caught too. The array is cached and read-only: benchmarks reuse it across series.
    """
    key = (
        spec.kind,
        spec.rows,
        spec.columns,
        spec.slices,
        spec.n_volumes,
        len(spec.echo_times),
        tuple(b for b, _ in diffusion_scheme(spec)),
        seed,
        spec.noise,
    )
    return _phantom_cached(key)


@functools.lru_cache(maxsize=16)
def _phantom_cached(
    key: tuple[Kind, int, int, int, int, int, tuple[float, ...], int, int],
) -> npt.NDArray[np.int32]:
    kind, rows, cols, slices, volumes, echoes, bvals, seed, noise = key
    k, r, c = np.meshgrid(
        np.linspace(-1.0, 1.0, slices),
        np.linspace(-1.0, 1.0, rows),
        np.linspace(-1.0, 1.0, cols),
        indexing="ij",
    )
    head = (c / 0.82) ** 2 + (r / 0.9) ** 2 + (k / 0.86) ** 2 <= 1.0
    inner = ((c - 0.3) / 0.22) ** 2 + ((r + 0.25) / 0.16) ** 2 + ((k - 0.15) / 0.35) ** 2 <= 1.0
    # Integer hash texture: version-independent, unlike an RNG stream.
    idx = np.arange(slices * rows * cols, dtype=np.uint64).reshape(slices, rows, cols)
    texture = (
        ((idx * np.uint64(2654435761) + np.uint64(seed % 2**31) * np.uint64(40503)) >> np.uint64(9)) % np.uint64(17)
    ).astype(np.int32)
    gradient = np.rint(120 * c + 60 * r + 40 * k).astype(np.int32)
    if kind == "ct":
        hu = np.full(head.shape, -1000, dtype=np.int32)
        hu[head] = 35 + gradient[head]
        hu[inner] = 700 + gradient[inner]
        base = hu + texture - 8
    else:
        base = np.where(head, 600 + gradient, 0) + np.where(inner, 700, 0) + texture * 3
        if noise:
            hashed = (idx * np.uint64(0x9E3779B1) + np.uint64(seed % 2**31) * np.uint64(97)) >> np.uint64(7)
            base = base + (hashed % np.uint64(2 * noise + 1)).astype(np.int32) + 40 - noise
    out = np.empty((echoes, volumes, slices, rows, cols), dtype=np.int32)
    for e in range(echoes):
        for v in range(volumes):
            if kind == "dwi":
                factor = 1.0 if bvals[v] == 0 else 0.35 + 0.05 * (v % 7) + 0.15 * math.exp(-bvals[v] / 2000)
            else:
                factor = 1.0 + 0.01 * (v % 25)  # bounded, so long runs stay within 12 bits
            factor *= 0.8**e
            out[e, v] = base if kind == "ct" else np.rint(base * factor).astype(np.int32)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=16)
def _slice_bytes(spec: SeriesSpec, seed: int) -> tuple[bytes, ...]:
    """Stored pixel bytes of every slice, cached so a benchmark writing many alike series reuses them."""
    values = phantom(spec, seed=seed)
    if spec.kind == "ct":
        stored: npt.NDArray[np.generic] = (values - _CT_INTERCEPT).astype("<i2")
    else:
        stored = np.clip(values, 0, 4095).astype("<u2")
    flat = stored.reshape(-1, spec.rows, spec.columns)
    return tuple(flat[i].tobytes() for i in range(flat.shape[0]))


def _pixel_bytes(spec: SeriesSpec, seed: int) -> tuple[bytes, ...]:
    # Only what shapes the phantom is kept, so series differing in UIDs, geometry or names share bytes.
    neutral = SeriesSpec(
        kind=spec.kind,
        rows=spec.rows,
        columns=spec.columns,
        slices=spec.slices,
        volumes=spec.n_volumes,
        echo_times_ms=spec.echo_times,
        b_values=spec.b_values,
        noise=spec.noise,
    )
    return _slice_bytes(neutral, seed)


# ----------------------------------------------------------------------------------------- writing


def _ds(value: float) -> str:
    """A DS string within the 16-character limit (pydicom warns on longer ones), micrometre precision."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("", "-0"):
        return "0"
    return text if len(text) <= 16 else format_number_as_ds(value)


def _tm(seconds: float) -> str:
    """A DICOM TM (HHMMSS.FFFFFF) for ``seconds`` after midnight."""
    micro = round(seconds * 1_000_000)
    hh, rest = divmod(micro, 3_600_000_000)
    mm, rest = divmod(rest, 60_000_000)
    ss, us = divmod(rest, 1_000_000)
    return f"{hh % 24:02d}{mm:02d}{ss:02d}.{us:06d}"


def _tm_seconds(tm: str) -> float:
    return int(tm[0:2]) * 3600 + int(tm[2:4]) * 60 + float(tm[4:] or 0)


@dataclass(frozen=True)
class _SeriesContext:
    spec: SeriesSpec
    study_uid: str
    series_uid: str
    frame_uid: str
    geometry: SeriesGeometry
    series_start_s: float
    timing: tuple[float, ...]
    scheme: tuple[tuple[float, Vec3], ...]


def _context(spec: SeriesSpec, seed: int) -> _SeriesContext:
    study_uid = _study_uid(spec, seed)
    return _SeriesContext(
        spec=spec,
        study_uid=study_uid,
        series_uid=_series_uid(spec, seed),
        # One frame of reference per study, as when the patient stays on the table.
        frame_uid=derive_uid(seed, "frame", study_uid),
        geometry=series_geometry(spec),
        series_start_s=_tm_seconds(spec.study.study_time) + 60.0 + _SERIES_SPACING_S * ((spec.series_number - 1) % 100),
        timing=slice_timing(spec),
        scheme=diffusion_scheme(spec),
    )


def _base_dataset(ctx: _SeriesContext) -> Dataset:
    """The attributes shared by every file of a series (patient, study, series, equipment, image)."""
    ds = Dataset()
    _patient_study_series(ds, ctx)
    if ctx.spec.kind == "ct":
        _ct_acquisition(ds, ctx.spec)
    else:
        _mr_acquisition(ds, ctx.spec)
    _image_plane_pixel(ds, ctx)
    return ds


def _patient_study_series(ds: Dataset, ctx: _SeriesContext) -> None:
    spec, study, patient = ctx.spec, ctx.spec.study, ctx.spec.patient
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(_KIND_DEFAULTS[spec.kind].image_type)
    ds.SOPClassUID = spec.sop_class_uid
    ds.StudyDate = study.study_date
    ds.SeriesDate = study.study_date
    ds.AcquisitionDate = study.study_date
    ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = _tm(ctx.series_start_s)
    ds.AccessionNumber = study.accession_number
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer_name
    ds.InstitutionName = study.institution_name
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.StationName = "DFSAMPLES01"
    ds.StudyDescription = study.description
    ds.SeriesDescription = spec.description
    ds.ManufacturerModelName = _KIND_DEFAULTS[spec.kind].model
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = _ds(spec.slice_thickness)
    ds.SoftwareVersions = "dicomflow-samples 1"
    ds.ProtocolName = spec.description
    ds.PatientPosition = "HFS"  # without it dcm2niix warns and cannot validate bvecs
    ds.StudyInstanceUID = ctx.study_uid
    ds.SeriesInstanceUID = ctx.series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = spec.series_number
    ds.FrameOfReferenceUID = ctx.frame_uid
    ds.PositionReferenceIndicator = ""


def _ct_acquisition(ds: Dataset, spec: SeriesSpec) -> None:
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(spec.pixel_spacing[1] * spec.columns)
    ds.GantryDetectorTilt = "0"
    ds.ConvolutionKernel = "Hr40"
    ds.XRayTubeCurrent = 200


def _mr_acquisition(ds: Dataset, spec: SeriesSpec) -> None:
    epi = spec.kind in ("mr4d", "dwi")
    ds.ScanningSequence = "EP" if epi else "GR\\IR"
    ds.SequenceVariant = "SK\\SS"
    ds.MRAcquisitionType = "2D" if epi else "3D"
    ds.SequenceName = {"mr3d": "*tfl3d1_16ns", "mr4d": "*epfid2d1_64", "dwi": "*ep_b0"}[spec.kind]
    ds.RepetitionTime = _ds(spec.tr_ms)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.25"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "3"
    ds.SpacingBetweenSlices = _ds(spec.spacing_between_slices)
    ds.EchoTrainLength = 1
    ds.FlipAngle = _ds(spec.flip_deg)
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.PercentPhaseFieldOfView = "100"


def _image_plane_pixel(ds: Dataset, ctx: _SeriesContext) -> None:
    spec, geometry = ctx.spec, ctx.geometry
    ds.ImageOrientationPatient = [_ds(x) for x in (*geometry.row_direction, *geometry.column_direction)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = [_ds(spec.pixel_spacing[0]), _ds(spec.pixel_spacing[1])]
    ds.BitsAllocated = 16
    if spec.kind == "ct":
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        ds.RescaleIntercept = str(_CT_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    else:
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "700"
        ds.WindowWidth = "1400"


def _instance_attributes(ctx: _SeriesContext, index: int, pixels: bytes) -> Dataset:
    """The attributes of file ``index`` (InstanceNumber - 1) that differ between files, and its file meta.

    Files are ordered echo-major, then volume, then slice: ``index = (echo * volumes + v) * slices + k``.
    """
    spec = ctx.spec
    slices, volumes = spec.slices, spec.n_volumes
    k = index % slices
    v = (index // slices) % volumes
    e = index // (slices * volumes)
    ds = Dataset()
    sop_uid = derive_uid(0, "sop", ctx.series_uid, index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(spec.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = v + 1  # one per volume, as Siemens numbers fMRI and DWI time points
    acq_s = ctx.series_start_s + v * spec.tr_ms / 1000.0 + (ctx.timing[k] if ctx.timing else 0.0)
    ds.AcquisitionTime = _tm(acq_s)
    ds.ContentTime = _tm(acq_s)
    ds.InstanceCreationDate = spec.study.study_date
    ds.InstanceCreationTime = _tm(acq_s + 1.0)
    if spec.kind != "ct":
        ds.EchoTime = _ds(spec.echo_times[e])
        ds.EchoNumbers = e + 1
    if ctx.scheme:
        bval, vec = ctx.scheme[v]
        ds.SequenceName = f"*ep_b{round(bval)}" + ("#1" if bval > 0 else "")
        ds.DiffusionBValue = bval
        ds.DiffusionDirectionality = "DIRECTIONAL" if bval > 0 else "NONE"
        if bval > 0:
            ds.DiffusionGradientOrientation = list(vec)
    position = ctx.geometry.positions[k]
    ds.ImagePositionPatient = [_ds(x) for x in position]
    ds.SliceLocation = _ds(float(np.dot(position, ctx.geometry.normal)))
    # OW explicitly: the ambiguous "OB or OW" can only be resolved next to BitsAllocated.
    ds.add_new(_PIXEL_DATA, "OW", pixels)
    return ds


def _instance(ctx: _SeriesContext, index: int, pixels: bytes) -> Dataset:
    """The complete dataset of file ``index``, file meta included."""
    varying = _instance_attributes(ctx, index, pixels)
    ds = _base_dataset(ctx)
    ds.update(varying)
    ds.file_meta = varying.file_meta
    return ds


class _SeriesEncoder:
    """Encodes the files of one series with pydicom, encoding the attributes they share only once.

    A file is the preamble, the file meta group and the data elements in tag order. The elements
    shared by every file of the series (about 80) come in runs between the per-file ones (about 15);
    each run is encoded once and reused, which makes writing several times faster than ``save_as``
    while producing the very same bytes (the tests compare the two).
    """

    def __init__(self, ctx: _SeriesContext) -> None:
        self._base = _base_dataset(ctx)
        self._charset = str(self._base.SpecificCharacterSet)
        self._runs: dict[tuple[int, ...], bytes] = {}

    def _write(self, fp: DicomBytesIO, source: Dataset, tags: tuple[int, ...]) -> None:
        for tag in tags:
            write_data_element(fp, source[tag], self._charset)

    def encode(self, varying: Dataset) -> bytes:
        """The bytes of the file made of the shared attributes and ``varying`` (which wins on a clash)."""
        fp = _le_explicit_buffer()
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, varying.file_meta, enforce_standard=True)
        own = {int(elem.tag) for elem in varying}
        tags = sorted(own | {int(elem.tag) for elem in self._base})
        for is_own, group in itertools.groupby(tags, key=own.__contains__):
            run = tuple(group)
            if is_own:
                self._write(fp, varying, run)
                continue
            if run not in self._runs:
                shared = _le_explicit_buffer()
                self._write(shared, self._base, run)
                self._runs[run] = bytes(shared.getvalue())
            fp.write(self._runs[run])
        return bytes(fp.getvalue())


def _le_explicit_buffer() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _file_name(naming: FileNaming, spec: SeriesSpec, number: int, sop_uid: str) -> str:
    if naming == "numbered":
        return f"IM-{spec.series_number:04d}-{number:04d}.dcm"
    if naming == "uid":
        return f"{sop_uid}.dcm"
    # Flat PACS exports name files by an opaque hash; 10 hex digits keep names unique in a mixed folder.
    return hashlib.sha256(sop_uid.encode("ascii")).hexdigest()[:10].upper()


def iter_datasets(spec: SeriesSpec, *, seed: int) -> Iterator[Dataset]:
    """The datasets of a series in InstanceNumber order, file meta included, without touching disk.

    :func:`write_series` writes exactly these (byte for byte what ``Dataset.save_as`` with
    ``enforce_file_format=True`` produces); use this to feed a FileSet, a network send or a test.
    """
    ctx = _context(spec, seed)
    pixels = _pixel_bytes(spec, seed)
    for index in range(spec.n_files):
        yield _instance(ctx, index, pixels[index])


def write_series(
    out_dir: Path,
    spec: SeriesSpec,
    *,
    seed: int,
    file_names: FileNaming = "numbered",
    shuffle: bool = False,
) -> WrittenSeries:
    """Write one series as single-frame DICOM files (Explicit VR Little Endian) into ``out_dir``.

    ``file_names``: ``numbered`` (``IM-<series>-<n>.dcm``), ``uid`` (``<SOPInstanceUID>.dcm``) or
    ``noext`` (opaque names without extension, like many PACS exports; unique across series so several
    can share one folder). ``shuffle`` decouples file order from slice order: numbered names are
    permuted and every naming is written in a seeded random order. Refuses to overwrite a file, so two
    series written into one folder never silently replace each other.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _context(spec, seed)
    pixels = _pixel_bytes(spec, seed)
    numbers = list(range(1, spec.n_files + 1))
    order = list(range(spec.n_files))
    if shuffle:
        rng = random.Random(f"dicomflow.samples:{seed}:{ctx.series_uid}")
        rng.shuffle(numbers)
        rng.shuffle(order)
    varying = [_instance_attributes(ctx, index, pixels[index]) for index in range(spec.n_files)]
    paths = [
        out_dir / _file_name(file_names, spec, numbers[index], str(ds.SOPInstanceUID))
        for index, ds in enumerate(varying)
    ]
    encoder = _SeriesEncoder(ctx)
    for index in order:
        with paths[index].open("xb") as fh:  # "x": never replace another series' file
            fh.write(encoder.encode(varying[index]))
    echoes = len(spec.echo_times)
    return WrittenSeries(
        spec=spec,
        folder=out_dir,
        series_uid=ctx.series_uid,
        study_uid=ctx.study_uid,
        frame_of_reference_uid=ctx.frame_uid,
        sop_class_uid=spec.sop_class_uid,
        paths=tuple(paths),
        expected_shape=spec.expected_shape,
        n_files=spec.n_files,
        output_suffixes=tuple(f"_e{e + 1}" for e in range(echoes)) if echoes > 1 else ("",),
        extra_outputs=("bval", "bvec") if spec.kind == "dwi" else (),
        bvals=tuple(b for b, _ in ctx.scheme),
    )


def corrupt_file(path: Path, mode: CorruptionMode = "short_pixel_data") -> None:
    """Damage one written file the way broken transfers do.

    ``short_pixel_data`` keeps a well-formed file whose PixelData holds half of Rows x Columns x 2
    bytes; ``truncated_file`` cuts the last 64 bytes off, so the PixelData element claims more than
    the file holds. dcm2niix 1.0.20260724 rejects both ("Warning: File not large enough to store
    image data: <path>"); on a folder holding only that series it converts nothing and exits 1.
    """
    data = path.read_bytes()
    if mode == "truncated_file":
        path.write_bytes(data[:-64])
        return
    ds = dcmread(path)
    pixels = ds.PixelData
    ds.PixelData = pixels[: len(pixels) // 2]
    ds.save_as(path, enforce_file_format=True)


# ------------------------------------------------------------------------------------ demo archive


def _sr_dataset(patient: Patient, study: Study, study_uid: str, seed: int, series_number: int) -> Dataset:
    """A minimal CT dose report (Comprehensive SR, no pixel data): a DICOM file converters must skip."""
    series_uid = derive_uid(seed, "sr-series", study_uid, series_number)
    sop_uid = derive_uid(seed, "sr-sop", series_uid)
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(COMPREHENSIVE_SR_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = COMPREHENSIVE_SR_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study.study_date
    ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = "SR"
    ds.Manufacturer = "SIEMENS"
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.SeriesDescription = "Dose_Report"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    title = Dataset()
    title.CodeValue = "113701"
    title.CodingSchemeDesignator = "DCM"
    title.CodeMeaning = "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = DicomSequence([title])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue = "121106"
    name.CodingSchemeDesignator = "DCM"
    name.CodeMeaning = "Comment"
    item.ConceptNameCodeSequence = DicomSequence([name])
    item.TextValue = "CTDIvol 42.0 mGy; DLP 780.0 mGy.cm (synthetic)"
    ds.ContentSequence = DicomSequence([item])
    return ds


_DEFAULT_DEMO_PATIENTS: Final = (
    Patient("DEMO^ALICE", "DEMO0001", "19700101", "F"),
    Patient("DEMO^BOB", "DEMO0002", "19650505", "M"),
    Patient("DEMO^CAROL", "DEMO0003", "19801212", "F"),
)

# A .DS_Store-like binary: Finder's "Bud1" magic followed by filler, enough to fool nothing.
_DS_STORE: Final = b"\x00\x00\x00\x01Bud1" + bytes(range(256)) * 8
_CORRUPT_HINT: Final = "File not large enough to store image data"
_SR_HINT: Final = "No valid DICOM images were found"


@dataclass
class _DemoBuilder:
    """Collects the manifest while :func:`make_demo_archive` writes the tree."""

    root: Path
    seed: int
    patients: tuple[Patient, ...]
    entries: list[DemoSeries] = field(default_factory=list)
    non_dicom: list[Path] = field(default_factory=list)

    def study(self, pt_index: int, session: int) -> Study:
        """Session 1 is a research MR, session 2 a head CT, session 3 a follow-up MR (PACS export)."""
        date, time, description = {
            1: ("20240115", "090000", "RESEARCH^BRAIN MRI"),
            2: ("20240116", "141500", "HEAD^CT"),
            3: ("20240612", "100000", "FOLLOWUP^BRAIN"),
        }[session]
        return Study(
            study_date=date,
            study_time=time,
            description=description,
            accession_number=f"ACC{pt_index + 1}{session:02d}0001",
            study_id=str(session),
        )

    def add(
        self,
        label: str,
        written: WrittenSeries,
        *,
        outcome: Outcome = "convert",
        exit_code: int = 0,
        hint: str | None = None,
    ) -> None:
        spec = written.spec
        self.entries.append(
            DemoSeries(
                label=label,
                kind=spec.kind,
                patient=spec.patient,
                series_uid=written.series_uid,
                study_uid=written.study_uid,
                sop_class_uid=written.sop_class_uid,
                series_number=spec.series_number,
                series_description=spec.description,
                folder=written.folder.relative_to(self.root),
                n_files=written.n_files,
                expected_shape=written.expected_shape if outcome == "convert" else None,
                outcome=outcome,
                extra_outputs=written.extra_outputs if outcome == "convert" else (),
                output_suffixes=written.output_suffixes if outcome == "convert" else (),
                dcm2niix_exit_code=exit_code,
                console_hint=hint,
            )
        )

    def nested(self, pt_index: int, session: int, spec: SeriesSpec) -> WrittenSeries:
        """``sub-NN/ses-NN/<series number>_<description>/IM-*.dcm``, in file name order."""
        spec = replace(spec, patient=self.patients[pt_index], study=self.study(pt_index, session))
        rel = Path(f"sub-{pt_index + 1:02d}", f"ses-{session:02d}")
        folder = self.root / rel / f"{spec.series_number:03d}_{spec.description}"
        return write_series(folder, spec, seed=self.seed, file_names="numbered")

    def non_dicom_file(self, rel: str, content: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        self.non_dicom.append(Path(rel))


def make_demo_archive(root: Path, *, seed: int = 0, patients: Sequence[Patient] | None = None) -> DemoArchive:
    """Build a small archive (about 1.5 MB, under a second) that exercises a converter end to end.

    Layout (no folder carries a patient's name or ID)::

        README.txt                               non-DICOM
        sub-01/.DS_Store                         non-DICOM
        sub-01/ses-01/001_T1w_MPRAGE/*.dcm       mr3d, sagittal
        sub-01/ses-01/002_fMRI_rest_bold/*.dcm   mr4d, axial, interleaved SliceTiming
        sub-01/ses-01/003_DWI_b1000/*.dcm        dwi, axial (+ .bval/.bvec)
        sub-01/ses-02/001_CT_Head/*.dcm          ct (+ a .DS_Store in the folder)
        sub-01/ses-02/900_Dose_Report/*.dcm      SR without pixels: dcm2niix skips it (exit 2)
        sub-02/ses-01/001_T1w_MPRAGE/*.dcm       mr3d, oblique
        sub-02/ses-01/002_fMRI_rest_bold/*.dcm   mr4d
        sub-02/ses-01/003_DWI_b1000/*.dcm        dwi, oblique
        sub-02/ses-01/004_GRE_multiecho/*.dcm    mr3d, 2 echoes: outputs _e1 and _e2
        sub-02/ses-01/005_T2w_TSE/*.dcm          mr3d with one corrupt file: dcm2niix fails (exit 1)
        sub-02/ses-02/001_CT_Head/*.dcm          ct, coronal reformat
        sub-03/DICOMDIR + PT000000/ST00000N/...  a CD-style export written by pydicom's FileSet
        pacs_export/<10 hex digits>              3 series of 2 patients, no extension, shuffled,
                                                 plus a zero-byte file

    The DICOMDIR sits in its own patient folder because a conformant one needs File IDs of at most
    8 upper-case letters, digits or underscores per component, which ``ses-01`` and ``*.dcm`` are not.
    ``patients`` (3 entries) replaces the demo identities, e.g. with :func:`phi_patient` values.
    The same seed gives byte-identical trees.
    """
    root = Path(root).resolve()  # the DICOMDIR writer compares absolute paths
    pts = tuple(patients) if patients is not None else _DEFAULT_DEMO_PATIENTS
    if len(pts) != 3:
        raise ValueError("make_demo_archive needs exactly 3 patients")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    root.mkdir(parents=True, exist_ok=True)
    demo = _DemoBuilder(root, seed, pts)
    for p in (0, 1):
        sub = f"sub-{p + 1:02d}"
        for session, spec in (
            (
                1,
                SeriesSpec(
                    kind="mr3d",
                    series_number=1,
                    rows=40,
                    columns=36,
                    slices=16,
                    orientation="sagittal" if p == 0 else "oblique",
                    pixel_spacing=(1.2, 1.1),
                    slice_thickness=1.5,
                ),
            ),
            (1, SeriesSpec(kind="mr4d", series_number=2, slices=10, volumes=5)),
            (
                1,
                SeriesSpec(
                    kind="dwi",
                    series_number=3,
                    slices=8,
                    volumes=7,
                    orientation="axial" if p == 0 else "oblique",
                ),
            ),
            (
                2,
                SeriesSpec(
                    kind="ct",
                    series_number=1,
                    rows=48,
                    columns=48,
                    slices=12,
                    orientation="axial" if p == 0 else "coronal",
                    pixel_spacing=(0.5, 0.5),
                    slice_thickness=2.0,
                ),
            ),
        ):
            demo.add(f"{sub}/ses-{session:02d}/{spec.description}", demo.nested(p, session, spec))
    # Patient 2 also has a multi-echo GRE and a series with one corrupt file.
    gre = SeriesSpec(
        kind="mr3d",
        series_number=4,
        series_description="GRE_multiecho",
        slices=10,
        echo_times_ms=(4.92, 7.38),
        repetition_time_ms=650.0,
        flip_angle_deg=60.0,
    )
    demo.add("sub-02/ses-01/GRE_multiecho", demo.nested(1, 1, gre))
    t2 = demo.nested(
        1,
        1,
        SeriesSpec(
            kind="mr3d",
            series_number=5,
            series_description="T2w_TSE",
            orientation="coronal",
            slices=10,
            repetition_time_ms=5000.0,
            echo_times_ms=(98.0,),
            flip_angle_deg=150.0,
        ),
    )
    corrupt_file(t2.paths[len(t2.paths) // 2], "short_pixel_data")
    demo.add("sub-02/ses-01/T2w_TSE", t2, outcome="fail", exit_code=1, hint=_CORRUPT_HINT)
    _write_dose_report(demo)
    _write_pacs_export(demo)
    dicomdir = _write_cd_export(demo)
    demo.non_dicom_file(
        "README.txt",
        b"Synthetic DICOM demo archive generated by dicomflow.samples.\n"
        b"All patients are fictitious. Non-DICOM files are here on purpose.\n",
    )
    demo.non_dicom_file("sub-01/.DS_Store", _DS_STORE)
    demo.non_dicom_file("sub-01/ses-02/001_CT_Head/.DS_Store", _DS_STORE)
    return DemoArchive(
        root=root,
        series=tuple(demo.entries),
        non_dicom_files=tuple(sorted(demo.non_dicom)),
        dicomdir=dicomdir,
        tree_exit_code=8,
    )


def _release_staging(fileset: FileSet) -> None:
    """Delete the staging TemporaryDirectory a pydicom 3.0 FileSet creates and never cleans up.

    Left alone it is only removed by a finaliser at garbage collection, with a ResourceWarning that
    ``filterwarnings = error`` turns into a test failure. There is no public API for this.
    """
    stage = getattr(fileset, "_stage", None)
    staging = stage.get("t") if isinstance(stage, dict) else None
    if isinstance(staging, tempfile.TemporaryDirectory):
        staging.cleanup()


def _write_dose_report(demo: _DemoBuilder) -> None:
    """A dose report next to the CT of patient 1: a DICOM file, but nothing to convert."""
    patient, study = demo.patients[0], demo.study(0, 2)
    study_uid = _study_uid(SeriesSpec(patient=patient, study=study), demo.seed)
    sr = _sr_dataset(patient, study, study_uid, demo.seed, 900)
    folder = demo.root / "sub-01" / "ses-02" / "900_Dose_Report"
    folder.mkdir(parents=True)
    sr.save_as(folder / "SR-0900-0001.dcm", enforce_file_format=True)
    demo.entries.append(
        DemoSeries(
            label="sub-01/ses-02/Dose_Report",
            kind="sr",
            patient=patient,
            series_uid=str(sr.SeriesInstanceUID),
            study_uid=study_uid,
            sop_class_uid=COMPREHENSIVE_SR_STORAGE,
            series_number=900,
            series_description="Dose_Report",
            folder=folder.relative_to(demo.root),
            n_files=1,
            expected_shape=None,
            outcome="skip",
            output_suffixes=(),
            dcm2niix_exit_code=2,
            console_hint=_SR_HINT,
        )
    )


def _write_pacs_export(demo: _DemoBuilder) -> None:
    """A flat PACS export mixing series of two patients, opaque names without extension, shuffled."""
    pacs = demo.root / "pacs_export"
    for pt_index, spec in (
        (0, SeriesSpec(kind="mr3d", series_number=11, series_description="T1w_followup", slices=12)),
        (
            0,
            SeriesSpec(
                kind="mr4d",
                series_number=12,
                series_description="bold_followup",
                slices=8,
                volumes=3,
                slice_order="ascending",
            ),
        ),
        (
            1,
            SeriesSpec(
                kind="ct",
                series_number=13,
                series_description="CT_followup",
                slices=10,
                pixel_spacing=(0.6, 0.6),
            ),
        ),
    ):
        full = replace(spec, patient=demo.patients[pt_index], study=demo.study(pt_index, 3))
        written = write_series(pacs, full, seed=demo.seed, file_names="noext", shuffle=True)
        demo.add(f"pacs_export/{full.description}", written)
    # An interrupted download: a zero-byte file named like its neighbours.
    demo.non_dicom_file("pacs_export/0000000000", b"")


def _write_cd_export(demo: _DemoBuilder) -> Path:
    """Two studies of patient 3 written by :class:`pydicom.fileset.FileSet`, with a DICOMDIR."""
    patient = demo.patients[2]
    specs = (
        SeriesSpec(
            kind="mr3d",
            series_number=1,
            series_description="T1w_outside",
            orientation="coronal",
            slices=10,
            patient=patient,
            study=Study(
                study_date="20231103",
                study_time="080000",
                description="OUTSIDE^MRI",
                accession_number="ACC3010001",
                study_id="1",
            ),
        ),
        SeriesSpec(
            kind="ct",
            series_number=2,
            series_description="CT_outside",
            slices=8,
            patient=patient,
            study=Study(
                study_date="20231104",
                study_time="113000",
                description="OUTSIDE^CT",
                accession_number="ACC3020001",
                study_id="2",
            ),
        ),
    )
    fileset = FileSet()
    fileset.ID = "DFSAMPLE"
    fileset.UID = UID(derive_uid(demo.seed, "fileset", patient))
    for spec in specs:
        for ds in iter_datasets(spec, seed=demo.seed):
            fileset.add(ds)
    target = demo.root / "sub-03"
    target.mkdir()
    fileset.write(target)
    _release_staging(fileset)
    for spec in specs:
        ctx = _context(spec, demo.seed)
        folders = {Path(inst.path).parent for inst in fileset.find(SeriesInstanceUID=ctx.series_uid)}
        if len(folders) != 1:
            raise RuntimeError("FileSet split one series over several folders")
        demo.entries.append(
            DemoSeries(
                label=f"sub-03/{spec.description}",
                kind=spec.kind,
                patient=patient,
                series_uid=ctx.series_uid,
                study_uid=ctx.study_uid,
                sop_class_uid=spec.sop_class_uid,
                series_number=spec.series_number,
                series_description=spec.description,
                folder=folders.pop().relative_to(demo.root),
                n_files=spec.n_files,
                expected_shape=spec.expected_shape,
                outcome="convert",
            )
        )
    return (target / "DICOMDIR").relative_to(demo.root)


# ---------------------------------------------------------------------------------------- benchmark


def make_bench_archive(
    root: Path, *, series: int, slices: int, rows: int, cols: int, seed: int, noise: int = 0
) -> list[WrittenSeries]:
    """``series`` single-volume MR series, one per folder ``root/series-NNNN``, for throughput tests.

    All series share one patient, study and phantom (the pixel bytes are computed once and reused),
    so generation cost is the DICOM encoding and the disk writes. Each series has its own series
    number, SeriesInstanceUID and SOP Instance UIDs, so they are distinct series to any converter.
    """
    if series < 1:
        raise ValueError("series must be at least 1")
    patient = Patient("BENCH^SUBJECT", "BENCH0001", "19900101", "O")
    study = Study(description="BENCH^THROUGHPUT", accession_number="BENCH0001")
    out: list[WrittenSeries] = []
    for i in range(series):
        spec = SeriesSpec(
            kind="mr3d",
            rows=rows,
            columns=cols,
            slices=slices,
            series_number=i % 9999 + 1,
            series_description=f"bench_{i + 1:04d}",
            noise=noise,
            patient=patient,
            study=study,
        )
        out.append(write_series(root / f"series-{i + 1:04d}", spec, seed=seed, file_names="numbered"))
    return out
