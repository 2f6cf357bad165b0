"""The synthetic DICOM generator, checked against the real dcm2niix and nibabel.

Why: every other integration test, the demo and the benchmarks trust these series. So we prove that
dcm2niix rebuilds them into NIfTI volumes with the expected shape, that every DICOM pixel lands on
the voxel with the same world position and the phantom's value (dcm2niix flips the DICOM row axis,
so world positions are compared, never raw affines), that DWI gradients and EPI slice timing come
through, that the sidecar is anonymised, and that the demo archive's manifest tells the truth,
including for the corrupt series.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import dcm2niix
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from dicomflow import samples
from dicomflow.samples import (
    CT_IMAGE_STORAGE,
    KINDS,
    MR_IMAGE_STORAGE,
    ORIENTATIONS,
    DemoArchive,
    SeriesSpec,
    WrittenSeries,
)

pytestmark = pytest.mark.integration

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
PHI_MARKERS = ("ZZPHI", "PHIID", "19010203")


def convert(in_dir: Path, out_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run the pinned dcm2niix with the flags dicomflow uses."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [dcm2niix.bin, "-z", "y", "-b", "y", "-ba", "y", "-f", "%s_%d", "-w", "1", "-o", str(out_dir)]
    return subprocess.run([*args, str(in_dir)], capture_output=True, text=True, timeout=120, check=False)


def outputs(out_dir: Path, suffix: str = "") -> dict[str, Path]:
    """The single output of a folder (or of one echo): its .nii.gz, .json and, if any, .bval/.bvec."""
    niis = sorted(out_dir.glob(f"*{suffix}.nii.gz"))
    assert len(niis) == 1, f"expected one NIfTI ending {suffix!r}, got {niis}"
    stem = niis[0].name.removesuffix(".nii.gz")
    return {p.name.removeprefix(stem + "."): p for p in out_dir.iterdir() if p.name.startswith(stem + ".")}


def pixel_world_lps(ds: pydicom.Dataset) -> np.ndarray:
    """World (LPS, mm) position of every pixel centre of a DICOM slice, shape (rows, cols, 3)."""
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    d_row, d_col = (float(x) for x in ds.PixelSpacing)
    r = np.arange(ds.Rows, dtype=float)[:, None, None]
    c = np.arange(ds.Columns, dtype=float)[None, :, None]
    world: np.ndarray = ipp + c * d_col * iop[:3] + r * d_row * iop[3:]
    return world


def check_series(written: WrittenSeries, out_dir: Path, seed: int) -> None:
    """Shape, geometry, voxel values, sidecar, gradients and slice timing of every output."""
    spec = written.spec
    expected = samples.phantom(spec, seed=seed)
    timing = samples.slice_timing(spec)
    scheme = samples.diffusion_scheme(spec)
    for echo, suffix in enumerate(written.output_suffixes):
        files = outputs(out_dir, suffix)
        img: Any = nib.load(files["nii.gz"])
        assert img.shape == written.expected_shape
        data = np.asanyarray(img.dataobj)
        if data.ndim == 3:
            data = data[..., None]
        inv = np.linalg.inv(img.affine)
        k_of_slice: dict[int, int] = {}
        slice_axes: set[int] = set()
        for index, path in enumerate(written.paths):
            if index // (spec.slices * spec.n_volumes) != echo:
                continue
            k, v = index % spec.slices, (index // spec.slices) % spec.n_volumes
            ds = pydicom.dcmread(path)
            stored = ds.pixel_array.astype(np.int64)
            real = stored * int(ds.get("RescaleSlope", 1)) + int(ds.get("RescaleIntercept", 0))
            np.testing.assert_array_equal(real, expected[echo, v, k])
            ijk = pixel_world_lps(ds) * LPS_TO_RAS @ inv[:3, :3].T + inv[:3, 3]
            idx = np.rint(ijk).astype(int)
            assert np.abs(ijk - idx).max() < 0.02, "DICOM pixel centres must fall on NIfTI voxel centres"
            assert np.all(idx >= 0)
            assert np.all(idx < np.array(img.shape[:3]))
            # A DICOM slice is one NIfTI plane: k, or another axis when dcm2niix reoriented a 3D scan.
            constant = [a for a in range(3) if np.unique(idx[..., a]).size == 1]
            assert len(constant) == 1, "a DICOM slice must be exactly one NIfTI plane"
            slice_axes.add(constant[0])
            k_of_slice[k] = int(idx[0, 0, constant[0]])
            nifti_values = data[idx[..., 0], idx[..., 1], idx[..., 2], v]
            np.testing.assert_allclose(nifti_values, expected[echo, v, k], atol=1e-3)
        assert sorted(k_of_slice.values()) == list(range(spec.slices))
        # dcm2niix orders a reoriented 3D scan's axes as R, A, S: the slice axis is the normal's.
        normal = samples.series_geometry(spec).normal
        assert slice_axes == {int(np.argmax(np.abs(normal))) if spec.kind == "mr3d" else 2}
        check_sidecar(written, files["json"], echo, timing, k_of_slice)
        if scheme:
            check_gradients(files, img.affine, scheme)
        else:
            assert "bval" not in files
            assert "bvec" not in files


def check_sidecar(
    written: WrittenSeries, path: Path, echo: int, timing: tuple[float, ...], k_of_slice: dict[int, int]
) -> None:
    spec = written.spec
    text = path.read_text(encoding="utf-8")
    sidecar = json.loads(text)
    for key in ("PatientName", "PatientID", "PatientBirthDate"):
        assert key not in sidecar
    for marker in (spec.patient.name, spec.patient.patient_id, spec.patient.birth_date):
        assert marker not in text
    assert sidecar["Modality"] == spec.modality
    assert sidecar["SeriesNumber"] == spec.series_number
    if spec.kind != "ct":
        assert sidecar["RepetitionTime"] == pytest.approx(spec.tr_ms / 1000)
        assert sidecar["EchoTime"] == pytest.approx(spec.echo_times[echo] / 1000)
        assert sidecar["FlipAngle"] == pytest.approx(spec.flip_deg)
    if timing:
        nifti_timing = sidecar["SliceTiming"]
        assert len(nifti_timing) == spec.slices
        for k, k_nifti in k_of_slice.items():
            # dcm2niix derives it from AcquisitionTime in single precision: a few ms of rounding.
            assert nifti_timing[k_nifti] == pytest.approx(timing[k], abs=0.01)


def check_gradients(files: dict[str, Path], affine: np.ndarray, scheme: tuple[Any, ...]) -> None:
    """The .bval matches and each .bvec column is the LPS gradient expressed on the voxel axes (FSL)."""
    bvals = np.loadtxt(files["bval"], ndmin=1)
    bvecs = np.loadtxt(files["bvec"], ndmin=2)
    np.testing.assert_allclose(bvals, [b for b, _ in scheme])
    axes_ras = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    axes_lps = axes_ras * LPS_TO_RAS[:, None]
    for t, (_, g) in enumerate(scheme):
        vox = axes_lps.T @ np.array(g)
        if np.linalg.det(affine[:3, :3]) > 0:  # FSL's convention: x is flipped for a radiological affine
            vox[0] = -vox[0]
        np.testing.assert_allclose(bvecs[:, t], vox, atol=2e-3)


def spec_for(kind: samples.Kind, orientation: samples.Orientation, **changes: Any) -> SeriesSpec:
    """A small non-square, anisotropic series, so swapped axes or spacings cannot pass unnoticed."""
    volumes = {"mr3d": None, "ct": None, "mr4d": 3, "dwi": 5}[kind]
    spec = SeriesSpec(
        kind=kind,
        orientation=orientation,
        rows=20,
        columns=24,
        slices=6,
        volumes=volumes,
        pixel_spacing=(2.0, 2.5),
        slice_thickness=2.0,
        slice_gap=0.5,
        series_number=7,
        b_values=(800.0, 2000.0),
        patient=samples.phi_patient("MATRIX"),
    )
    return replace(spec, **changes)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_dcm2niix_rebuilds_every_kind_and_orientation(
    kind: samples.Kind, orientation: samples.Orientation, tmp_path: Path
) -> None:
    spec = spec_for(kind, orientation)
    written = samples.write_series(tmp_path / "in", spec, seed=5, file_names="numbered", shuffle=True)
    assert written.n_files == len(written.paths) == spec.slices * spec.n_volumes
    result = convert(tmp_path / "in", tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    check_series(written, tmp_path / "out", seed=5)


@pytest.mark.parametrize("kind", ["mr3d", "mr4d"])
def test_multi_echo_is_split_into_one_output_per_echo(kind: samples.Kind, tmp_path: Path) -> None:
    spec = spec_for(kind, "oblique", echo_times_ms=(4.92, 7.38))
    written = samples.write_series(tmp_path / "in", spec, seed=1, file_names="uid")
    assert written.output_suffixes == ("_e1", "_e2")
    result = convert(tmp_path / "in", tmp_path / "out")
    assert result.returncode == 0, result.stdout
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 2
    check_series(written, tmp_path / "out", seed=1)


@pytest.mark.parametrize("file_names", ["numbered", "uid", "noext"])
def test_file_naming_and_shuffling_do_not_change_the_volume(file_names: samples.FileNaming, tmp_path: Path) -> None:
    spec = spec_for("mr4d", "axial")
    written = samples.write_series(tmp_path / "in", spec, seed=3, file_names=file_names, shuffle=True)
    names = [p.name for p in written.paths]
    assert len(set(names)) == len(names)
    if file_names == "noext":
        assert all("." not in n for n in names)
    else:
        assert all(n.endswith(".dcm") for n in names)
    if file_names == "numbered":
        assert names != sorted(names), "shuffled numbered names must not follow slice order"
    result = convert(tmp_path / "in", tmp_path / "out")
    assert result.returncode == 0, result.stdout
    check_series(written, tmp_path / "out", seed=3)


@pytest.mark.parametrize("kind", KINDS)
def test_files_carry_consistent_dicom_geometry_and_identity(kind: samples.Kind, tmp_path: Path) -> None:
    spec = spec_for(kind, "oblique")
    written = samples.write_series(tmp_path, spec, seed=9, file_names="uid")
    geometry = samples.series_geometry(spec)
    datasets = [pydicom.dcmread(p) for p in written.paths]
    sop_uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(sop_uids) == written.n_files
    assert {ds.FrameOfReferenceUID for ds in datasets} == {written.frame_of_reference_uid}
    assert {ds.SeriesInstanceUID for ds in datasets} == {written.series_uid}
    assert written.sop_class_uid == (CT_IMAGE_STORAGE if kind == "ct" else MR_IMAGE_STORAGE)
    for index, ds in enumerate(datasets):
        assert ds.InstanceNumber == index + 1
        assert ds.SOPClassUID == written.sop_class_uid
        assert ds.file_meta.MediaStorageSOPClassUID == written.sop_class_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality == ("CT" if kind == "ct" else "MR")
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
            assert len(uid) <= 64
            assert UID_RE.match(uid)
        if kind == "ct":
            assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([ds.ImagePositionPatient for ds in datasets[: spec.slices]], dtype=float)
    np.testing.assert_allclose(np.diff(positions, axis=0), np.tile(normal * 2.5, (spec.slices - 1, 1)), atol=1e-3)
    np.testing.assert_allclose(positions, geometry.positions, atol=1e-4)
    locations = [float(ds.SliceLocation) for ds in datasets[: spec.slices]]
    np.testing.assert_allclose(locations, positions @ normal, atol=1e-3)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_same_seed_gives_byte_identical_files_and_another_seed_new_uids(tmp_path: Path) -> None:
    spec = spec_for("dwi", "oblique")
    a = samples.write_series(tmp_path / "a", spec, seed=11, file_names="noext", shuffle=True)
    b = samples.write_series(tmp_path / "b", spec, seed=11, file_names="noext", shuffle=True)
    c = samples.write_series(tmp_path / "c", spec, seed=12, file_names="noext", shuffle=True)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert a.series_uid == b.series_uid != c.series_uid
    assert not set(tree_digest(tmp_path / "a")) & set(tree_digest(tmp_path / "c"))


def test_phi_patient_plants_distinctive_values() -> None:
    patient = samples.phi_patient("X7")
    assert (patient.name, patient.patient_id, patient.birth_date) == ("ZZPHI^X7", "PHIIDX7", "19010203")


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "mr3d", "volumes": 3},
        {"kind": "dwi", "volumes": 1},
        {"kind": "ct", "echo_times_ms": (2.0, 4.0)},
        {"rows": 1},
        {"orientation": "diagonal"},
    ],
)
def test_specs_that_cannot_convert_cleanly_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SeriesSpec(**changes)


# ------------------------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoArchive:
    root = tmp_path_factory.mktemp("demo") / "archive"
    patients = [samples.phi_patient(tag) for tag in ("A", "B", "C")]
    return samples.make_demo_archive(root, seed=0, patients=patients)


def test_demo_archive_is_small_and_free_of_phi_in_paths(demo: DemoArchive) -> None:
    files = [p for p in demo.root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 15 * 1024 * 1024
    for path in demo.root.rglob("*"):
        rel = str(path.relative_to(demo.root))
        assert not any(marker in rel for marker in PHI_MARKERS), rel
    assert {p.parts[0] for p in (s.folder for s in demo.series)} == {
        "sub-01",
        "sub-02",
        "sub-03",
        "pacs_export",
    }
    kinds = {s.kind for s in demo.series if s.folder.parts[0] in ("sub-01", "sub-02")}
    assert {"mr3d", "mr4d", "dwi", "ct"} <= kinds
    assert {s.outcome for s in demo.series} == {"convert", "fail", "skip"}


def test_demo_non_dicom_files_and_dicomdir(demo: DemoArchive) -> None:
    for rel in demo.non_dicom_files:
        path = demo.root / rel
        assert path.is_file()
        assert path.read_bytes()[128:132] != b"DICM"
    assert any((demo.root / rel).stat().st_size == 0 for rel in demo.non_dicom_files)
    assert demo.dicomdir is not None
    # Read the DICOMDIR records directly: pydicom's FileSet leaks a temporary directory.
    dicomdir = pydicom.dcmread(demo.root / demo.dicomdir)
    assert dicomdir.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    images = [r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    cd_series = [s for s in demo.series if s.folder.parts[0] == "sub-03"]
    assert len(images) == sum(s.n_files for s in cd_series)
    series_uids = set()
    for record in images:
        file_id = record.ReferencedFileID
        path = (demo.root / demo.dicomdir).parent.joinpath(*([file_id] if isinstance(file_id, str) else file_id))
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPInstanceUID == record.ReferencedSOPInstanceUIDInFile
        series_uids.add(ds.SeriesInstanceUID)
    assert series_uids == {s.series_uid for s in cd_series}


def test_demo_pacs_export_mixes_series_without_extensions(demo: DemoArchive) -> None:
    pacs = [s for s in demo.series if s.folder == Path("pacs_export")]
    assert len(pacs) >= 3
    names = [p.name for p in (demo.root / "pacs_export").iterdir()]
    assert all("." not in n for n in names)
    series_in_listing_order = [
        pydicom.dcmread(demo.root / "pacs_export" / n, stop_before_pixels=True).SeriesInstanceUID
        for n in sorted(names)
        if (demo.root / "pacs_export" / n).stat().st_size
    ]
    switches = sum(a != b for a, b in itertools.pairwise(series_in_listing_order))
    assert switches > len(pacs), "series must be interleaved in the folder listing"


def test_every_demo_folder_converts_as_the_manifest_says(demo: DemoArchive, tmp_path: Path) -> None:
    folders = sorted({s.folder for s in demo.series})
    for n, folder in enumerate(folders):
        expected = [s for s in demo.series if s.folder == folder]
        out = tmp_path / f"out{n}"
        result = convert(demo.root / folder, out)
        console = result.stdout + result.stderr
        assert {s.dcm2niix_exit_code for s in expected} == {result.returncode}, (folder, console)
        for s in expected:
            if s.console_hint is not None:
                assert s.console_hint in console
        niis = sorted(out.glob("*.nii.gz"))
        assert len(niis) == sum(len(s.output_suffixes) for s in expected), (folder, niis)
        for s in expected:
            if s.outcome != "convert":
                continue
            for suffix in s.output_suffixes:
                files = outputs(out, f"{s.series_number}_{s.series_description}{suffix}")
                img: Any = nib.load(files["nii.gz"])
                assert img.shape == s.expected_shape
                assert {"bval", "bvec"} & set(files) == set(s.extra_outputs)
                text = files["json"].read_text(encoding="utf-8")
                assert not any(marker in text for marker in PHI_MARKERS)


def test_corrupt_series_fails_without_output(demo: DemoArchive, tmp_path: Path) -> None:
    (failed,) = demo.with_outcome("fail")
    result = convert(demo.root / failed.folder, tmp_path)
    assert result.returncode == failed.dcm2niix_exit_code == 1
    assert "Warning: File not large enough to store image data" in result.stdout
    assert not list(tmp_path.iterdir())


def test_whole_tree_reports_partial_success(demo: DemoArchive, tmp_path: Path) -> None:
    result = convert(demo.root, tmp_path)
    assert result.returncode == demo.tree_exit_code == 8
    converted = re.findall(r"^Convert \d+ DICOM as", result.stdout, flags=re.MULTILINE)
    assert len(converted) == demo.expected_nifti_count
    n_dicom = sum(s.n_files for s in demo.series)
    n_bad = sum(s.n_files for s in demo.series if s.outcome != "convert")
    assert f"Converted {n_dicom - n_bad} of {n_dicom} files" in result.stdout + result.stderr


def test_demo_archive_is_deterministic(demo: DemoArchive, tmp_path: Path) -> None:
    patients = [samples.phi_patient(tag) for tag in ("A", "B", "C")]
    again = samples.make_demo_archive(tmp_path / "archive", seed=0, patients=patients)
    assert again.series == demo.series
    assert tree_digest(demo.root) == tree_digest(again.root)


def test_bench_archive_has_one_convertible_series_per_folder(tmp_path: Path) -> None:
    written = samples.make_bench_archive(tmp_path, series=3, slices=5, rows=16, cols=12, seed=2)
    assert [w.folder.name for w in written] == ["series-0001", "series-0002", "series-0003"]
    assert len({w.series_uid for w in written}) == 3
    result = convert(written[1].folder, tmp_path / "out")
    assert result.returncode == 0, result.stdout
    check_series(written[1], tmp_path / "out", seed=2)


@pytest.mark.parametrize("kind", KINDS)
def test_written_files_are_byte_identical_to_pydicom_save_as(kind: samples.Kind, tmp_path: Path) -> None:
    """write_series encodes shared attributes once; the result must be what pydicom itself writes."""
    spec = spec_for(kind, "oblique", patient=samples.Patient(name="MÜLLER^JÜRGEN", patient_id="Ä1"))
    written = samples.write_series(tmp_path, spec, seed=4, file_names="uid")
    datasets = list(samples.iter_datasets(spec, seed=4))
    assert len(datasets) == written.n_files
    for ds, path in zip(datasets, written.paths, strict=True):
        buffer = DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert path.read_bytes() == buffer.getvalue()


@pytest.mark.parametrize("mode", ["short_pixel_data", "truncated_file"])
def test_corrupt_file_makes_dcm2niix_reject_the_series(mode: samples.CorruptionMode, tmp_path: Path) -> None:
    written = samples.write_series(tmp_path / "in", SeriesSpec(slices=5), seed=0)
    samples.corrupt_file(written.paths[2], mode)
    result = convert(tmp_path / "in", tmp_path / "out")
    assert result.returncode == 1
    assert f"File not large enough to store image data: {written.paths[2]}" in result.stdout
    assert not list((tmp_path / "out").iterdir())
