"""The pieces that wire the BIDS planner into the pipeline: the batch's layout (labels, mapping, rules,
checked at submission), labels from source folders at discovery (never from an identifier), names that
stay once placed, the finish step's bookkeeping (completions, placement, the destination's lease), and
acquisition times kept as durations."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dicomflow.adapters import codec
from dicomflow.domain import dataset as ds
from dicomflow.domain import model
from dicomflow.domain.bids import ConvertedSeries, parse_bids_path, plan_dataset
from dicomflow.domain.bids_labels import LabelPolicy, Labels, labels_of_series, source_labels
from dicomflow.domain.bids_rules import BidsConfigError, rules_from_data
from dicomflow.domain.facts import OutputImage, SeriesFacts, offset_from_study
from dicomflow.domain.layout import Layout, folder_key, layout_from_json
from dicomflow.domain.locations import parse_location
from dicomflow.domain.model import BatchStatus, Counters, ItemState, OutputFile
from dicomflow.domain.series import ConversionOptions, FileRef, SeriesGroup, SeriesKey

pytestmark = pytest.mark.unit

T1W = ["anat", "_acq-tfl3_run-1_T1w"]
RULES = {"rules": [{"id": "rest", "match": {"SeriesDescription": "rest"}, "datatype": "func", "suffix": "bold",
                    "entities": {"task": "rest"}}]}  # fmt: skip


# --- the layout: validated at submission -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({"kind": "bids", "subject": "01_a"}, "layout.subject", "letters and digits"),
        ({"kind": "bids", "session": "pre"}, "layout.session", "needs --subject"),
        ({"kind": "bids", "subjects": [{"folder": "x", "subject": "A-1"}]}, "layout.subjects[0].subject", "letters"),
        ({"kind": "bids", "subjects": [{"folder": "x", "subject": "a"}, {"folder": "./x/", "subject": "b"}]},
         "layout.subjects[1].folder", "twice"),
        ({"kind": "bids", "subject": "01", "subjects": [{"folder": "x", "subject": "a"}]}, "layout.subjects",
         "not both"),
        ({"kind": "bids", "rules": [{"id": "r", "match": {"A": {"regex": "("}}, "datatype": "anat", "suffix": "T1w"}]},
         "layout.rules[0].match.A.regex", "invalid regular expression"),
        ({"kind": "bids", "rules": [{"id": "r", "match": {"A": 1}, "datatype": "anat", "suffix": "bold"}]},
         "layout.rules[0].suffix", "not a BIDS suffix"),
        ({"kind": "bids", "fieldmaps": "sometimes"}, "layout.fieldmaps", "intended_for"),
        ({"kind": "tree"}, "layout.kind", "mirror, bids"),
        ({"kind": "mirror", "subject": "01"}, "layout.subject", "bids layout only"),
        ({"kind": "bids", "colour": "red"}, "layout.colour", "unknown key"),
        ("bids", "layout", "an object"),
    ],
)  # fmt: skip
def test_a_bad_layout_is_refused_naming_the_field(raw: object, field: str, words: str) -> None:
    with pytest.raises(BidsConfigError) as caught:
        layout_from_json(raw)
    assert caught.value.field == field
    assert words in caught.value.reason


def test_a_layout_keeps_digests_of_mapped_folders_and_reads_back_the_same() -> None:
    layout = layout_from_json(
        {"kind": "bids", "subjects": [{"folder": "2024 Smith export/", "subject": "sub-01", "session": "pre"}],
         "rules": RULES["rules"], "fieldmaps": "both"}
    )  # fmt: skip
    stored = json.dumps(layout.to_dict())
    assert "Smith" not in stored and folder_key("2024 Smith export") in stored
    again = Layout.from_dict(json.loads(stored))
    assert again == layout and again.canonical() == layout.canonical()
    policy = again.policy()
    assert policy.mapping.get("2024 Smith export") == Labels("01", "pre")  # looked up by digest
    assert [r.id for r in again.parsed_rules()] == ["rest"]
    assert again.options().fieldmaps == "both"
    assert again.summary() == {"kind": "bids", "subject": None, "session": None, "subjects": 1,
                               "rules": ["rest"], "fieldmaps": "both"}  # fmt: skip
    assert Layout.from_dict(None) == Layout() == layout_from_json(None)
    assert not Layout().is_bids and Layout().to_dict() == {"kind": "mirror"}


# --- labels at discovery: from folder names, never from an identifier ------------------------------------


def test_a_sub_folder_named_by_the_patients_identifiers_is_refused_by_its_scrubbed_name() -> None:
    policy = LabelPolicy()
    assert source_labels(["study", "sub-07", "ses-pre"], ["study", "sub-07", "ses-pre"], policy) == Labels("07", "pre")
    # The scrub removed the patient's ID from the folder name: that label would publish it.
    with pytest.raises(BidsConfigError) as caught:
        source_labels(["sub-12345678", "x"], ["sub-", "x"], policy)
    assert "'sub-'" in caught.value.field and "12345678" not in caught.value.reason + caught.value.field
    assert "identifiers" in caught.value.reason
    # ...unless the user names the subject another way.
    assert source_labels(["sub-12345678"], ["sub-"], LabelPolicy(subject="01")) == Labels("01")


def test_every_bad_folder_of_a_batch_is_named_in_one_error() -> None:
    folders = {
        "a": (["sub-01_x"], ["sub-01_x"]),
        "b": (["sub-SMITH"], ["sub-"]),
        "c": (["sub-02", "ses-1"], ["sub-02", "ses-1"]),
        "d": (["pacs"], ["pacs"]),
    }
    with pytest.raises(BidsConfigError) as caught:
        labels_of_series(folders, LabelPolicy())
    assert "'sub-01_x'" in caught.value.reason and "'sub-'" in caught.value.reason
    assert "SMITH" not in caught.value.reason
    good = labels_of_series({k: v for k, v in folders.items() if k in "cd"}, LabelPolicy())
    assert good == {"c": Labels("02", "1"), "d": None}


# --- names that stay once placed ---------------------------------------------------------------------------


def _series(sid: str, number: int, description: str, guess: list[str] | None = None, **kw: object) -> ConvertedSeries:
    stem = f"{number}_{description}"
    sidecar = {"BidsGuess": guess or T1W, "SeriesDescription": description, "RepetitionTime": 2.0}
    return ConvertedSeries(sid, "x", stem, (f"{stem}.nii.gz", f"{stem}.json"), {stem: sidecar}, number,
                           description, float(number), Labels("01", "1"), **kw)  # type: ignore[arg-type]  # fmt: skip


def test_placed_outputs_keep_their_names_whatever_the_rules_say_now() -> None:
    first = plan_dataset([_series("a", 1, "rest")], None)
    (nifti,) = [o.nifti for o in first.classified]
    assert nifti.endswith("_acq-tfl3_run-1_T1w.nii.gz")
    placed = _series("a", 1, "rest", placed={"1_rest": nifti}, extras={"1_rest": {"Note": "from a rule"}})
    again = plan_dataset([placed, _series("b", 2, "rest")], None, rules_from_data(RULES))
    paths = {o.series_id: o.nifti for o in again.classified}
    assert paths["a"] == nifti  # kept, though the rule now calls such series bold
    assert paths["b"].endswith("_task-rest_run-1_bold.nii.gz")
    assert next(o for o in again.classified if o.series_id == "a").sidecar_updates == {"Note": "from a rule"}
    assert parse_bids_path(nifti) is not None and parse_bids_path("unclassified/x/1_rest.nii.gz") is None


def test_a_plan_made_again_after_some_series_were_placed_gives_the_same_names() -> None:
    series = [_series(s, n, "t1") for s, n in (("a", 1), ("b", 2), ("c", 3), ("d", 4))]
    first = plan_dataset(series, None)
    names = {o.series_id: o.nifti for o in first.classified}
    # An interrupted finish step placed b and d only; the next one plans again.
    partly = [replace(s, placed={s.stem: names[s.series_id]}) if s.series_id in "bd" else s for s in series]
    again = plan_dataset(partly, None)
    assert {o.series_id: o.nifti for o in again.classified} == names
    # A later series of the same kind takes the lowest free run.
    later = plan_dataset([*partly, _series("e", 5, "t1")], None, previous_runs={"a": 1, "c": 3})
    assert dict(next(o for o in later.classified if o.series_id == "e").entities)["run"] == "5"


# --- the finish step's bookkeeping --------------------------------------------------------------------------


def _batch(status: BatchStatus = BatchStatus.RUNNING) -> model.Batch:
    return model.Batch("b1", (parse_location("/in", field="s"),), parse_location("/out", field="d"),
                       ConversionOptions(), "", status, 0.0, 0.0, layout=Layout.bids())  # fmt: skip


def test_a_batch_owes_one_finish_step_per_outcome_in_the_write_that_makes_it_final() -> None:
    done = Counters(series_total=2, succeeded=1, dead_lettered=1)
    final = model.settle(_batch(), done, 10.0)
    assert final is not None and final.status is BatchStatus.COMPLETED_WITH_FAILURES
    assert (final.completions, final.finished, final.finish_pending) == (1, 0, True)
    assert model.request_finish(final, done, 11.0) is None  # the same outcome: nothing more owed
    finished = model.finish_done(final, 1, "/out/report.html", 12.0)
    assert finished is not None and not finished.finish_pending and finished.report_ref == "/out/report.html"
    assert model.finish_done(finished, 1, "", 13.0) is None  # a duplicate delivery changes nothing
    # A redrive reopens it (no finish owed while running); its new outcome owes a new one.
    reopened = model.settle(finished, Counters(series_total=2, succeeded=1, pending=1), 14.0)
    assert reopened is not None and reopened.status is BatchStatus.RUNNING and not reopened.finish_pending
    again = model.settle(reopened, Counters(series_total=2, succeeded=2), 15.0)
    assert again is not None and (again.completions, again.finished) == (2, 1)
    lost = model.retry_finish(again, 20.0, again)
    assert lost is not None and lost.finish_seq == 1 and model.retry_finish(lost, 21.0, again) is None
    # Cancelled (and failed) batches owe theirs when they end, before their last series stop.
    cancelled = model.cancel(_batch(), 3.0)
    assert cancelled is not None and cancelled.finish_pending
    restored = codec.batch_from_dict(json.loads(json.dumps(codec.batch_to_dict(again))))
    assert restored == again


def _item(outputs: tuple[OutputFile, ...]) -> model.Item:
    group = SeriesGroup(SeriesKey("1.2", "1.2.840"), (FileRef("a", "a", 1),), ("9",), "sub-01", 1, "MR", "t1",
                        output_stem="1_t1")  # fmt: skip
    item = model.new_item(_batch(), group, "fp", 0.0, labels=("01", ""))
    return replace(item, state=ItemState.SUCCEEDED, outputs=outputs, layout="bids")


def test_a_placement_is_recorded_before_files_move_and_only_its_own_completion_records_the_names() -> None:
    staged = (OutputFile(".dicomflow/staging/x/1_t1.nii.gz", 10, "aa"),)
    targets = (OutputFile("sub-01/anat/sub-01_run-1_T1w.nii.gz", 10, "aa", origin="1_t1.nii.gz"),)
    item = _item(staged)
    assert item.subject == "01" and item.session == ""
    begun = ds.begin_placement(item, targets, 1.0)
    assert begun is not None and begun.placing == targets and begun.outputs == staged
    assert ds.begin_placement(begun, targets, 2.0) is None  # one placement at a time
    other = (OutputFile("elsewhere.nii.gz", 10, "aa"),)
    assert ds.placed(begun, other, other, {}, 3.0) is None  # not the placement recorded
    done = ds.placed(begun, targets, targets, {"1_t1": {"TaskName": "x"}}, 3.0)
    assert done is not None and done.outputs == targets and not done.placing
    assert done.facts.extras == {"1_t1": {"TaskName": "x"}} and done.outputs[0].original == "1_t1.nii.gz"
    gone = ds.superseded(done, 4.0)
    assert gone is not None and gone.outputs == () and ds.superseded(gone, 5.0) is None
    restored = codec.item_from_dict(json.loads(json.dumps(codec.item_to_dict(begun))))
    assert restored == begun


def test_one_writer_holds_a_destination_and_recognises_its_own_files() -> None:
    empty = ds.Dataset("k")
    mine = ds.take(empty, "w1", 100.0, 300.0)
    assert mine is not None and ds.take(mine, "w2", 200.0, 300.0) is None  # busy
    assert ds.take(mine, "w2", 401.0, 300.0) is not None  # expired: the writer died
    assert ds.renew(mine, "w2", 150.0, 300.0) is None and ds.will_write(mine, "w2", {"a": "f" * 64}, 150.0) is None
    pending = ds.will_write(mine, "w1", {"README.md": "ab" * 32}, 150.0)
    assert pending is not None and pending.owns("README.md", "ab" * 32) and not pending.owns("README.md", "cd" * 32)
    # An attempt that died after writing, then another wanting other content: both writes are ours.
    again = ds.will_write(pending, "w1", {"README.md": "cd" * 32}, 151.0)
    assert again is not None and again.owns("README.md", "ab" * 32) and again.owns("README.md", "cd" * 32)
    wrote = ds.wrote(pending, "w1", {"README.md": "ab" * 32}, frozenset({"old.tsv"}), 160.0)
    assert wrote is not None and wrote.writing == () and wrote.owns("README.md", "ab" * 32)
    released = ds.release(wrote, "w1", 170.0)
    assert released is not None and released.lease_owner == "" and ds.release(released, "w1", 171.0) is None
    assert ds.Dataset.from_dict(json.loads(json.dumps(wrote.to_dict()))) == wrote


# --- what workers record ---------------------------------------------------------------------------------


def test_acquisition_times_are_kept_as_durations_from_the_start_of_the_study() -> None:
    assert offset_from_study(["08:31:00.000000", "08:30:30.5"], "080000") == 1830.5
    assert offset_from_study(["00:10:00"], "235000.00") == 1200.0  # after midnight
    assert offset_from_study(["08:31:00"], None) is None and offset_from_study([None], "080000") is None


def test_facts_round_trip_as_one_json_text() -> None:
    facts = SeriesFacts((OutputImage("1_t1.nii.gz", (4, 4, 2), (1.0, 1.0, 2.5), 1, b"\x89PNG", (9, 3)),),
                        {"1_t1": {"ImageType": ["ORIGINAL"], "SliceTiming": [0.0, 0.5]}}, 12.5)  # fmt: skip
    item = replace(_item(()), facts=facts)
    data = codec.item_to_dict(item)
    assert isinstance(data["facts"], str)  # Firestore indexes no sidecar key and stores no nested array
    assert codec.item_from_dict(data).facts == facts
