"""The whole conversion path in one process, with the real dcm2niix and realistic DICOM.

Proves, for every series of the sample archive: dicomflow's NIfTI equals what dcm2niix writes when run
directly on the same files with the same flags (voxels, shape, affine, bval/bvec); mixed folders never
merge or overwrite; a corrupt series is dead-lettered with its reason while the others succeed; and the
counters always add up.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicomflow import bootstrap, samples
from dicomflow.adapters.dcm2niix import Dcm2niixConverter, dcm2niix_args
from dicomflow.config import Settings
from dicomflow.domain.model import BatchStatus, ItemState
from dicomflow.domain.series import ConversionOptions, SeriesKey
from dicomflow.ports import QueueName
from dicomflow.services.context import Context
from tests.support.fakes import InlineQueue, ScriptedConverter, run_batch

pytestmark = pytest.mark.integration

STABLE_SIDECAR_KEYS = ("RepetitionTime", "EchoTime", "FlipAngle", "SliceThickness", "Modality", "SeriesNumber")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> samples.DemoArchive:
    return samples.make_demo_archive(tmp_path_factory.mktemp("archive") / "dicom", seed=3)


@pytest.fixture
def inline_ctx(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Context]:
    def factory(**kwargs: object) -> Context:
        return bootstrap.build(make_settings(), queue=InlineQueue(), **kwargs)  # type: ignore[arg-type]

    return factory


def assert_invariant(ctx: Context, batch_id: str) -> None:
    c = ctx.store.get_batch(batch_id).counters
    assert c.succeeded + c.skipped + c.dead_lettered == c.series_total


def _series_files(archive: samples.DemoArchive, series: samples.DemoSeries) -> list[Path]:
    """The files of one series, found by reading headers (the pacs_export folder mixes series)."""
    import pydicom

    folder = archive.root / series.folder
    files = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: S112 - non-DICOM files in the folder are not part of the series
            continue
        if ds.get("SeriesInstanceUID") == series.series_uid:
            files.append(path)
    return files


def test_every_series_matches_dcm2niix_run_directly(
    archive: samples.DemoArchive, inline_ctx: Callable[..., Context], tmp_path: Path
) -> None:
    ctx = inline_ctx()
    batch_id = run_batch(ctx, str(archive.root), str(tmp_path / "out"))
    assert_invariant(ctx, batch_id)
    items = {i.item_id: i for i in ctx.store.list_items(batch_id, limit=1000)}
    assert len(items) == len(archive.series)

    for series in archive.with_outcome("convert"):
        item = items[SeriesKey(series.series_uid, series.sop_class_uid).item_id]
        assert item.state is ItemState.SUCCEEDED, (series.label, item.failure)
        # dcm2niix run by hand on exactly this series' files, same flags and name.
        direct_in, direct_out = tmp_path / "direct" / item.item_id / "in", tmp_path / "direct" / item.item_id / "out"
        direct_in.mkdir(parents=True)
        direct_out.mkdir()
        for path in _series_files(archive, series):
            shutil.copy(path, direct_in / path.name)
        args = dcm2niix_args(Dcm2niixConverter(60).binary, direct_in, direct_out, item.output_stem, ConversionOptions())
        subprocess.run(args, check=True, capture_output=True)
        direct = {p.name: p for p in direct_out.iterdir()}
        ours = {Path(o.name).name: Path(o.ref) for o in item.outputs}
        assert set(ours) == set(direct), series.label
        for name, path in ours.items():
            if name.endswith(".nii.gz"):
                mine, theirs = nib.load(path), nib.load(direct[name])
                assert mine.shape == theirs.shape == tuple(series.expected_shape or mine.shape)
                np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))
                np.testing.assert_allclose(mine.affine, theirs.affine)
            elif name.endswith((".bval", ".bvec")):
                np.testing.assert_allclose(np.loadtxt(path), np.loadtxt(direct[name]))
            elif name.endswith(".json"):
                a, b = json.loads(path.read_text()), json.loads(direct[name].read_text())
                assert {k: a.get(k) for k in STABLE_SIDECAR_KEYS} == {k: b.get(k) for k in STABLE_SIDECAR_KEYS}
        # The output tree mirrors the source folder, except names that look like a record number or a date
        # (a DICOMDIR's PT000000/ST000000): those get a keyed pseudonym (docs/privacy.md).
        for output in item.outputs:
            for mine, theirs in zip(output.name.split("/"), series.folder.parts, strict=False):
                assert mine == theirs or (re.search(r"\d{5}", theirs) and mine.startswith(theirs.rstrip("0123456789")))


def test_mixed_folder_yields_one_conversion_per_series_without_overwrites(
    archive: samples.DemoArchive, inline_ctx: Callable[..., Context], tmp_path: Path
) -> None:
    ctx = inline_ctx()
    batch_id = run_batch(ctx, str(archive.root / "pacs_export"), str(tmp_path / "out"))
    expected = [s for s in archive.series if s.folder.as_posix() == "pacs_export"]
    items = ctx.store.list_items(batch_id, limit=100)
    assert len(items) == len(expected) == 3
    assert {i.state for i in items} == {ItemState.SUCCEEDED}
    names = [o.name for i in items for o in i.outputs]
    assert len(names) == len(set(names))
    images = sorted((tmp_path / "out").glob("*.nii.gz"))
    assert len(images) == len(expected)
    assert_invariant(ctx, batch_id)


def test_corrupt_series_is_dead_lettered_with_its_reason_and_the_rest_succeed(
    archive: samples.DemoArchive, inline_ctx: Callable[..., Context], tmp_path: Path
) -> None:
    ctx = inline_ctx()
    batch_id = run_batch(ctx, str(archive.root), str(tmp_path / "out"))
    batch = ctx.store.get_batch(batch_id)
    (corrupt,) = archive.with_outcome("fail")
    (dead,) = ctx.store.list_items(batch_id, frozenset({ItemState.DEAD_LETTERED}))
    assert dead.item_id == SeriesKey(corrupt.series_uid, corrupt.sop_class_uid).item_id
    assert dead.failure is not None and dead.failure.permanent
    assert "dcm2niix" in dead.failure.reason and "exit code 1" in dead.failure.reason
    assert dead.attempts == 1  # permanent: never retried blindly
    assert batch.status is BatchStatus.COMPLETED_WITH_FAILURES
    assert batch.counters.succeeded == len(archive.with_outcome("convert"))
    assert batch.counters.skipped == len(archive.with_outcome("skip"))
    assert batch.files_ignored == len(archive.non_dicom_files) + int(archive.dicomdir is not None)
    assert_invariant(ctx, batch_id)


def test_second_run_converts_only_new_series_and_force_redoes_all(
    archive: samples.DemoArchive, inline_ctx: Callable[..., Context], tmp_path: Path
) -> None:
    source = tmp_path / "src"
    shutil.copytree(archive.root / "sub-01", source / "sub-01")
    ctx = inline_ctx()
    first = run_batch(ctx, str(source), str(tmp_path / "out"))
    converted = ctx.store.get_batch(first).counters.succeeded
    assert converted >= 4
    before = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.nii.gz"))

    shutil.copytree(archive.root / "sub-02" / "ses-02", source / "sub-02" / "ses-02")  # one new CT series
    second = run_batch(ctx, str(source), str(tmp_path / "out"))
    counters = ctx.store.get_batch(second).counters
    assert counters.succeeded == 1
    assert counters.skipped == converted + ctx.store.get_batch(first).counters.skipped
    assert ctx.converter.version  # fingerprints include the converter version

    forced = run_batch(ctx, str(source), str(tmp_path / "out"), force=True)
    assert ctx.store.get_batch(forced).counters.succeeded == converted + 1
    after = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.nii.gz"))
    assert len(after) == len(before) + 1  # nothing duplicated by re-conversion
    for batch_id in (first, second, forced):
        assert_invariant(ctx, batch_id)


def test_a_series_with_fewer_files_than_its_last_conversion_is_reported_not_converted_over_it(
    inline_ctx: Callable[..., Context], tmp_path: Path
) -> None:
    # Issue 9: a transient read failure or an upload in progress must never replace good outputs with
    # incomplete ones. A series that lost a file since it converted into this destination is reported.
    written = samples.write_series(tmp_path / "src" / "t1", samples.SeriesSpec(kind="mr3d", slices=8), seed=61)
    ctx = inline_ctx()
    first = run_batch(ctx, str(tmp_path / "src"), str(tmp_path / "out"))
    assert ctx.store.get_batch(first).counters.succeeded == 1
    (image,) = (tmp_path / "out").rglob("*.nii.gz")
    good = image.read_bytes()

    written.paths[3].unlink()  # a slice goes missing from the source
    second = run_batch(ctx, str(tmp_path / "src"), str(tmp_path / "out"))
    (item,) = ctx.store.list_items(second)
    assert item.state is ItemState.SKIPPED and "7 files now, 8 when this series last converted" in item.skip_reason
    assert "--force" in item.skip_reason
    assert image.read_bytes() == good  # the good outputs are untouched

    forced = run_batch(ctx, str(tmp_path / "src"), str(tmp_path / "out"), force=True)
    (item,) = ctx.store.list_items(forced)
    assert item.state is ItemState.SUCCEEDED and item.file_count == 7  # only when asked for


def test_duplicate_deliveries_change_neither_outputs_nor_counters(
    archive: samples.DemoArchive, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    queue = InlineQueue(duplicate_every_task=True)
    ctx = bootstrap.build(make_settings(), queue=queue)
    batch_id = run_batch(ctx, str(archive.root / "sub-01"), str(tmp_path / "out"))
    convert_deliveries = [d for d in queue.log if d.task.queue is QueueName.CONVERT]
    # A fresh destination: every series got a convert task, and each was delivered twice.
    assert len(convert_deliveries) == 2 * ctx.store.get_batch(batch_id).counters.series_total
    items = ctx.store.list_items(batch_id)
    assert all(i.attempts == 1 for i in items if i.state is ItemState.SUCCEEDED)
    files = sorted((tmp_path / "out").rglob("*"))
    assert not [f for f in files if "dicomflow-partial" in f.name]
    assert len([f for f in files if f.suffix == ".gz"]) == sum(1 for i in items if i.state is ItemState.SUCCEEDED)
    assert_invariant(ctx, batch_id)


def test_transient_failures_retry_then_succeed_and_exhaustion_dead_letters_on_the_last_attempt(
    archive: samples.DemoArchive, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(retry_max_attempts=3)
    real = Dcm2niixConverter(60)
    # 137 = killed (OOM): transient. One series recovers after two kills, one is killed every time.
    scripted = ScriptedConverter(real, {"1_CT_Head": [137, 137], "2_fMRI_rest_bold": [137, 137, 137, 137]})
    ctx = bootstrap.build(settings, queue=InlineQueue(), converter=scripted)
    batch_id = run_batch(ctx, str(archive.root / "sub-01"), str(tmp_path / "out"))
    items = {i.output_stem: i for i in ctx.store.list_items(batch_id)}
    recovered, exhausted = items["1_CT_Head"], items["2_fMRI_rest_bold"]
    assert recovered.state is ItemState.SUCCEEDED and recovered.attempts == 3
    assert exhausted.state is ItemState.DEAD_LETTERED
    assert exhausted.attempts == 3  # exactly max_attempts: not one attempt early, not one late
    assert exhausted.failure is not None and exhausted.failure.code == "converter_crashed"
    assert scripted.calls.count("2_fMRI_rest_bold") == 3
    assert_invariant(ctx, batch_id)


def test_disk_full_during_publish_is_retried_then_dead_lettered_without_touching_other_series(
    archive: samples.DemoArchive, make_settings: Callable[..., Settings], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from dicomflow.adapters.local import files as local_files

    original = local_files.LocalFolderSink._copy_into_place

    def copy(self: object, source: Path, target: Path) -> None:
        if source.name.startswith("1_CT_Head"):
            raise local_files.LocalFolderSink._write_error(OSError(errno.ENOSPC, "No space left on device"), target)
        original(self, source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(local_files.LocalFolderSink, "_copy_into_place", copy)
    ctx = bootstrap.build(make_settings(retry_max_attempts=2), queue=InlineQueue())
    batch_id = run_batch(ctx, str(archive.root / "sub-01"), str(tmp_path / "out"))
    items = {i.output_stem: i for i in ctx.store.list_items(batch_id)}
    full = items.pop("1_CT_Head")
    assert full.state is ItemState.DEAD_LETTERED and full.failure is not None
    assert full.failure.code == "disk_full" and "free some space" in full.failure.reason
    assert {i.state for i in items.values()} <= {ItemState.SUCCEEDED, ItemState.SKIPPED}
    assert not list((tmp_path / "out").rglob("1_CT_Head*"))
    assert_invariant(ctx, batch_id)


def test_existing_foreign_file_is_never_overwritten(
    archive: samples.DemoArchive, inline_ctx: Callable[..., Context], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    foreign = out / "ses-02" / "001_CT_Head" / "1_CT_Head.nii.gz"  # the source root is sub-01
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"someone else's work")
    ctx = inline_ctx()
    batch_id = run_batch(ctx, str(archive.root / "sub-01"), str(out))
    assert foreign.read_bytes() == b"someone else's work"
    dead = ctx.store.list_items(batch_id, frozenset({ItemState.DEAD_LETTERED}))
    assert [d.output_stem for d in dead] == ["1_CT_Head"]
    assert dead[0].failure is not None and "was not written by dicomflow" in dead[0].failure.reason
    assert_invariant(ctx, batch_id)


def test_a_series_bigger_than_the_worker_is_refused_before_any_download(
    archive: samples.DemoArchive, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    fetched: list[int] = []
    from dicomflow.adapters.local.files import LocalFolderSource
    from dicomflow.domain.locations import LocationKind

    class CountingSource(LocalFolderSource):
        def fetch(self, refs, dest_dir, progress=None):  # type: ignore[no-untyped-def]
            fetched.append(len(refs))
            return super().fetch(refs, dest_dir, progress)

    # 100 MiB is less than any series needs: the fixed allowance for dcm2niix alone is 256 MiB.
    ctx = bootstrap.build(make_settings(memory_budget_mb=100), queue=InlineQueue(),
                          sources={LocationKind.LOCAL: CountingSource})  # fmt: skip
    batch_id = run_batch(ctx, str(archive.root / "sub-01" / "ses-02"), str(tmp_path / "out"))
    items = ctx.store.list_items(batch_id)
    refused = [i for i in items if i.failure is not None and i.failure.code == "series_too_large"]
    assert refused and all(i.state is ItemState.DEAD_LETTERED and i.attempts == 1 for i in refused)
    assert "100 MiB" in refused[0].failure.reason and "needs about" in refused[0].failure.reason  # type: ignore[union-attr]
    assert fetched == []  # refused before downloading anything
    assert_invariant(ctx, batch_id)
