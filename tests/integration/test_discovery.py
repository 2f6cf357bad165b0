"""Series discovery on real scanner files (shipped inside the nibabel and pydicom wheels) and on files
damaged on purpose: empty, truncated, not DICOM, DICOMDIR, no preamble, very long headers."""

from __future__ import annotations

import errno
import gzip
import http.client
import shutil
from io import BytesIO
from pathlib import Path

import nibabel
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomflow.adapters.dicom_headers import (
    PREFIX_BYTES,
    SequentialScanner,
    ShortRead,
    ThreadedScanner,
    parse_header,
    scan_one,
)
from dicomflow.adapters.local.files import LocalFolderSource
from dicomflow.domain.failures import SourceNotFound, TransientError
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.series import DicomHeader, FileRef, Ignored, IgnoredKind, group_series
from dicomflow.samples import SeriesSpec, phi_patient, write_series

pytestmark = pytest.mark.integration

NIBABEL_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _scan(path: Path) -> object:
    data = path.read_bytes()
    return scan_one(lambda n: data[:n], len(data))


def _real(name: str, tmp_path: Path) -> Path:
    source = NIBABEL_DATA / name
    if source.suffix == ".gz":
        target = tmp_path / source.stem
        with gzip.open(source, "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        return target
    return source


@pytest.mark.parametrize(
    ("name", "series_number", "sop_class"),
    [
        ("siemens_dwi_0.dcm.gz", 12, "1.2.840.10008.5.1.4.1.1.4"),
        ("siemens_dwi_1000.dcm.gz", 12, "1.2.840.10008.5.1.4.1.1.4"),
        ("philips_mprage.dcm.gz", 301, ENHANCED_MR),
        ("csa_slice_norm.dcm", 8, "1.2.840.10008.5.1.4.1.1.4"),
    ],
)
def test_real_scanner_files_are_read_from_their_prefix(
    name: str, series_number: int, sop_class: str, tmp_path: Path
) -> None:
    result = _scan(_real(name, tmp_path))
    assert isinstance(result, DicomHeader)
    assert (result.series_number, result.sop_class_uid, result.modality) == (series_number, sop_class, "MR")


def test_the_siemens_dwi_pair_is_one_series(tmp_path: Path) -> None:
    files = [_real(n, tmp_path) for n in ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz")]
    scanned = [(FileRef(str(p), p.name, p.stat().st_size), _scan(p)) for p in files]
    groups = group_series([(ref, h) for ref, h in scanned if isinstance(h, DicomHeader)])
    assert len(groups) == 1 and len(groups[0].files) == 2


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"", IgnoredKind.EMPTY),
        (b"hello, this is a README\n", IgnoredKind.NOT_DICOM),
        (b"\x00\x00\x01\x00Bud1" + b"\x00" * 4000, IgnoredKind.NOT_DICOM),  # a .DS_Store
    ],
)
def test_files_that_are_not_dicom_are_ignored_with_a_reason(content: bytes, kind: IgnoredKind) -> None:
    result = scan_one(lambda n: content[:n], len(content))
    assert isinstance(result, Ignored) and result.kind is kind


def test_a_file_cut_inside_its_header_is_truncated() -> None:
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()[:600]  # type: ignore[arg-type]
    result = scan_one(lambda n: data[:n], len(data))
    assert isinstance(result, Ignored) and result.kind in (IgnoredKind.TRUNCATED, IgnoredKind.UNREADABLE)


def test_a_file_cut_inside_its_pixels_is_still_discovered(tmp_path: Path) -> None:
    # Grouping reads headers only; dcm2niix reports the missing pixels later, per series.
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()  # type: ignore[arg-type]
    cut = data[: len(data) - 1000]
    assert isinstance(scan_one(lambda n: cut[:n], len(cut)), DicomHeader)


def test_files_without_preamble_or_meta_are_read() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    buffer = BytesIO()
    del ds.file_meta
    ds.preamble = None
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    data = buffer.getvalue()
    assert data[128:132] != b"DICM"
    result = scan_one(lambda n: data[:n], len(data))
    assert isinstance(result, DicomHeader) and result.series_uid == ds.SeriesInstanceUID


def test_dicomdir_is_not_a_series() -> None:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.preamble = b"\x00" * 128
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert parse_header(buffer.getvalue(), complete=True) == Ignored(IgnoredKind.DICOMDIR)


def test_a_header_longer_than_the_prefix_is_read_further(tmp_path: Path) -> None:
    (written,) = [write_series(tmp_path / "s", SeriesSpec(kind="ct", slices=2), seed=1).paths[0]]
    ds = pydicom.dcmread(written)
    # A huge element before group 0x0020 pushes SeriesInstanceUID beyond the first 64 KiB.
    ds.add_new((0x0019, 0x0010), "LO", "BIGVENDOR")
    ds.add_new((0x0019, 0x1001), "OB", b"\x00" * (PREFIX_BYTES * 3))
    ds.save_as(written)
    reads: list[int] = []
    data = written.read_bytes()

    def read(n: int) -> bytes:
        reads.append(n)
        return data[:n]

    result = scan_one(read, len(data))
    assert isinstance(result, DicomHeader) and result.series_uid == ds.SeriesInstanceUID
    assert reads[0] == PREFIX_BYTES and len(reads) == 2


def test_a_series_description_loses_exactly_the_patients_identifiers(tmp_path: Path) -> None:
    patient = phi_patient("DESC")
    family, given = patient.name.split("^")[:2]
    spec = SeriesSpec(kind="ct", slices=2, patient=patient,
                      series_description=f"head {patient.patient_id} {given} axial_{family}")  # fmt: skip
    written = write_series(tmp_path / "s", spec, seed=2)
    result = _scan(written.paths[0])
    assert isinstance(result, DicomHeader) and result.series_description == "head axial"
    for value in (patient.patient_id, given, family):
        assert value.lower() not in result.series_description.lower()


def test_folders_are_recorded_as_keyed_scrubs_never_by_name(tmp_path: Path) -> None:
    patient = phi_patient("FOLD")
    family = patient.name.split("^")[0]
    written = write_series(tmp_path / "s", SeriesSpec(kind="ct", slices=2, patient=patient), seed=4)
    data = written.paths[0].read_bytes()
    result = scan_one(lambda n: data[:n], len(data), folder=["exports", f"{family}_exam"], key=b"k" * 32)
    assert isinstance(result, DicomHeader)
    names = [f.name for f in result.folders]
    assert names[0] == "exports" and family.lower() not in names[1].lower() and names[1].startswith("exam-")
    other_key = scan_one(lambda n: data[:n], len(data), folder=["exports", f"{family}_exam"], key=b"j" * 32)
    assert isinstance(other_key, DicomHeader) and other_key.folders[1].name != names[1]  # the tag is keyed


def test_folder_listing_and_scanners_agree(tmp_path: Path) -> None:
    root = tmp_path / "src"
    write_series(root / "a" / "b", SeriesSpec(kind="ct", slices=3), seed=3, file_names="noext")
    (root / "a" / "notes.txt").write_text("not dicom")
    (root / "empty.dcm").write_bytes(b"")
    (root / ".dicomflow").mkdir()
    (root / ".dicomflow" / "state.sqlite").write_bytes(b"x")  # our own state is never listed
    source = LocalFolderSource()
    location = Location(LocationKind.LOCAL, str(root))
    refs = sorted((r for r in source.list_files(location) if isinstance(r, FileRef)), key=lambda r: r.path)
    assert [r.path for r in refs][-2:] == ["a/notes.txt", "empty.dcm"]
    assert len(refs) == 5
    sequential = SequentialScanner().scan(source, refs)
    threaded = ThreadedScanner(4).scan(source, refs)
    assert sequential == threaded
    assert sum(isinstance(r, DicomHeader) for r in sequential) == 3


def test_series_of_two_patients_in_one_folder_are_scrubbed_each_with_its_own_identifiers(tmp_path: Path) -> None:
    # A chunk's scan scrubs each (identifiers, description, folder) once and reuses it for the series' other
    # files; two patients' series with the same description in one folder must not share a scrub.
    root = tmp_path / "src"
    for seed, (patient, number) in enumerate((("SMITH^ANNA", 1), ("JONES^BOB", 2))):
        spec = SeriesSpec(kind="ct", slices=3, series_number=number, series_description="SMITH_T1_AP")
        written = write_series(root / "import_SMITH", spec, seed=seed, file_names="noext")
        for path in written.paths:
            dataset = pydicom.dcmread(path)
            dataset.PatientName = patient
            dataset.save_as(path)
    source = LocalFolderSource()
    location = Location(LocationKind.LOCAL, str(root))
    refs = sorted((r for r in source.list_files(location) if isinstance(r, FileRef)), key=lambda r: r.path)
    key = b"k" * 32
    scanned = SequentialScanner(key).scan(source, refs)
    alone = [SequentialScanner(key).scan(source, [ref])[0] for ref in refs]  # no scrub shared
    assert scanned == alone == ThreadedScanner(4, key).scan(source, refs)
    headers = [h for h in scanned if isinstance(h, DicomHeader)]
    by_number = {h.series_number: h for h in headers}
    assert by_number[1].series_description == "T1_AP"  # Smith's series: his name removed
    assert by_number[2].series_description == "SMITH_T1_AP"  # Jones' identifiers do not know "SMITH"
    assert by_number[1].folders != by_number[2].folders  # the folder's name scrubbed per patient


def _wheel_dicom_files() -> list[Path]:
    roots = [Path(pydicom.__file__).parent / "data" / "test_files", Path(nibabel.__file__).parent]
    found = [
        p
        for root in roots
        for p in root.rglob("*")
        if p.is_file() and (p.suffix in (".dcm", "") or p.name.endswith(".dcm.gz"))
    ]
    return sorted(found)


@pytest.mark.parametrize("path", _wheel_dicom_files(), ids=lambda p: p.name)
def test_fast_reader_agrees_with_pydicom_on_every_shipped_file(path: Path) -> None:
    """The fast header reader must give exactly pydicom's answer, or defer to pydicom."""
    from dicomflow.adapters.dicom_headers import NeedMore, _parse_with_pydicom

    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    for prefix, complete in ((data, True), (data[:PREFIX_BYTES], len(data) <= PREFIX_BYTES)):
        try:
            ours: object = parse_header(prefix, complete=complete)
        except NeedMore:
            ours = "need more"
        if isinstance(ours, Ignored) and ours.kind in (IgnoredKind.NOT_DICOM, IgnoredKind.EMPTY):
            continue  # not a DICOM file at all (README, .dump, ...): pydicom's guess does not matter
        try:
            theirs: object = _parse_with_pydicom(prefix, complete=complete, has_preamble=prefix[128:132] == b"DICM")
        except NeedMore:
            theirs = "need more"
        if isinstance(ours, Ignored) and isinstance(theirs, Ignored):
            continue  # both refuse the file (the reason may be worded differently)
        assert ours == theirs


# --- a failed read is never a fact about the file (issue 9) ------------------------------------------


def _mr_small() -> bytes:
    return Path(get_testdata_file("MR_small.dcm")).read_bytes()  # type: ignore[arg-type]


def test_a_short_read_of_a_longer_file_is_retried_not_taken_for_its_end() -> None:
    """A dropped connection returning the first 600 bytes of a 9 KB file: the old reader called the file
    truncated and dropped it from its series."""
    data = _mr_small()
    with pytest.raises(ShortRead) as info:
        scan_one(lambda n: data[:600], len(data))
    assert not info.value.permanent


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OSError(errno.EIO, "I/O error"), True),
        (TimeoutError(errno.ETIMEDOUT, "timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (PermissionError(errno.EACCES, "denied"), False),
        (FileNotFoundError(errno.ENOENT, "gone"), False),
    ],
)
def test_read_errors_that_may_pass_are_retried_and_refusals_are_unreadable(error: OSError, transient: bool) -> None:
    def read(_n: int) -> bytes:
        raise error

    if transient:
        with pytest.raises(TransientError):
            scan_one(read, 5000)
    else:
        result = scan_one(read, 5000)
        assert isinstance(result, Ignored) and result.kind is IgnoredKind.UNREADABLE
        assert result.kind is not IgnoredKind.NOT_DICOM and result.detail in ("permission denied", "no longer exists")


def test_a_source_error_nobody_classified_fails_the_scan_instead_of_dropping_the_file(tmp_path: Path) -> None:
    class Flaky(LocalFolderSource):
        def read_prefix(self, ref: FileRef, size: int) -> bytes:
            raise http.client.IncompleteRead(b"partial")

    path = tmp_path / "x.dcm"
    path.write_bytes(_mr_small())
    ref = FileRef(str(path), "x.dcm", path.stat().st_size)
    with pytest.raises(http.client.IncompleteRead):
        SequentialScanner().scan(Flaky(), [ref])


def test_a_file_deleted_or_unshared_on_the_source_is_unreadable() -> None:
    def read(_n: int) -> bytes:
        raise SourceNotFound("file x was not found")

    result = scan_one(read, 5000)
    assert isinstance(result, Ignored) and result.kind is IgnoredKind.UNREADABLE


def test_the_identifier_tags_privacy_needs_are_read_by_both_readers() -> None:
    """Read (to recognise identifiers elsewhere), never returned in the header discovery keeps."""
    from dicomflow.adapters.dicom_fastscan import read_fast

    data = _written_with_identifiers()
    fast = read_fast(data).values
    ds = pydicom.dcmread(BytesIO(data))
    expected = {
        "accession_number": ds.AccessionNumber,
        "institution_name": ds.InstitutionName,
        "referring_physician_name": str(ds.ReferringPhysicianName),
        "station_name": ds.StationName,
        "study_description": ds.StudyDescription,
        "study_date": ds.StudyDate,
        "series_date": ds.SeriesDate,
        "acquisition_date": ds.AcquisitionDate,
        "study_id": ds.StudyID,
        "institution_address": ds.InstitutionAddress,
        "institutional_department_name": ds.InstitutionalDepartmentName,
        "performing_physician_name": str(ds.PerformingPhysicianName),
        "operators_name": str(ds.OperatorsName),
        "other_patient_names": str(ds.OtherPatientNames),
        "patient_birth_name": str(ds.PatientBirthName),
    }
    assert {k: fast.get(k) for k in expected} == expected
    from dicomflow.adapters.dicom_headers import _values_from_dataset

    slow = _values_from_dataset(pydicom.filereader.read_partial(BytesIO(data), stop_when=None))
    assert {k: slow.get(k) for k in expected} == expected
    header = parse_header(data, complete=True)
    assert isinstance(header, DicomHeader) and "ZZBIRTH" not in repr(header)


def _written_with_identifiers() -> bytes:
    ds = pydicom.dcmread(BytesIO(_mr_small()))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = "ACC123"
    ds.InstitutionName = "ZZ HOSPITAL"
    ds.InstitutionAddress = "1 ZZ Street"
    ds.ReferringPhysicianName = "ZZREF^DOC"
    ds.StationName = "ZZSTATION"
    ds.StudyDescription = "ZZ study"
    ds.InstitutionalDepartmentName = "ZZ radiology"
    ds.PerformingPhysicianName = "ZZPERF^DOC"
    ds.OperatorsName = "ZZOPER^TECH"
    ds.OtherPatientNames = "ZZOTHER^NAME"
    ds.PatientBirthName = "ZZBIRTH^NAME"
    ds.StudyDate, ds.SeriesDate, ds.AcquisitionDate = "20240101", "20240102", "20240103"
    ds.StudyID = "STUDY7"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
