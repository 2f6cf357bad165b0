"""The de-identification profile on real outputs of the pinned dcm2niix (docs/privacy.md).

Series carry a distinctive value in every Basic Profile attribute the generator can write (patient, study,
people, institution, device, dates and times, free text incl. ImageComments, SeriesDescription,
ProtocolName, StudyDescription) and sit in folders and files named after the patient. They are converted
with dicomflow's flags (adapters/dcm2niix.Dcm2niixConverter: -z y -b y -ba y), then put through the
profile the way the worker must (`deidentify_outputs` below): identifiers read from the DICOM files, the
output name from `series_stem`, mirrored folders from `scrub_rel_dirs`, sidecars through `filter_sidecar`,
NIfTI headers through `scrub_nifti`. Output names, sidecars, bval/bvec and decompressed NIfTI headers are
then searched for every planted value: 0 hits. The same search on dcm2niix's raw outputs finds planted
values, so the search is not vacuous.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from dicomflow.adapters.dcm2niix import Dcm2niixConverter, binary_path
from dicomflow.adapters.dicom_identifiers import read_identifiers
from dicomflow.adapters.nifti_text import gzip_nifti, header_text, scrub_nifti
from dicomflow.domain.privacy import (
    ALWAYS_DROPPED_SIDECAR_KEYS,
    DEFAULT_SIDECAR_KEYS,
    Identifiers,
    filter_sidecar,
    scrub_rel_dirs,
    scrub_text,
    series_stem,
)
from dicomflow.domain.series import ConversionOptions
from dicomflow.samples import SeriesSpec
from tests.support.phi_series import PlantedSeries, write_phi_series

pytestmark = pytest.mark.integration

KEY = b"destination secret"
CLEAN_DESCRIPTION = "ep2d_DTI_20_dir_AP"


def deidentify_outputs(
    series: PlantedSeries, converter: Dcm2niixConverter, work: Path, dest: Path, options: ConversionOptions
) -> tuple[str, list[Path]]:
    """What the worker must do for one series: (the output stem, the files published under `dest`)."""
    identifiers = read_identifiers([series.files[0], series.files[-1]])
    stem = series_stem(series.series_number, series.description, "MR", identifiers)
    run = converter.convert(series.folder, work, stem, options)
    assert run.exit_code == 0, run.console
    published = []
    for output in run.outputs:
        final = output
        if output.name.endswith(".json"):
            sidecar = json.loads(output.read_text(encoding="utf-8"))
            clean = filter_sidecar(sidecar, identifiers)
            output.write_text(json.dumps(clean, indent="\t", ensure_ascii=False) + "\n", encoding="utf-8")
        elif output.name.endswith(".nii"):
            scrub_nifti(output)  # in place, microseconds
            final = gzip_nifti(output)
        elif output.name.endswith(".nii.gz"):
            scrub_nifti(output)  # rewritten when dcm2niix left text to remove
        target = dest / final.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(final, target)
        published.append(target)
    return stem, published


def hits(needles: tuple[str, ...], data: bytes) -> list[str]:
    lowered = data.lower()
    return [n for n in needles if n.lower().encode() in lowered]


def shared_bytes(path: Path) -> bytes:
    """What a recipient can read in a file that is not voxel data: its whole text, or a NIfTI's header."""
    if path.name.endswith(".nii.gz"):
        with gzip.open(path) as fh:
            head = fh.read(1 << 16)
        return head[: _vox_offset(head)]
    if path.name.endswith(".nii"):
        head = path.read_bytes()[: 1 << 16]
        return head[: _vox_offset(head)]
    return path.read_bytes()


def _vox_offset(head: bytes) -> int:
    import struct

    return int(struct.unpack_from("<f", head, 108)[0])


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PlantedSeries]:
    root = tmp_path_factory.mktemp("phi") / "source"
    return {
        "bold": write_phi_series(root, SeriesSpec(kind="mr4d", series_number=7, slices=6, volumes=3), seed=1, mark="A"),
        "dwi": write_phi_series(
            root,
            SeriesSpec(kind="dwi", series_number=9, slices=6, volumes=4),
            seed=1,
            mark="B",
            description=CLEAN_DESCRIPTION,
        ),
        "ct": write_phi_series(root, SeriesSpec(kind="ct", series_number=2, slices=5), seed=1, mark="C"),
    }


@pytest.fixture(scope="module")
def converter() -> Dcm2niixConverter:
    return Dcm2niixConverter(timeout_seconds=120)


@pytest.fixture(scope="module")
def published(
    planted: dict[str, PlantedSeries], converter: Dcm2niixConverter, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, tuple[str, list[Path]]]]:
    base = tmp_path_factory.mktemp("out")
    source_root = next(iter(planted.values())).folder.parents[2]
    pairs = [(str(s.folder.parent.relative_to(source_root)), read_identifiers(s.files[:1])) for s in planted.values()]
    mirrored = scrub_rel_dirs(pairs, key=KEY)
    dest_root = base / "dest"
    result = {}
    for label, series in planted.items():
        dest = dest_root / mirrored[str(series.folder.parent.relative_to(source_root))]
        result[label] = deidentify_outputs(series, converter, base / "work" / label, dest, ConversionOptions())
    return dest_root, result


def test_nothing_planted_reaches_names_sidecars_or_nifti_headers(
    planted: dict[str, PlantedSeries], published: tuple[Path, dict[str, tuple[str, list[Path]]]]
) -> None:
    dest_root, outputs = published
    everything = tuple(sorted({n for s in planted.values() for n in s.needles}))
    files = sorted(p for p in dest_root.rglob("*") if p.is_file())
    assert len(files) == sum(len(paths) for _, paths in outputs.values()) >= 7  # nii+json x3, bval, bvec
    leaks = {}
    for path in files:
        name_hits = hits(everything, str(path.relative_to(dest_root)).encode())
        content_hits = hits(everything, shared_bytes(path))
        if name_hits or content_hits:
            leaks[str(path.relative_to(dest_root))] = (name_hits, content_hits)
    assert leaks == {}


def test_the_search_finds_what_dcm2niix_alone_leaves(
    planted: dict[str, PlantedSeries], converter: Dcm2niixConverter, tmp_path: Path
) -> None:
    """Without the profile, -ba y still leaves ImageComments, institution, station, device serial number,
    StudyDescription and the free-text descriptions in the sidecar, ImageComments in aux_file and the time
    of day in descrip: the search above would see them."""
    series = planted["bold"]
    run = converter.convert(series.folder, tmp_path, "raw", ConversionOptions(compress=False))
    sidecar = next(p for p in run.outputs if p.suffix == ".json").read_bytes()
    nifti = next(p for p in run.outputs if p.suffix == ".nii")
    assert len(hits(series.needles, sidecar)) >= 8
    text = header_text(nifti.read_bytes()[:352])
    assert hits(series.needles, text["aux_file"].encode())
    assert "Time=" in text["descrip"]


def test_sidecars_hold_only_allowed_keys_and_keep_what_analysis_needs(
    published: tuple[Path, dict[str, tuple[str, list[Path]]]],
) -> None:
    _, outputs = published
    for _, paths in outputs.values():
        for sidecar in (p for p in paths if p.suffix == ".json"):
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            assert set(data) <= DEFAULT_SIDECAR_KEYS
            assert not set(data) & ALWAYS_DROPPED_SIDECAR_KEYS
            for key in ("Modality", "Manufacturer", "ManufacturersModelName", "SeriesNumber", "ImageType"):
                assert key in data, (sidecar.name, key)
    bold = json.loads(next(p for p in outputs["bold"][1] if p.suffix == ".json").read_text(encoding="utf-8"))
    for key in ("RepetitionTime", "EchoTime", "FlipAngle", "SliceTiming", "MagneticFieldStrength", "PhaseEncodingAxis"):
        assert key in bold, key
    assert bold["SeriesDescription"] == "ep2d_bold_AP"  # the planted name, accession number and date are gone


def test_a_description_without_identifiers_survives_intact(
    planted: dict[str, PlantedSeries], published: tuple[Path, dict[str, tuple[str, list[Path]]]]
) -> None:
    _, outputs = published
    stem, paths = outputs["dwi"]
    assert stem == f"9_{CLEAN_DESCRIPTION}"
    sidecar = json.loads(next(p for p in paths if p.suffix == ".json").read_text(encoding="utf-8"))
    assert sidecar["SeriesDescription"] == CLEAN_DESCRIPTION
    assert sidecar["ProtocolName"] == CLEAN_DESCRIPTION
    assert {p.name for p in paths} >= {f"{stem}.nii.gz", f"{stem}.json", f"{stem}.bval", f"{stem}.bvec"}


def test_mirrored_folders_are_named_without_the_patient(
    planted: dict[str, PlantedSeries], published: tuple[Path, dict[str, tuple[str, list[Path]]]]
) -> None:
    dest_root, _ = published
    folders = {p.relative_to(dest_root).parent.as_posix() for p in dest_root.rglob("*") if p.is_file()}
    assert len(folders) == len(planted)  # one folder per patient study, none merged
    for folder in folders:
        assert re.fullmatch(r"anon-[0-9a-f]{10}/MRI-[0-9a-f]{10}", folder), folder


def test_the_identifiers_read_from_disk_scrub_every_planted_identifier(planted: dict[str, PlantedSeries]) -> None:
    series = planted["bold"]
    identifiers = read_identifiers(series.files[:1])
    assert identifiers
    assert scrub_text(series.description, identifiers) == "ep2d_bold_AP"
    unreadable = series.folder.parent / "not-dicom.txt"
    unreadable.write_text("hello")
    try:
        assert not read_identifiers([unreadable])
    finally:
        unreadable.unlink()


def test_uncompressed_conversion_then_gzip_keeps_voxels_byte_identical(
    planted: dict[str, PlantedSeries], converter: Dcm2niixConverter, tmp_path: Path
) -> None:
    """The cheap strategy (dcm2niix -z n, patch in place, gzip_nifti) and dcm2niix's own .nii.gz, rewritten
    by scrub_nifti, hold the same voxel bytes as dcm2niix wrote them, and the same clean header."""
    series = planted["dwi"]
    compressed = converter.convert(series.folder, tmp_path / "z", "s", ConversionOptions(compress=True))
    plain = converter.convert(series.folder, tmp_path / "n", "s", ConversionOptions(compress=False))
    gz_out = next(p for p in compressed.outputs if p.name.endswith(".nii.gz"))
    nii_out = next(p for p in plain.outputs if p.name.endswith(".nii"))
    original = gzip.decompress(gz_out.read_bytes())
    scrub_nifti(gz_out)
    scrub_nifti(nii_out)
    rezipped = gzip_nifti(nii_out, threads=2)
    first, second = gzip.decompress(gz_out.read_bytes()), gzip.decompress(rezipped.read_bytes())
    vox = _vox_offset(original)
    assert first == second
    assert first[vox:] == original[vox:]
    assert first[:vox] != original[:vox]  # the header did change: the time of day left descrip


def test_every_allow_listed_key_is_one_the_pinned_dcm2niix_can_write() -> None:
    """Sidecar keys change between dcm2niix releases (DESIGN.md §9): the allow-list is checked against the
    strings of the pinned binary, so a key renamed by an upgrade shows up here, not as a missing field."""
    binary = binary_path().read_bytes()
    written = {m.decode() for m in re.findall(rb'"([A-Za-z][A-Za-z0-9_]*)": ', binary)}
    assert DEFAULT_SIDECAR_KEYS - written == set()


def test_dcm2niix_warnings_are_scrubbed_like_descriptions(planted: dict[str, PlantedSeries]) -> None:
    """dcm2niix quotes the protocol name in some warnings ("GE Reorienting %s : please validate"); the
    worker stores warnings, so it scrubs each line with the series' identifiers first."""
    series = planted["bold"]
    identifiers: Identifiers = read_identifiers(series.files[:1])
    line = f"Warning: GE Reorienting {series.description} : please validate"
    assert not hits(series.needles, scrub_text(line, identifiers).encode())
