"""`--layout bids` through the whole pipeline in one process: real dcm2niix, real DICOM, the SQLite state,
the local folder sink, every task (expand, convert, finish) through the queue's semantics.

One destination lives through what users do to it, and the official validator checks the result:
1. the sample archive (anatomical, functional with slice timing, diffusion, CT, multi-echo, a corrupt
   series, a PACS export) and a session with every kind of series BIDS needs, with no rules file:
   dcm2niix's guesses name what they can, the rest is set aside with reasons;
2. the same source again with the rules file a user writes after reading the report: nothing is
   converted again, and what was set aside moves to its BIDS names;
3. a new session of another subject and a late series of an existing session: every file placed before
   keeps its name and its bytes, the new ones continue the numbering;
then the dataset validates with 0 errors, the destination holds exactly what the records say, and a
finish step killed half-way is completed by the next one to the same dataset.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dicomflow import bootstrap
from dicomflow.config import Mode, load_settings
from dicomflow.domain.layout import Layout, layout_from_json
from dicomflow.domain.locations import Location, LocationKind, parse_location
from dicomflow.domain.model import Batch, ItemState
from dicomflow.samples import SeriesSpec, make_demo_archive, write_series
from dicomflow.samples_bids import BIDS_RULES, add_bids_session
from dicomflow.services.context import Context
from dicomflow.services.finish import DATASET_KEY, REPORT
from dicomflow.services.submit import BatchRequest, submit
from tests.integration.test_bids_dataset import EXPECTED_WARNINGS, errors_of, validate
from tests.integration.test_report import Page, png_size
from tests.support.fakes import InlineQueue

pytestmark = pytest.mark.integration


def files_of(root: Path) -> dict[str, str]:
    """Every file of the destination but dicomflow's private state: name → SHA-256."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".dicomflow" not in p.relative_to(root).parts
    }


@dataclass
class Destination:
    root: Path
    source: Path
    state: Path
    batches: list[Batch] = field(default_factory=list)
    snapshots: list[dict[str, str]] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)

    def context(self) -> Context:
        settings = load_settings(environ={}, mode=Mode.LOCAL, state_path=str(self.state),
                                 work_dir=str(self.state.parent / "work"))  # fmt: skip
        return bootstrap.build(settings, queue=InlineQueue())

    def convert(self, layout: Layout) -> Batch:
        ctx = self.context()
        try:
            request = BatchRequest(
                sources=(parse_location(str(self.source), field="source"),),
                destination=parse_location(str(self.root), field="destination"),
                layout=layout,
            )
            batch = submit(ctx, request).batch
            assert isinstance(ctx.queue, InlineQueue)
            ctx.queue.drain(ctx)
            final = ctx.store.get_batch(batch.batch_id)
        finally:
            ctx.close()
        self.batches.append(final)
        self.snapshots.append(files_of(self.root))
        self.reports.append((self.root / REPORT).read_text())
        return final


RULES = layout_from_json({"kind": "bids", "rules": json.loads(BIDS_RULES)["rules"]})


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Destination]:
    base = tmp_path_factory.mktemp("bids-pipeline")
    source = base / "dicom"
    make_demo_archive(source)
    add_bids_session(source)
    dest = Destination(base / "dataset", source, base / "state" / "state.sqlite")
    dest.convert(Layout.bids())  # 1. no rules file
    dest.convert(RULES)  # 2. the rules file, same source
    add_bids_session(source, subject="05", session="02", seed=5)  # 3. a new session...
    write_series(  # ...and a second T1w of an existing session, acquired later
        source / "sub-01" / "ses-01" / "009_T1w_repeat",
        SeriesSpec(kind="mr3d", series_number=9, series_description="T1w_MPRAGE", slices=12),
        seed=9,
    )
    dest.convert(RULES)
    yield dest


def test_without_rules_guesses_name_what_they_can_and_the_rest_is_set_aside(destination: Destination) -> None:
    first = destination.snapshots[0]
    assert "sub-01/ses-01/anat/sub-01_ses-01_acq-tfl3_run-1_T1w.nii.gz" in first
    assert "sub-01/ses-01/dwi/sub-01_ses-01_acq-epb0_dir-AP_run-1_dwi.bval" in first
    # Gradient-echo EPI has no guess without vendor headers: set aside, under the scrubbed source folder.
    assert any(n.startswith("unclassified/sub-04/ses-01/006_rfMRI_REST_AP_bold/") for n in first)
    assert not any("/func/" in n for n in first if n.startswith("sub-04/"))
    assert {REPORT, ".bidsignore", "dataset_description.json", "participants.tsv"} <= set(first)
    assert not any(n.startswith(".dicomflow") for n in first)


def test_a_rules_file_given_later_names_what_was_set_aside_without_converting_again(
    destination: Destination,
) -> None:
    second, before = destination.batches[1], destination.snapshots[0]
    after = destination.snapshots[1]
    assert second.counters.succeeded == 0 and second.counters.skipped >= 20  # all converted before
    bold = "sub-04/ses-01/func/sub-04_ses-01_task-rest_run-1_bold"
    assert f"{bold}.nii.gz" in after and not any(n.startswith("unclassified/sub-04/ses-01/006_") for n in after)
    # The image moved (same bytes); its sidecar was written with the rule's keys.
    moved = [n for n in before if n.startswith("unclassified/sub-04/ses-01/006_") and n.endswith(".nii.gz")]
    assert [before[n] for n in moved] == [after[f"{bold}.nii.gz"]]
    sidecar = json.loads((destination.root / f"{bold}.json").read_text())
    assert sidecar["TaskName"] == "rest" and len(sidecar["SliceTiming"]) == 8
    # What the guesses had named stays as it was, name and bytes.
    kept = {n: h for n, h in before.items() if n.startswith(("sub-01/", "sub-02/")) and not n.endswith("scans.tsv")}
    assert kept and all(after.get(n) == h for n, h in kept.items())
    # dcm2niix guessed the GRE fieldmap's magnitudes to be T1w images: named so in the first run, they keep
    # those names (renaming needs --force). So the EPI fieldmaps, the only ones now, point at every run.
    anat = {n: h for n, h in before.items() if n.startswith("sub-04/ses-01/anat/")}
    assert any("echo-2_T1w" in n for n in anat) and all(after.get(n) == h for n, h in anat.items())
    epi = json.loads((destination.root / "sub-04/ses-01/fmap/sub-04_ses-01_dir-AP_run-1_epi.json").read_text())
    targets = sorted(u.rsplit("/", 1)[-1] for u in epi["IntendedFor"])
    assert len(targets) == 7 and "sub-04_ses-01_task-rest_run-1_sbref.nii.gz" in targets
    assert all(u.startswith("bids::sub-04/ses-01/") for u in epi["IntendedFor"])


def test_a_rerun_adding_a_session_keeps_every_name_and_byte(destination: Destination) -> None:
    before, after = destination.snapshots[1], destination.snapshots[2]
    changed = sorted(n for n in before if after.get(n) != before[n])
    # Only what describes the whole dataset or the changed session was rewritten; nothing disappeared.
    assert changed == sorted([REPORT, "participants.tsv", "sub-01/ses-01/sub-01_ses-01_scans.tsv"])
    added = sorted(set(after) - set(before))
    assert "sub-01/ses-01/anat/sub-01_ses-01_acq-tfl3_run-2_T1w.nii.gz" in added  # the late series: next run
    assert "sub-05/ses-02/sub-05_ses-02_scans.tsv" in added
    assert all(
        n.startswith(("sub-05/", "unclassified/sub-05/", "sub-01/ses-01/anat/sub-01_ses-01_acq-tfl3_run-2_"))
        for n in added
    )
    participants = (destination.root / "participants.tsv").read_text()
    assert participants == "participant_id\nsub-01\nsub-02\nsub-03\nsub-04\nsub-05\n"


def test_the_dataset_validates_and_holds_exactly_what_its_records_say(destination: Destination) -> None:
    result = validate(destination.root)
    assert errors_of(result) == []
    warnings = {i["code"] for i in result["issues"]["issues"] if i["severity"] == "warning"}
    assert warnings <= EXPECTED_WARNINGS, warnings - EXPECTED_WARNINGS
    assert sorted(result["summary"]["subjects"]) == ["01", "02", "03", "04", "05"]

    ctx = destination.context()
    try:
        key = Location(LocationKind.LOCAL, str(destination.root)).key
        recorded: dict[str, str] = {}
        for item in ctx.store.list_destination_items(key, limit=10_000):
            recorded |= {o.name: o.sha256 for o in item.outputs}
        owned = dict(ctx.store.get_dataset(key).files)
    finally:
        ctx.close()
    present = files_of(destination.root)
    assert {n: h for n, h in present.items() if n not in owned} == recorded
    assert all(present[n][:16] == digest for n, digest in owned.items())
    assert set(owned) >= {REPORT, "participants.tsv", "dataset_description.json"}
    assert not (destination.root / ".dicomflow" / "staging").exists()  # every staged output was placed


def test_the_report_shows_every_series_with_its_thumbnail_and_every_reason(destination: Destination) -> None:
    ctx = destination.context()
    try:
        assert ctx.store.get_batch(destination.batches[0].batch_id).report_ref == str(destination.root / REPORT)
        items = [ctx.store.list_items(b.batch_id, limit=1000) for b in destination.batches]
    finally:
        ctx.close()
    first = _page(destination.reports[0])
    converted = [i for i in items[0] if i.state is ItemState.SUCCEEDED]
    assert len(converted) >= 20 and set(first.rows) == {i.item_id for i in items[0]}
    for item in converted:
        images = [img for img in first.images if img["row"] == item.item_id]
        niftis = [o for o in item.outputs if o.name.endswith(".nii.gz")]
        assert len(images) == len(niftis) >= 1, item.description
        for img in images:
            assert png_size(img["src"]) == (int(img["width"]), int(img["height"]))
        assert ".nii.gz" in " ".join(first.rows[item.item_id])
    text = " ".join(first.text)
    assert "unclassified: dcm2niix could not tell what kind of image this is" in text
    assert "exported completely" in text  # the corrupt series, dead-lettered with its reason
    # The last batch's report: its new series by their BIDS names, the others skipped with the reason.
    last = _page(destination.reports[-1])
    assert (destination.root / REPORT).read_text() == destination.reports[-1]
    for item in items[-1]:
        row = " ".join(last.rows[item.item_id])
        if item.state is ItemState.SUCCEEDED:
            assert all(o.name in row for o in item.outputs if o.name.endswith(".nii.gz"))
        elif item.state is ItemState.SKIPPED:
            assert item.skip_reason in row
    assert any("sub-05_ses-02_acq-tfl3_run-1_T1w.nii.gz" in " ".join(r) for r in last.rows.values())
    assert "unclassified: set aside by rule 'scout': localizers are not analysed" in " ".join(last.text)
    for html in destination.reports:
        assert "http://" not in html.replace("http://www.w3.org", "") and "<script" not in html


def _page(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    return page


class _Killed(BaseException):
    """The finish step's process dies: nothing after this line runs, not even its `finally`."""


def test_a_finish_step_killed_half_way_is_completed_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "dicom"
    add_bids_session(source, subject="07", session="1")
    reference = Destination(tmp_path / "reference", source, tmp_path / "state-ref" / "state.sqlite")
    reference.convert(RULES)

    from dicomflow.adapters.local.files import LocalFolderSink
    from dicomflow.services import finish

    moves = {"left": 7}
    original_move = LocalFolderSink.move

    def dying_move(self: LocalFolderSink, *args: Any, **kwargs: Any) -> Any:
        result = original_move(self, *args, **kwargs)
        moves["left"] -= 1
        if moves["left"] == 0:
            raise _Killed
        return result

    monkeypatch.setattr(LocalFolderSink, "move", dying_move)
    monkeypatch.setattr(finish._Writer, "release", lambda self: None)  # a killed process releases nothing
    crashed = Destination(tmp_path / "crashed", source, tmp_path / "state-crash" / "state.sqlite")
    with pytest.raises(_Killed):
        crashed.convert(RULES)
    half = files_of(crashed.root)
    assert any(n.startswith("sub-07/") for n in half) and any(".dicomflow" in n for n in _all(crashed.root))
    monkeypatch.undo()

    # The next run: its start-up reconciler frees the dead writer's lease and sends the finish step again.
    ctx = crashed.context()
    try:
        from dicomflow.services.reconcile import reconcile

        report = reconcile(ctx, all_leases_expired=True)
        assert report.finishes_requeued == 1
        assert isinstance(ctx.queue, InlineQueue)
        ctx.queue.drain(ctx)
    finally:
        ctx.close()
    done, expected = files_of(crashed.root), files_of(reference.root)
    assert sorted(done) == sorted(expected)
    differ = sorted(n for n in done if done[n] != expected[n])
    assert differ == [REPORT]  # batch ids and times differ; every BIDS file is the same, byte for byte
    assert not (crashed.root / ".dicomflow" / "staging").exists()
    assert DATASET_KEY  # the dataset's own files are recorded under their own key (checked above by set)


def _all(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


def test_every_batch_writes_its_report_in_the_mirror_layout_too(tmp_path: Path) -> None:
    source = tmp_path / "dicom"
    write_series(source / "sub-01" / "t1", SeriesSpec(kind="mr3d", series_number=1, slices=6), seed=1)
    dest = Destination(tmp_path / "nifti", source, tmp_path / "state" / "state.sqlite")
    batch = dest.convert(Layout())
    assert sorted(dest.snapshots[0]) == [REPORT, "sub-01/t1/1_T1w_MPRAGE.json", "sub-01/t1/1_T1w_MPRAGE.nii.gz"]
    page = _page((dest.root / REPORT).read_text())
    assert len(page.images) == 1 and "sub-01/t1/1_T1w_MPRAGE.nii.gz" in " ".join(page.text)
    assert batch.report_ref == str(dest.root / REPORT) and not batch.finish_pending
    shutil.rmtree(dest.root / "sub-01")


def test_converting_again_with_force_keeps_every_name_and_the_older_records_let_go(tmp_path: Path) -> None:
    source = tmp_path / "dicom"
    for number in (3, 5):
        write_series(source / "sub-01" / "ses-1" / f"t1_{number}", SeriesSpec(kind="mr3d", series_number=number,
                     slices=6), seed=number)  # fmt: skip
    dest = Destination(tmp_path / "bids", source, tmp_path / "state" / "state.sqlite")
    first = dest.convert(Layout.bids())
    ctx = dest.context()
    try:
        request = BatchRequest(sources=(parse_location(str(source), field="s"),),
                               destination=parse_location(str(dest.root), field="d"), force=True,
                               layout=Layout.bids())  # fmt: skip
        again = submit(ctx, request).batch
        assert isinstance(ctx.queue, InlineQueue)
        ctx.queue.drain(ctx)
        key = Location(LocationKind.LOCAL, str(dest.root)).key
        records = ctx.store.list_destination_items(key, limit=100)
        older = [i for i in records if i.batch_id == first.batch_id]
    finally:
        ctx.close()
    after = files_of(dest.root)
    names = sorted(n for n in after if n.endswith(".nii.gz"))
    assert names == sorted(n for n in dest.snapshots[0] if n.endswith(".nii.gz"))  # same names, same runs
    assert names == ["sub-01/ses-1/anat/sub-01_ses-1_acq-tfl3_run-1_T1w.nii.gz",
                     "sub-01/ses-1/anat/sub-01_ses-1_acq-tfl3_run-2_T1w.nii.gz"]  # fmt: skip
    assert len(older) == 2 and all(i.outputs == () for i in older)  # they claim nothing any more
    current = {o.name: o.sha256 for i in records if i.batch_id == again.batch_id for o in i.outputs}
    assert {n: h for n, h in after.items() if n in current} == current and len(current) == 4
