"""The BIDS layout planner: labels, rules, runs, multi-output series, fieldmaps and top-level files.

Series are built the way the pipeline records them (dcm2niix output names and parsed sidecars, with
dcm2niix's own BidsGuess values as 1.0.20260724 writes them), so every rule is exercised on the inputs
it will see.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping

import pytest

from dicomflow.domain import bids_files
from dicomflow.domain.bids import ConvertedSeries, DatasetPlan, LayoutOptions, PlannedOutput, plan_dataset, sidecar_text
from dicomflow.domain.bids_labels import LabelPolicy, Labels, check_labels, labels_for, parse_subjects_csv
from dicomflow.domain.bids_rules import BidsConfigError, parse_rules

pytestmark = pytest.mark.unit

T1W = ["anat", "_acq-tfl3_run-1_T1w"]
DWI = ["dwi", "_acq-epb0_dir-AP_run-3_dwi"]
BOLD_RULES = parse_rules(
    json.dumps(
        {
            "rules": [
                {"id": "sbref", "match": {"SeriesDescription": {"glob": "*SBRef"}}, "datatype": "func",
                 "suffix": "sbref", "entities": {"task": "rest"}},
                {"id": "bold", "match": {"SeriesDescription": {"regex": "bold"}}, "datatype": "func",
                 "suffix": "bold", "entities": {"task": "rest"}},
                {"id": "epi", "match": {"SeriesDescription": {"glob": "fmap_*"}}, "datatype": "fmap",
                 "suffix": "epi", "sidecar": {"PhaseEncodingDirection": "j", "TotalReadoutTime": 0.05}},
            ]
        }
    )
)  # fmt: skip


def series(
    sid: str,
    rel_dir: str = "sub-01/ses-01",
    *,
    number: int = 1,
    description: str = "T1w",
    at: float | None = None,
    outputs: Mapping[str, Mapping[str, object]] | None = None,
    extra: tuple[str, ...] = (),
) -> ConvertedSeries:
    """A converted series whose outputs are `<stem><suffix>.nii.gz/.json` for each entry of `outputs`."""
    stem = f"{number}_{description}"
    outs = outputs if outputs is not None else {"": {"BidsGuess": T1W}}
    files = [f"{stem}{suffix}{ext}" for suffix in outs for ext in (".nii.gz", ".json", *extra)]
    return ConvertedSeries(
        series_id=sid,
        rel_dir=rel_dir,
        stem=stem,
        files=tuple(files),
        sidecars={f"{stem}{suffix}": dict(sc) for suffix, sc in outs.items()},
        series_number=number,
        description=description,
        acquired_at=at,
    )


def by_series(plan: DatasetPlan, sid: str) -> list[PlannedOutput]:
    return [o for o in plan.outputs if o.series_id == sid]


def nifti_names(plan: DatasetPlan) -> list[str]:
    return sorted(o.nifti.rsplit("/", 1)[-1] for o in plan.classified)


# ------------------------------------------------------------------------------------------- labels


def test_labels_from_folders_flags_and_mapping_in_that_order() -> None:
    mapping = parse_subjects_csv("folder,subject,session\nexports/alice,A1,pre\nexports,X9\n")
    policy = LabelPolicy(mapping=mapping)
    assert labels_for("study/sub-07/ses-b/3_T1w", policy) == Labels("07", "b")
    assert labels_for("sub-07/3_T1w", policy) == Labels("07", None)
    assert labels_for("exports/alice/3_T1w", policy) == Labels("A1", "pre")  # the deepest listed folder wins
    assert labels_for("exports/bob", policy) == Labels("X9", None)
    assert labels_for("elsewhere", policy) is None
    flag = LabelPolicy(subject="sub-05", session="02")  # the sub-/ses- prefix is accepted
    assert labels_for("3_T1w", flag) == Labels("05", "02")
    assert labels_for("ses-9/3_T1w", flag) == Labels("05", "9")  # a ses- folder still names the session
    assert labels_for("sub-01/x", flag) == Labels("01", "02")  # a sub- folder beats the flag


@pytest.mark.parametrize(
    ("make", "field", "words"),
    [
        (lambda: LabelPolicy(subject="01_pilot"), "subject", "invalid subject label '01_pilot'"),
        (lambda: LabelPolicy(subject="01", session="a b"), "session", "invalid session label 'a b'"),
        (lambda: LabelPolicy(session="01"), "session", "--session needs --subject"),
        (lambda: parse_subjects_csv("a,01\nb,0-2\n"), "subjects line 2, subject", "invalid subject label '0-2'"),
        (lambda: parse_subjects_csv("a,01,x_y\n"), "subjects line 1, session", "invalid session label 'x_y'"),
        (lambda: parse_subjects_csv("a,01\na/,02\n"), "subjects", "line 2: the folder 'a/' is listed twice"),
        (lambda: parse_subjects_csv("a\n"), "subjects", "line 1: expected `source folder,subject[,session]`"),
        (lambda: labels_for("sub-01_pilot/x", LabelPolicy()), "source folder 'sub-01_pilot'", "'sub-01_pilot'"),
        (lambda: labels_for("sub-01/ses-1.5/x", LabelPolicy()), "source folder 'ses-1.5'", "'ses-1.5'"),
    ],
)
def test_invalid_labels_are_refused_naming_the_field(make: Callable[[], object], field: str, words: str) -> None:
    with pytest.raises(BidsConfigError) as caught:
        make()
    assert caught.value.field == field
    assert words in caught.value.reason


def test_a_mapping_rescues_an_invalid_folder_label_and_check_labels_lists_all_bad_folders() -> None:
    rescued = LabelPolicy(mapping={"sub-01_pilot": Labels("01")})
    assert labels_for("sub-01_pilot/x", rescued) == Labels("01")
    with pytest.raises(BidsConfigError) as caught:
        check_labels(["sub-a_1/x", "sub-02/ses-b.c/y", "sub-03/z"], LabelPolicy())
    assert "'sub-a_1'" in caught.value.reason and "'ses-b.c'" in caught.value.reason
    assert "sub-03" not in caught.value.reason


def test_series_without_a_subject_are_set_aside_with_the_reason() -> None:
    plan = plan_dataset([series("a", "pacs_export")], LabelPolicy())
    (out,) = plan.outputs
    assert not out.classified and "no subject label" in out.reason
    assert sorted(f.path for f in out.files) == [
        "unclassified/pacs_export/1_T1w.json",
        "unclassified/pacs_export/1_T1w.nii.gz",
    ]
    assert plan.subjects() == ()


# ---------------------------------------------------------------------------------------------- runs


def test_runs_follow_acquisition_order_whatever_the_input_order() -> None:
    items = [
        series("c", number=9, at=300.0),
        series("a", number=2, at=900.0),
        series("b", number=5, at=100.0),
        series("d", number=4, at=None),  # no time: after those with one, by series number
    ]
    expected = {"b": "1", "c": "2", "a": "3", "d": "4"}
    for seed in range(3):
        shuffled = items[:]
        random.Random(seed).shuffle(shuffled)
        plan = plan_dataset(shuffled, LabelPolicy())
        assert {o.series_id: dict(o.entities)["run"] for o in plan.classified} == expected
        assert plan.runs == {"a": 3, "b": 1, "c": 2, "d": 4}


def test_runs_are_counted_per_session_and_kind_and_sidecar_time_is_the_fallback() -> None:
    plan = plan_dataset(
        [
            series("t1", outputs={"": {"BidsGuess": T1W, "AcquisitionTime": "10:00:00.0"}}),
            series("t1b", number=2, outputs={"": {"BidsGuess": T1W, "AcquisitionTime": "09:00:00.0"}}),
            series("dwi", number=3, outputs={"": {"BidsGuess": DWI}}, extra=(".bval", ".bvec")),
            series("t1s2", "sub-01/ses-02", outputs={"": {"BidsGuess": T1W}}),
        ],
        LabelPolicy(),
    )
    assert plan.runs == {"t1b": 1, "t1": 2, "dwi": 1, "t1s2": 1}
    assert nifti_names(plan) == [
        "sub-01_ses-01_acq-epb0_dir-AP_run-1_dwi.nii.gz",
        "sub-01_ses-01_acq-tfl3_run-1_T1w.nii.gz",
        "sub-01_ses-01_acq-tfl3_run-2_T1w.nii.gz",
        "sub-01_ses-02_acq-tfl3_run-1_T1w.nii.gz",
    ]


def test_a_series_keeps_its_run_when_an_earlier_one_arrives_later() -> None:
    first = plan_dataset([series("late", number=7, at=500.0)], LabelPolicy())
    again = plan_dataset(
        [series("late", number=7, at=500.0), series("early", number=3, at=100.0)],
        LabelPolicy(),
        previous_runs=first.runs,
    )
    assert again.runs == {"late": 1, "early": 2}
    assert by_series(first, "late")[0].files == by_series(again, "late")[0].files


# ----------------------------------------------------------------------------- multi-output series


def test_multi_echo_magnitude_phase_and_complex_outputs_get_their_entities() -> None:
    me = series(
        "me",
        description="gre_me",
        outputs={"_e1": {"BidsGuess": T1W}, "_e2": {"BidsGuess": T1W}, "_e1_ph": {"BidsGuess": T1W},
                 "_e2_ph": {"BidsGuess": T1W}},
    )  # fmt: skip
    cplx = series(
        "cx",
        number=2,
        description="swi",
        outputs={"_real": {"BidsGuess": T1W}, "_imaginary": {"BidsGuess": T1W}, "_ROI1": {"BidsGuess": T1W}},
    )
    plan = plan_dataset([me, cplx], LabelPolicy())
    names = {o.stem: o.nifti.rsplit("/", 1)[-1] for o in plan.classified}
    assert names == {
        "1_gre_me_e1": "sub-01_ses-01_acq-tfl3_run-1_echo-1_part-mag_T1w.nii.gz",
        "1_gre_me_e2": "sub-01_ses-01_acq-tfl3_run-1_echo-2_part-mag_T1w.nii.gz",
        "1_gre_me_e1_ph": "sub-01_ses-01_acq-tfl3_run-1_echo-1_part-phase_T1w.nii.gz",
        "1_gre_me_e2_ph": "sub-01_ses-01_acq-tfl3_run-1_echo-2_part-phase_T1w.nii.gz",
        "2_swi_imaginary": "sub-01_ses-01_acq-tfl3_run-2_part-imag_T1w.nii.gz",
        "2_swi_real": "sub-01_ses-01_acq-tfl3_run-2_part-real_T1w.nii.gz",
    }
    phase = next(o for o in plan.classified if o.stem == "1_gre_me_e1_ph")
    assert phase.sidecar_updates == {"Units": "arbitrary"}  # BIDS requires Units for phase images
    (roi,) = plan.unclassified
    assert roi.stem == "2_swi_ROI1" and "'_ROI1'" in roi.reason


def test_gre_fieldmap_outputs_become_magnitude1_magnitude2_and_phasediff() -> None:
    rules = parse_rules(
        '{"rules": [{"id": "gre", "match": {"SeriesDescription": "gre_field_mapping"}, "datatype": "fmap",'
        ' "suffix": "magnitude1", "sidecar": {"EchoTime1": 0.00492, "EchoTime2": 0.00738}}]}'
    )
    mag = series("m", description="gre_field_mapping", number=4, outputs={"_e1": {}, "_e2": {}})
    phase = series("p", description="gre_field_mapping", number=5, outputs={"_e2_ph": {}})
    plan = plan_dataset([mag, phase], LabelPolicy(), rules)
    assert nifti_names(plan) == [
        "sub-01_ses-01_run-1_magnitude1.nii.gz",
        "sub-01_ses-01_run-1_magnitude2.nii.gz",
        "sub-01_ses-01_run-1_phasediff.nii.gz",
    ]


def test_sbref_and_bold_runs_pair_up_by_acquisition_order() -> None:
    items = [
        series("s1", number=5, description="rest_SBRef", at=10.0, outputs={"": {"RepetitionTime": 2}}),
        series("b1", number=6, description="rest_bold", at=20.0, outputs={"": {"RepetitionTime": 2}}),
        series("s2", number=7, description="rest_SBRef", at=30.0, outputs={"": {"RepetitionTime": 2}}),
        series("b2", number=8, description="rest_bold", at=40.0, outputs={"": {"RepetitionTime": 2}}),
    ]
    plan = plan_dataset(items, LabelPolicy(), BOLD_RULES)
    assert nifti_names(plan) == [
        "sub-01_ses-01_task-rest_run-1_bold.nii.gz",
        "sub-01_ses-01_task-rest_run-1_sbref.nii.gz",
        "sub-01_ses-01_task-rest_run-2_bold.nii.gz",
        "sub-01_ses-01_task-rest_run-2_sbref.nii.gz",
    ]
    assert all(o.sidecar_updates["TaskName"] == "rest" and o.rule in ("sbref", "bold") for o in plan.classified)


# ------------------------------------------------------------------------------------------- rules


def test_rules_override_the_guess_and_can_set_series_aside() -> None:
    rules = parse_rules(
        """
        [[rules]]
        id = "scout"
        match = {SeriesDescription = {regex = "(?i)scout"}}
        unclassified = "localizer"

        [[rules]]
        id = "t2"
        match = {ImageType = "M", ProtocolName = {glob = "t2_*"}}
        datatype = "anat"
        suffix = "T2w"
        entities = {acq = "tse"}
        """,
        "toml",
    )
    t2 = series("t2", description="t2_tse", outputs={"": {"BidsGuess": T1W, "ImageType": ["ORIGINAL", "M"],
                                                         "ProtocolName": "t2_tse"}})  # fmt: skip
    scout = series("sc", number=2, description="AAHead_Scout")
    plain = series("t1", number=3)
    plan = plan_dataset([t2, scout, plain], LabelPolicy(), rules)
    assert {o.series_id: (o.suffix, dict(o.entities).get("acq"), o.rule) for o in plan.classified} == {
        "t2": ("T2w", "tse", "t2"),
        "t1": ("T1w", "tfl3", ""),
    }
    (aside,) = plan.unclassified
    assert aside.series_id == "sc" and aside.reason == "set aside by rule 'scout': localizer"


def test_criteria_match_exact_values_lists_globs_and_regexes() -> None:
    rules = parse_rules(
        json.dumps(
            {
                "rules": [
                    {"id": "n", "match": {"EchoNumber": 2, "Flag": True}, "unclassified": "number"},
                    {"id": "l", "match": {"ImageType": ["ORIGINAL", "P"]}, "unclassified": "list"},
                ]
            }
        )
    )
    (number, as_list) = rules
    assert number.matches({"EchoNumber": 2.0, "Flag": True})
    assert not number.matches({"EchoNumber": 2, "Flag": 1})  # a boolean is not a number
    assert not number.matches({"EchoNumber": "2", "Flag": True})
    assert as_list.matches({"ImageType": ["ORIGINAL", "P"]}) and not as_list.matches({"ImageType": ["P", "ORIGINAL"]})


@pytest.mark.parametrize(
    ("rules", "field", "words"),
    [
        ('{"rules": [{"id": "x", "match": {"SeriesDescription": {"regex": "("}}, "unclassified": "r"}]}',
         "rules[0].match.SeriesDescription.regex", "rule 'x' (rule 1): invalid regular expression"),
        ('{"rules": [{"id": "x", "match": {"A": 1}, "datatype": "ct", "suffix": "ct"}]}',
         "rules[0].datatype", "datatype must be one of anat, dwi, fmap, func"),
        ('{"rules": [{"id": "x", "match": {"A": 1}, "datatype": "anat", "suffix": "bold"}]}',
         "rules[0].suffix", "'bold' is not a BIDS suffix of anat"),
        ('{"rules": [{"id": "x", "match": {"A": 1}, "datatype": "anat", "suffix": "T1w", "entities": {"run": 1}}]}',
         "rules[0].entities.run", "run is assigned by dicomflow"),
        ('{"rules": [{"id": "x", "match": {"A": 1}, "datatype": "func", "suffix": "bold",'
         ' "entities": {"task": "a-b"}}]}',
         "rules[0].entities.task", "letters and digits only"),
        ('{"rules": [{"id": "x", "match": {"A": 1}, "datatype": "dwi", "suffix": "dwi", "entities": {"task": "a"}}]}',
         "rules[0].entities.task", "BIDS does not allow task in a dwi file"),
        ('{"rules": [{"id": "x", "match": {"A": 1}, "unclassified": "a"}, {"id": "x", "match": {"A": 2},'
         ' "unclassified": "b"}]}', "rules[1].id", "used twice"),
        ('{"rules": [{"id": "x", "match": {}, "unclassified": "a"}]}', "rules[0].match", "at least one"),
        ('{"rules": [{"id": "x", "match": {"A": 1}, "unclassified": "a", "suffix": "T1w"}]}', "rules[0].suffix",
         "cannot be combined"),
        ('{"rules": [{"id": "x", "match": {"A": 1}, "datatyp": "anat"}]}', "rules[0].datatyp", "unknown key"),
        ('{"rules": [{"match": {"A": 1}}]}', "rules[0].id", 'needs an "id"'),
        ('{"rule": []}', "rules", 'one key, "rules"'),
        ("{", "rules", "not valid JSON"),
    ],
)  # fmt: skip
def test_rules_file_errors_name_the_rule_and_the_field(rules: str, field: str, words: str) -> None:
    with pytest.raises(BidsConfigError) as caught:
        parse_rules(rules)
    assert caught.value.field == field
    assert words in caught.value.reason


# ------------------------------------------------------------------------------------ unclassified


@pytest.mark.parametrize(
    ("outputs", "extra", "reason"),
    [
        ({"": {}}, (), "dcm2niix could not tell what kind of image"),
        ({"": {"BidsGuess": ["discard", "_localizer"]}}, (), "not for BIDS"),
        ({"": {"BidsGuess": ["ct", "_ct"]}}, (), "guessed datatype 'ct'"),
        ({"": {"BidsGuess": ["func", "_bold"], "RepetitionTime": 2}}, (), "needs the task entity"),
        ({"": {"BidsGuess": ["func", "_task-rest_bold"]}}, (), "requires RepetitionTime"),
        ({"": {"BidsGuess": ["fmap", "_dir-AP_epi"]}}, (), "requires PhaseEncodingDirection, TotalReadoutTime"),
        ({"": {"BidsGuess": DWI}}, (), "needs .bval and .bvec"),
        ({"": {"BidsGuess": ["anat", "_acq-x_FOO"]}}, (), "no suffix 'FOO'"),
    ],
)
def test_unclassifiable_outputs_are_reported_never_dropped(
    outputs: Mapping[str, Mapping[str, object]], extra: tuple[str, ...], reason: str
) -> None:
    plan = plan_dataset([series("x", outputs=outputs, extra=extra)], LabelPolicy())
    (out,) = plan.outputs
    assert not out.classified and reason in out.reason
    assert all(f.path.startswith("unclassified/sub-01/ses-01/") for f in out.files)


# --------------------------------------------------------------------------------------- fieldmaps


def _session_with_two_fieldmaps() -> list[ConvertedSeries]:
    tr = {"RepetitionTime": 2}
    return [
        series("ap", number=1, description="fmap_AP", at=0.0, outputs={"": {}}),
        series("bold1", number=2, description="bold", at=100.0, outputs={"": tr}),
        series("pa", number=3, description="fmap_PA", at=200.0, outputs={"": {}}),
        series("bold2", number=4, description="bold", at=300.0, outputs={"": tr}),
        series(
            "dwi", number=5, description="dwi", at=400.0, outputs={"": {"BidsGuess": DWI}}, extra=(".bval", ".bvec")
        ),
        series("t1", number=6, at=500.0),
    ]


def test_fieldmaps_are_intended_for_the_runs_that_follow_them() -> None:
    plan = plan_dataset(_session_with_two_fieldmaps(), LabelPolicy(), BOLD_RULES)
    intended = {o.series_id: o.sidecar_updates.get("IntendedFor") for o in plan.classified if o.datatype == "fmap"}
    prefix = "bids::sub-01/ses-01/"
    assert intended == {
        "ap": [f"{prefix}func/sub-01_ses-01_task-rest_run-1_bold.nii.gz"],
        "pa": [
            f"{prefix}dwi/sub-01_ses-01_acq-epb0_dir-AP_run-1_dwi.nii.gz",
            f"{prefix}func/sub-01_ses-01_task-rest_run-2_bold.nii.gz",
        ],
    }
    assert all("B0FieldSource" not in o.sidecar_updates for o in plan.classified)


def test_b0field_style_links_fieldmaps_and_targets_by_identifier() -> None:
    plan = plan_dataset(_session_with_two_fieldmaps(), LabelPolicy(), BOLD_RULES, LayoutOptions(fieldmaps="b0field"))
    updates = {o.series_id: dict(o.sidecar_updates) for o in plan.classified}
    assert updates["ap"]["B0FieldIdentifier"] == "epi_ses01_run1"
    assert updates["pa"]["B0FieldIdentifier"] == "epi_ses01_run2"
    assert updates["bold1"]["B0FieldSource"] == "epi_ses01_run1"
    assert updates["bold2"]["B0FieldSource"] == updates["dwi"]["B0FieldSource"] == "epi_ses01_run2"
    assert "B0FieldSource" not in updates["t1"] and not any("IntendedFor" in u for u in updates.values())


def test_a_fieldmap_acquired_after_every_run_corrects_them_all() -> None:
    items = [series("b", number=1, description="bold", at=0.0, outputs={"": {"RepetitionTime": 2}}),
             series("f", number=2, description="fmap_AP", at=10.0, outputs={"": {}})]  # fmt: skip
    plan = plan_dataset(items, LabelPolicy(), BOLD_RULES)
    (fmap,) = [o for o in plan.classified if o.datatype == "fmap"]
    assert fmap.sidecar_updates["IntendedFor"] == ["bids::sub-01/ses-01/func/sub-01_ses-01_task-rest_run-1_bold.nii.gz"]


def test_sidecar_text_adds_the_plans_keys_to_dcm2niixs() -> None:
    plan = plan_dataset(_session_with_two_fieldmaps(), LabelPolicy(), BOLD_RULES)
    ap = next(o for o in plan.classified if o.series_id == "ap")
    written = json.loads(sidecar_text({"EchoTime": 0.03, "TotalReadoutTime": 0.01}, ap))
    assert written["EchoTime"] == 0.03 and written["TotalReadoutTime"] == 0.05 and written["IntendedFor"]


# -------------------------------------------------------------------------------- top-level files

INFO = bids_files.DatasetInfo("Demo study", "0.1.0", "1.0.20260724")


def test_top_level_files_describe_the_dataset_without_real_dates() -> None:
    plan = plan_dataset(
        [
            series("t1", at=1_700_000_000.0),
            series("b", number=2, description="bold", at=1_700_000_754.25, outputs={"": {"RepetitionTime": 2}}),
            series("x", number=3, at=None),
        ],
        LabelPolicy(),
        BOLD_RULES,
    )
    files = bids_files.top_level_files(plan, INFO)
    assert list(files) == [
        ".bidsignore",
        "README.md",
        "dataset_description.json",
        "participants.json",
        "participants.tsv",
        "scans.json",
        "sub-01/ses-01/sub-01_ses-01_scans.tsv",
    ]
    description = json.loads(files["dataset_description.json"])
    assert description["BIDSVersion"] == "1.11.1" and description["DatasetType"] == "raw"
    assert [g["Name"] for g in description["GeneratedBy"]] == ["dicomflow", "dcm2niix"]
    assert [g["Version"] for g in description["GeneratedBy"]] == ["0.1.0", "1.0.20260724"]
    assert files["participants.tsv"] == "participant_id\nsub-01\n"
    assert files["sub-01/ses-01/sub-01_ses-01_scans.tsv"] == (
        "filename\tacq_time\n"
        "anat/sub-01_ses-01_acq-tfl3_run-1_T1w.nii.gz\t1800-01-01T00:00:00\n"
        "anat/sub-01_ses-01_acq-tfl3_run-2_T1w.nii.gz\tn/a\n"
        "func/sub-01_ses-01_task-rest_run-1_bold.nii.gz\t1800-01-01T00:12:34.250000\n"
    )
    assert files[".bidsignore"] == "unclassified\nreport.html\n"
    assert files == bids_files.top_level_files(plan_dataset(plan_series_again(), LabelPolicy(), BOLD_RULES), INFO)


def plan_series_again() -> list[ConvertedSeries]:
    return [
        series("x", number=3, at=None),
        series("b", number=2, description="bold", at=1_700_000_754.25, outputs={"": {"RepetitionTime": 2}}),
        series("t1", at=1_700_000_000.0),
    ]


def test_a_rerun_adding_a_session_changes_only_what_it_should() -> None:
    first_series = [series("t1", at=50.0), series("d", number=2, description="dwi", at=60.0,
                    outputs={"": {"BidsGuess": DWI}}, extra=(".bval", ".bvec"))]  # fmt: skip
    first = plan_dataset(first_series, LabelPolicy())
    second = plan_dataset(
        [*first_series, series("t1b", "sub-01/ses-02", at=10.0), series("t1c", "sub-02/ses-01", at=5.0)],
        LabelPolicy(),
        previous_runs=first.runs,
    )
    old = {o.series_id: o for o in first.outputs}
    assert all(old[o.series_id] == o for o in second.outputs if o.series_id in old)  # same names, same sidecars
    before, after = bids_files.top_level_files(first, INFO), bids_files.top_level_files(second, INFO)
    changed = sorted(k for k in after if before.get(k) != after[k])
    assert changed == [
        "participants.tsv",
        "sub-01/ses-02/sub-01_ses-02_scans.tsv",
        "sub-02/ses-01/sub-02_ses-01_scans.tsv",
    ]
    assert after["participants.tsv"] == "participant_id\nsub-01\nsub-02\n"
