"""No volume is ever lost (issue 9): for every kind of series that makes dcm2niix write several volumes,
for one series in each transfer syntax, and for every DICOM file shipped with pydicom and nibabel,
dicomflow's converter adapter collects as many volumes as dcm2niix run by hand on the same files (same
flags, its own naming), with identical voxels, under names that do not depend on file order.

Files are grouped the way discovery groups them — (SeriesInstanceUID, SOPClassUID) from the header
reader — and each group is handed to dcm2niix as a folder of links, as LocalFolderSource.fetch does.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path

import dcm2niix
import nibabel
import numpy as np
import pydicom
import pytest

from dicomflow.adapters.dcm2niix import Dcm2niixConverter
from dicomflow.adapters.dicom_headers import scan_one
from dicomflow.domain.conversion import Classified, assess
from dicomflow.domain.failures import DicomflowError
from dicomflow.domain.series import ConversionOptions, DicomHeader, FileRef, group_series
from tests.conftest import require
from tests.support import dicom_kinds

pytestmark = pytest.mark.integration

CONVERTER = Dcm2niixConverter(timeout_seconds=120)


def by_hand(folder: Path, out: Path) -> list[Path]:
    """dcm2niix as a person runs it: dicomflow's flags minus the naming (its default -f and -w 2). What
    it writes before crashing does not count: a person would not trust it either."""
    out.mkdir(parents=True)
    args = [dcm2niix.bin, "-z", "y", "-b", "y", "-ba", "y", "-d", "0", "-o", str(out), str(folder)]
    done = subprocess.run(args, capture_output=True, timeout=120, check=False)
    if done.returncode < 0 or done.returncode > 128:  # e.g. "free(): invalid pointer" on odd test files
        return []
    return sorted(p for p in out.iterdir() if p.name.endswith((".nii.gz", ".nii")))


def voxels(path: Path) -> str:
    """A digest of a NIfTI's image: shape, type, voxel bytes and affine (names and sidecars aside)."""
    image = nibabel.load(path)
    data = np.asarray(image.dataobj)  # type: ignore[attr-defined]
    digest = hashlib.sha256(f"{data.shape}|{data.dtype}|".encode())
    digest.update(data.tobytes())
    digest.update(np.round(image.affine, 4).tobytes())  # type: ignore[attr-defined]
    return digest.hexdigest()


def group(paths: Sequence[Path]) -> list[tuple[str, list[Path]]]:
    """(output stem, files) per series, exactly as discovery groups and names them."""
    pairs = []
    for path in paths:
        data = path.read_bytes()
        header = scan_one(lambda n, data=data: data[:n], len(data))
        if isinstance(header, DicomHeader):
            pairs.append((FileRef(str(path), path.name, len(data)), header))
    return [(g.output_stem, [Path(f.ref) for f in g.files]) for g in group_series(pairs)]


def linked(files: Sequence[Path], folder: Path, *, reverse: bool = False) -> Path:
    """A folder of links to `files`, named by position (like LocalFolderSource.fetch); `reverse` names
    them in the opposite order, so dcm2niix meets them in another order."""
    folder.mkdir(parents=True)
    ordered = list(reversed(files)) if reverse else list(files)
    for index, path in enumerate(ordered):
        (folder / f"{index:06d}.dcm").symlink_to(path.resolve())
    return folder


def as_dcm2niix_asks(files: Sequence[Path], folder: Path) -> Path:
    """The files as a person gives them to dcm2niix after reading its advice: deflated data sets inflated
    ("Unsupported transfer syntax ... inflate files with 'dcmconv +te'"), the others as they are."""
    folder.mkdir(parents=True)
    for index, path in enumerate(files):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's notes on the odd files shipped as its test data
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        target = folder / f"{index:06d}.dcm"
        if str(ds.file_meta.get("TransferSyntaxUID", "")) == pydicom.uid.DeflatedExplicitVRLittleEndian:
            ds = pydicom.dcmread(path)
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            ds.save_as(target, enforce_file_format=True)
        else:
            target.symlink_to(path.resolve())
    return folder


def dicomflow(files: Sequence[Path], stem: str, work: Path, *, reverse: bool = False) -> tuple[Classified, Path]:
    run = CONVERTER.convert(linked(files, work / "in", reverse=reverse), work / "out", stem, ConversionOptions())
    return assess(run, files=len(files)), work / "out"


def compare_with_dcm2niix(paths: Sequence[Path], work: Path) -> int:
    """Convert each series both ways; the same number of volumes with the same voxels. Returns the count."""
    total = 0
    for number, (stem, files) in enumerate(group(paths)):
        hand = by_hand(as_dcm2niix_asks(files, work / f"hand{number}" / "in"), work / f"hand{number}" / "out")
        try:
            result, out = dicomflow(files, stem, work / f"ours{number}")
        except DicomflowError as exc:
            # A refusal (a data error, an unsupported syntax, dcm2niix crashing on the file) is allowed
            # only where dcm2niix by hand makes nothing either.
            assert hand == [], f"dicomflow refused a series dcm2niix converts ({exc.code}: {exc.reason})"
            continue
        ours = sorted(out / f for v in result.volumes for f in v.files if f.endswith((".nii.gz", ".nii")))
        assert len(ours) == len(hand), f"{stem}: dicomflow {[p.name for p in ours]} vs by hand {[p.name for p in hand]}"
        assert sorted(map(voxels, ours)) == sorted(map(voxels, hand))
        total += len(ours)
    return total


# --- multi-output kinds ------------------------------------------------------------------------------

EXPECTED_VOLUMES = {
    "multi_echo": 3,
    "magnitude_phase": 2,
    "real_imaginary": 2,
    "philips_fieldmap": 2,
    "several_series_numbers": 2,
    "classic_and_enhanced": 2,  # one per copy: discovery makes them two series (DESIGN.md §9)
    "enhanced_multi_frame": 1,
}


@pytest.mark.parametrize("kind", sorted(dicom_kinds.KINDS))
def test_every_volume_of_a_multi_output_series_is_collected(kind: str, tmp_path: Path) -> None:
    written = dicom_kinds.KINDS[kind](tmp_path / "dicom")
    assert compare_with_dcm2niix(written.paths, tmp_path / "work") == EXPECTED_VOLUMES[kind]


@pytest.mark.parametrize("kind", ["several_series_numbers", "philips_fieldmap"])
def test_clashing_volumes_get_the_same_names_whatever_order_dcm2niix_meets_them(kind: str, tmp_path: Path) -> None:
    written = dicom_kinds.KINDS[kind](tmp_path / "dicom")
    ((stem, files),) = group(written.paths)
    named = []
    for reverse in (False, True):
        result, out = dicomflow(files, stem, tmp_path / f"run-{reverse}", reverse=reverse)
        named.append({f: voxels(out / f) for v in result.volumes for f in v.files if f.endswith(".nii.gz")})
    assert named[0] == named[1]
    assert sorted(named[0]) == [f"{stem}.nii.gz", f"{stem}a.nii.gz"]
    assert len(set(named[0].values())) == 2  # two different volumes, not one twice


def test_the_lower_series_number_keeps_the_plain_name(tmp_path: Path) -> None:
    written = dicom_kinds.several_series_numbers(tmp_path / "dicom")
    ((stem, files),) = group(written.paths)
    result, out = dicomflow(files, stem, tmp_path / "run")
    numbers = {v.name: json.loads((out / f"{v.name}.json").read_text())["SeriesNumber"] for v in result.volumes}
    assert numbers == {stem: 9, f"{stem}a": 10}


# --- transfer syntaxes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The voxels of the uncompressed series (explicit VR little endian), converted by hand."""
    root = tmp_path_factory.mktemp("reference")
    written = dicom_kinds.in_transfer_syntax(root / "dicom", pydicom.uid.ExplicitVRLittleEndian)
    (nifti,) = by_hand(written.folder, root / "out")
    return voxels(nifti)


@pytest.mark.parametrize("syntax", dicom_kinds.TRANSFER_SYNTAXES, ids=lambda s: pydicom.uid.UID(s).name)
def test_each_transfer_syntax_is_discovered_and_converted_like_dcm2niix_does(
    syntax: str, reference: str, tmp_path: Path
) -> None:
    if syntax in dicom_kinds.IMAGECODECS_SYNTAXES:
        require(importlib.util.find_spec("imagecodecs") is not None, "imagecodecs (test extra) is not installed")
    written = dicom_kinds.in_transfer_syntax(tmp_path / "dicom", syntax)
    assert pydicom.dcmread(written.paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    ((stem, files),) = group(written.paths)  # discovery read every header
    assert len(files) == len(written.paths)
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        # dcm2niix 1.0.20260724 does not inflate ("Unsupported transfer syntax"): by hand it writes
        # nothing, dicomflow inflates and converts the same image as the uncompressed series.
        assert by_hand(written.folder, tmp_path / "hand") == []
        result, out = dicomflow(files, stem, tmp_path / "ours")
        (volume,) = result.volumes
        assert voxels(out / f"{volume.name}.nii.gz") == reference
        assert all(p.read_bytes()[128:132] == b"DICM" for p in written.paths)  # the input was left alone
        return
    assert compare_with_dcm2niix(written.paths, tmp_path / "work") == 1
    if syntax not in dicom_kinds.LOSSY:
        _result, out = dicomflow(files, stem, tmp_path / "again")
        assert voxels(out / f"{stem}.nii.gz") == reference  # lossless: decoded to the very same image


def test_a_deflated_header_is_read_beyond_the_first_prefix(tmp_path: Path) -> None:
    """A deflated dataset whose header is longer than the first read: inflated piece by piece."""
    written = dicom_kinds.in_transfer_syntax(tmp_path / "dicom", pydicom.uid.DeflatedExplicitVRLittleEndian)
    ds = pydicom.dcmread(written.paths[0])
    ds.add_new((0x0009, 0x0010), "LO", "BIGVENDOR")
    ds.add_new((0x0009, 0x1001), "OB", np.random.default_rng(1).bytes(200_000))  # does not compress
    ds.save_as(written.paths[0], enforce_file_format=True)
    data = written.paths[0].read_bytes()
    reads: list[int] = []

    def read(n: int) -> bytes:
        reads.append(n)
        return data[:n]

    header = scan_one(read, len(data))
    assert isinstance(header, DicomHeader) and header.series_uid == ds.SeriesInstanceUID
    assert len(reads) == 2


# --- every real DICOM file shipped with pydicom and nibabel ------------------------------------------


def _shipped_dicom(tmp: Path) -> list[Path]:
    roots = [Path(pydicom.__file__).parent / "data" / "test_files", Path(nibabel.__file__).parent]
    found = []
    for path in sorted(p for root in roots for p in root.rglob("*") if p.is_file()):
        if path.name.endswith(".dcm.gz"):
            target = tmp / "gunzipped" / path.name.removesuffix(".gz")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(gzip.decompress(path.read_bytes()))
            found.append(target)
        elif path.suffix in (".dcm", ""):
            found.append(path)
    return found


def test_every_shipped_dicom_series_gives_dcm2niix_own_volumes(tmp_path: Path) -> None:
    paths = _shipped_dicom(tmp_path)
    series = group(paths)
    assert len(series) >= 40  # the wheels' test data: a guard against silently scanning nothing
    total = compare_with_dcm2niix(paths, tmp_path / "work")
    assert total >= 40


# --- a folder that changes while dcm2niix reads it ---------------------------------------------------


def test_a_file_added_to_a_source_folder_during_conversion_is_a_change_not_a_data_error(tmp_path: Path) -> None:
    """The folder is used in place (it holds exactly the series); a file copied in while dcm2niix runs
    shows in dcm2niix's file listing, which is retried — unlike the image count, which multi-frame data
    legitimately exceeds."""
    from dicomflow.adapters.local.files import LocalFolderSource
    from dicomflow.domain.failures import SeriesChanged

    written = dicom_kinds.multi_echo(tmp_path / "series")
    refs = [FileRef(str(p), p.name, p.stat().st_size) for p in written.paths]
    folder = LocalFolderSource().fetch(refs, tmp_path / "scratch")
    assert folder == written.folder  # read in place
    late = dicom_kinds.several_series_numbers(tmp_path / "late").paths[0]
    (folder / "late.dcm").write_bytes(late.read_bytes())  # arrives "during" the conversion
    run = CONVERTER.convert(folder, tmp_path / "out", "5_T1", ConversionOptions())
    with pytest.raises(SeriesChanged) as info:
        assess(run, files=len(refs))
    assert not info.value.permanent
