"""The de-identification profile (domain/privacy.py, docs/privacy.md): identifiers planted in every attribute
the profile knows are removed from descriptions, protocol names, folder names and sidecars; descriptions
without identifiers survive intact; names keep their end."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomflow.domain.privacy import (
    ALWAYS_DROPPED_SIDECAR_KEYS,
    DEFAULT_SIDECAR_KEYS,
    IDENTIFIER_KEYS,
    Identifiers,
    filter_sidecar,
    parse_extra_keys,
    scrub_path_component,
    scrub_rel_dirs,
    scrub_text,
    series_stem,
)

pytestmark = pytest.mark.unit

KEY = b"site-secret-for-tests"

# One header with a distinctive value in every identifying attribute the profile reads.
HEADER = {
    "patient_name": "QUIXLEY^ZORAN^VEX",
    "other_patient_names": "QUIXLEY-MARTH^ZORA",
    "patient_birth_name": "BRANDOLF^ZORAN",
    "patient_mother_birth_name": "OSTERHAUS^ILSE",
    "patient_id": "PID90817",
    "other_patient_ids": "OPX4471\\HOSP-55102",
    "accession_number": "ACN7731",
    "study_id": "SID884",
    "device_serial_number": "SN4412BZ",
    "referring_physician_name": "WOLKENSTEIN^HARALD^^DR.",
    "performing_physician_name": "FEYNBERG^LOTTE",
    "operators_name": "Li^Wu\\KRAMPF^ODO",
    "physicians_of_record": "PENDELTON^AUGUSTA",
    "name_of_physicians_reading_study": "MARQUARDT^FENNA",
    "requesting_physician": "ZWICKAU^ROLF",
    "institution_name": "Saint Quillon Neuro Hospital",
    "institution_address": "12 Varnbridge Lane, Oxtown 55123",
    "institutional_department_name": "Tellmark Imaging",
    "station_name": "MRC35123",
    "patient_birth_date": "19610417",
    "study_date": "20240131",
    "series_date": "20240131",
    "acquisition_date": "20240131",
    "content_date": "20240201",
    "series_description": "not an identifier",
    "study_description": "not an identifier either",
}
IDS = Identifiers.from_values(HEADER)

# Every distinctive piece planted above, as it must never reappear in scrubbed text.
PLANTED = (
    "QUIXLEY", "ZORAN", "VEX", "MARTH", "ZORA", "BRANDOLF", "OSTERHAUS", "ILSE", "PID90817", "OPX4471", "55102",
    "ACN7731", "SID884", "SN4412BZ", "WOLKENSTEIN", "HARALD", "FEYNBERG", "LOTTE", "KRAMPF", "ODO", "PENDELTON",
    "AUGUSTA", "MARQUARDT", "FENNA", "ZWICKAU", "ROLF", "Quillon", "Varnbridge", "Oxtown", "55123", "Tellmark",
    "MRC35123",
)  # fmt: skip

# Descriptions as scanners and technologists write them (Siemens, GE, Philips, Canon, CT), none identifying.
ORDINARY = (
    "ep2d_DTI_20_dir_AP",
    "T1_MPRAGE_sag",
    "fMRI_rest_PA",
    "cmrr_mbep2d_bold_mb6_2mm_AP",
    "DWI_b1000_64dir",
    "t2_tse_tra_512_5mm",
    "t1_mprage_sag_p2_0.8mm_iso",
    "gre_field_mapping",
    "AAHead_Scout_32ch-head-coil",
    "Ax DWI 1000b",
    "Sag CUBE T2 FLAIR",
    "3-plane loc",
    "PU:Ax T2 FLAIR",
    "WIP SENSE",
    "DelRec - SWIp",
    "QSM 0.8 iso",
    "dti 30dir b=1000",
    "resting state - 8min",
    "ep2d_bold_moco_TR2000",
    "Head_MAR_3mm",
    "CT_head_MAR_2.0",
    "ASL_3D_tra_iso_3.0",
    "1.5T_T1",
    "run_1",
    "T1 (sag)",
    "Mag_Images",
    "B0 map",
    "Survey_SHC",
    "cor MPR 2/1mm",
    "MPR Tra 2024",
)


def tokens(text: str) -> set[str]:
    return {t.casefold() for t in re.findall(r"[^\W_]+", text)}


# --- identifiers ------------------------------------------------------------------------------------------


def test_identifiers_never_show_their_values() -> None:
    text = repr(IDS) + str(IDS)
    assert not any(p.casefold() in text.casefold() for p in PLANTED)
    assert "withheld" in text


def test_the_keys_cover_the_fast_scanner_names() -> None:
    # The names another helper adds to the fast scanner's WANTED table, plus the ones it already has.
    scanner = {
        "patient_name", "patient_id", "patient_birth_date", "other_patient_ids", "other_patient_names",
        "patient_birth_name", "accession_number", "institution_name", "institution_address",
        "referring_physician_name", "station_name", "institutional_department_name", "performing_physician_name",
        "operators_name", "study_date", "series_date", "acquisition_date", "study_id",
    }  # fmt: skip
    assert scanner <= IDENTIFIER_KEYS.keys()


def test_empty_values_make_empty_identifiers() -> None:
    assert not Identifiers.from_values({"patient_name": "", "study_id": "1", "series_description": "T1"})
    assert Identifiers.from_values({"patient_name": "A^B"})


def test_union_scrubs_with_both() -> None:
    a = Identifiers.from_values({"patient_name": "ALPHORN^X"})
    b = Identifiers.from_values({"patient_name": "BRISKET^Y"})
    assert scrub_text("T1_ALPHORN_BRISKET_ax", a.union(b)) == "T1_ax"


# --- removed ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("planted", PLANTED)
@pytest.mark.parametrize("template", ["T1_{}_sag", "{} ep2d AP", "dwi ({}) PA", "{}", "t2-{}-tse"])
def test_every_planted_identifier_is_removed(planted: str, template: str) -> None:
    scrubbed = scrub_text(template.format(planted), IDS)
    assert planted.casefold() not in scrubbed.casefold()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("T1_QUIXLEY_sag", "T1_sag"),  # family name
        ("zoran T1", "T1"),  # given name, any case
        ("T1 (QUIXLEY^ZORAN)", "T1"),  # the raw person name, brackets and all
        ("QUIXLEY, Zoran - ep2d AP", "ep2d AP"),
        ("ep2d_ZoranQuixley_AP", "ep2d_AP"),  # glued forms people type
        ("ep2d_ZQuixley_AP", "ep2d_AP"),
        ("T1QUIXLEY", "T1"),  # a name glued to a sequence name
        ("T2_li_wu", "T2"),  # two-letter names are names
        ("T2_Wu_Li_ax", "T2_ax"),
        ("T2 VEX", "T2"),  # a three-letter middle name
        ("fl3d_MRN_PID90817", "fl3d_MRN"),  # patient ID
        ("T1_PID90817x", "T1_x"),  # an ID inside a longer token loses the ID
        ("dwi_HOSP_55102", "dwi"),  # other IDs ("HOSP-55102"), their parts typed apart
        ("T1 ACN7731", "T1"),  # accession number
        ("T1_acn7731", "T1"),
        ("T1 SID884", "T1"),  # study ID
        ("T1_SN4412BZ", "T1"),  # device serial number (HIPAA M)
        ("T1 for Dr Wolkenstein", "T1 for Dr"),  # referring physician
        ("T1_Feynberg", "T1"),  # performing physician
        ("T1_KRAMPF", "T1"),  # operator
        ("Saint Quillon Neuro Hospital T1", "T1"),  # the institution, word by word and as a phrase
        ("T1_SaintQuillonNeuroHospital", "T1"),
        ("T1_Quillon", "T1"),
        ("T1 Hospital", "T1 Hospital"),  # a generic word of the institution name identifies nobody
        ("T1 Varnbridge Lane Oxtown", "T1 Lane"),  # address
        ("Tellmark_T1", "T1"),  # department
        ("T1_MRC35123", "T1"),  # station
        ("T1_mueller", "T1_mueller"),
    ],
)
def test_exactly_the_identifying_tokens_are_removed(text: str, expected: str) -> None:
    assert scrub_text(text, IDS) == expected


def test_accents_and_case_do_not_hide_a_name() -> None:
    ids = Identifiers.from_values({"patient_name": "Müller^Zoë"})
    assert scrub_text("T1_MULLER_zoe", ids) == "T1"
    assert scrub_text("T1_Müller", ids) == "T1"


def test_honorifics_are_not_names() -> None:
    # PN prefix and suffix components (PS3.5 6.2) identify nobody; "MR" must survive a "Mr." prefix.
    ids = Identifiers.from_values({"patient_name": "QUAY^ANN^^MR.^JR."})
    assert scrub_text("MR_head_Jr", ids) == "MR_head_Jr"


@pytest.mark.parametrize(
    "date",
    [
        "20240131", "240131", "2024-01-31", "2024_01_31", "2024.01.31", "2024 01 31", "31.01.2024", "01/31/2024",
        "31-01-2024", "31.01.24", "01/31/24", "Jan-31-2024", "31-Jan-2024", "31JAN2024", "31JAN24", "Jan 31",
        "January 31, 2024", "31 January 2024", "January 2024", "2024-Jan-31", "2024-01-31T09:31:00", "09:31",
        "09:31:00.000", "19610417", "17.04", "0417", "1704",
    ],
)  # fmt: skip
def test_dates_and_times_in_any_format_are_removed(date: str) -> None:
    assert scrub_text(f"T1_{date}_sag", IDS) == "T1_sag"
    # Generic formats go even when no header date is known (a date typed by hand is a date).
    generic = scrub_text(f"T1 {date} sag", Identifiers())
    if date not in ("17.04", "0417", "1704"):  # only the header's own day-month forms are known to be dates
        assert generic == "T1 sag"


@pytest.mark.parametrize("run", ["12345", "123456789", "0012345"])
def test_digit_runs_of_five_or_more_are_removed(run: str) -> None:
    assert scrub_text(f"dwi_{run}_AP", Identifiers()) == "dwi_AP"
    assert scrub_text(f"dwi_b{run}", Identifiers()) == "dwi_b"


@pytest.mark.parametrize("kept", ["b1000", "TR2000", "1024", "2024", "64dir"])
def test_four_digits_stay(kept: str) -> None:
    assert scrub_text(f"dwi_{kept}_AP", IDS) == f"dwi_{kept}_AP"


# --- kept ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("description", ORDINARY)
def test_descriptions_without_identifiers_survive_intact(description: str) -> None:
    assert scrub_text(description, IDS) == description


def test_a_patient_named_like_a_word_strips_it_only_from_its_own_series() -> None:
    phantom = Identifiers.from_values({"patient_name": "fMRI^PHANTOM", "operators_name": "MR"})
    other = Identifiers.from_values({"patient_name": "QUIXLEY^ZORAN"})
    assert scrub_text("fMRI_rest_PA", phantom) == "rest_PA"  # the documented trade-off
    assert scrub_text("MR_head", phantom) == "head"
    assert scrub_text("fMRI_rest_PA", other) == "fMRI_rest_PA"
    assert scrub_text("MR_head", other) == "MR_head"


def test_single_letter_initials_do_not_eat_sequence_names() -> None:
    ids = Identifiers.from_values({"patient_name": "QUAY^T^M"})
    assert scrub_text("T1_MPRAGE_M", ids) == "T1_MPRAGE"  # the token "M" is the initial; "T1" is not "T"
    assert scrub_text("T1_T2_swi", ids) == "T1_T2_swi"


def test_version_like_numbers_and_uids_are_not_dates() -> None:
    assert scrub_text("VE11C", IDS) == "VE11C"
    assert scrub_text("syngo MR E11", IDS) == "syngo MR E11"


# --- names -----------------------------------------------------------------------------------------------


def test_series_stem_is_scrubbed_and_file_name_safe() -> None:
    assert series_stem(7, "ep2d_bold QUIXLEY (rest) AP", "MR", IDS) == "7_ep2d_bold_rest_AP"
    assert series_stem(3, "QUIXLEY^ZORAN", "MR", IDS) == "3_MR"
    assert series_stem(None, "", "", IDS) == "x_series"
    assert series_stem(2, "Ax T2 FLAIR/é", "MR", IDS) == "2_Ax_T2_FLAIR_e"


def test_long_names_keep_their_end() -> None:
    long = "cmrr_mbep2d_bold_mb6_2mm_task_rest_resting_state_long_description_for_the_scanner_run1_dir_AP"
    stem = series_stem(12, long, "MR", IDS, limit=48)
    assert stem.endswith("_run1_dir_AP")
    assert stem.startswith("12_cmrr_mbep2d")
    assert "__" in stem  # the cut is visible
    assert len(stem) <= len("12_") + 48


def test_a_long_name_without_separators_keeps_both_ends() -> None:
    stem = series_stem(1, "A" * 30 + "B" * 30 + "_PA", "MR", IDS, limit=20)
    assert stem.startswith("1_AAAA")
    assert stem.endswith("_PA")
    assert len(stem) <= 2 + 20


@given(
    st.integers(min_value=1, max_value=9999),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=120),
    st.integers(min_value=8, max_value=80),
)
def test_stems_use_only_safe_characters(number: int, description: str, limit: int) -> None:
    stem = series_stem(number, description, "MR", IDS, limit=limit)
    assert re.fullmatch(r"[0-9]+_[A-Za-z0-9][A-Za-z0-9_-]*", stem), stem
    assert len(stem) <= len(str(number)) + 1 + limit


@given(
    st.lists(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8), max_size=6
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8),
    st.sampled_from(["_", " ", "-", ".", "^", ", "]),
)
def test_no_token_of_the_result_is_a_name_part(words: list[str], name: str, sep: str) -> None:
    ids = Identifiers.from_values({"patient_name": f"{name}^X"})
    text = sep.join([*words[:3], name, *words[3:]])
    assert name.casefold() not in tokens(scrub_text(text, ids))


def test_path_components_keep_ordinary_names_and_hide_patient_names() -> None:
    assert scrub_path_component("sub-01", IDS, key=KEY) == "sub-01"
    assert scrub_path_component("ses-02 follow up", IDS, key=KEY) == "ses-02 follow up"
    hidden = scrub_path_component("QUIXLEY^ZORAN", IDS, key=KEY)
    assert re.fullmatch(r"anon-[0-9a-f]{10}", hidden)
    assert scrub_path_component("QUIXLEY^ZORAN", IDS, key=KEY) == hidden  # deterministic
    assert scrub_path_component("quixley zoran", IDS, key=KEY) == hidden  # the same name, however typed
    assert scrub_path_component("QUIXLEY^ZORAN", IDS, key=b"another site") != hidden  # keyed
    partial = scrub_path_component("exams_QUIXLEY", IDS, key=KEY)
    assert partial.startswith("exams-")
    assert "quixley" not in partial.casefold()


def test_sibling_folders_that_scrub_to_nothing_stay_apart() -> None:
    # Two date-named sessions of one patient must not merge into one destination folder.
    first = scrub_path_component("20240131", IDS, key=KEY)
    second = scrub_path_component("20240612", IDS, key=KEY)
    assert first != second
    assert "2024" not in first + second


def test_path_components_cannot_escape_their_folder() -> None:
    for name in ("..", ".", "", "a/b", "a\\b"):
        cleaned = scrub_path_component(name, IDS, key=KEY)
        assert "/" not in cleaned and "\\" not in cleaned and cleaned not in ("", ".", "..")


def test_a_pseudonym_key_is_required() -> None:
    with pytest.raises(ValueError, match="key"):
        scrub_path_component("QUIXLEY", IDS, key=b"")


def test_a_folder_shared_by_two_patients_is_scrubbed_with_both() -> None:
    smith = Identifiers.from_values({"patient_name": "SMYTHE^ANNA"})
    jones = Identifiers.from_values({"patient_name": "JONAS^BEN"})
    dirs = scrub_rel_dirs([("import_SMYTHE/a", smith), ("import_SMYTHE/b", jones), ("sub-01/ses-01", jones)], key=KEY)
    top = {d.split("/")[0] for d in (dirs["import_SMYTHE/a"], dirs["import_SMYTHE/b"])}
    assert len(top) == 1  # Jones' series land in the same, scrubbed folder
    assert "smythe" not in "".join(dirs.values()).casefold()
    assert dirs["sub-01/ses-01"] == "sub-01/ses-01"


# --- sidecars --------------------------------------------------------------------------------------------

SIDECAR: dict[str, object] = {
    "Modality": "MR",
    "MagneticFieldStrength": 3,
    "Manufacturer": "Siemens",
    "ManufacturersModelName": "Prisma_fit",
    "InstitutionName": "Saint Quillon Neuro Hospital",
    "InstitutionalDepartmentName": "Tellmark Imaging",
    "InstitutionAddress": "12 Varnbridge Lane",
    "DeviceSerialNumber": "SN4412BZ",
    "StationName": "MRC35123",
    "ReferringPhysicianName": "WOLKENSTEIN^HARALD",
    "PatientName": "QUIXLEY^ZORAN",
    "PatientID": "PID90817",
    "AccessionNumber": "ACN7731",
    "StudyID": "SID884",
    "PatientBirthDate": "1961-04-17",
    "SeriesInstanceUID": "1.2.3",
    "BodyPart": "HEAD",
    "ProcedureStepDescription": "QUIXLEY brain",
    "SoftwareVersions": "syngo MR XA30",
    "StudyDescription": "QUIXLEY^BRAIN",
    "SeriesDescription": "ep2d_bold_QUIXLEY_AP",
    "ProtocolName": "ep2d_bold_QUIXLEY_AP",
    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
    "SeriesNumber": 7,
    "AcquisitionTime": "09:31:00.000000",
    "AcquisitionDateTime": "2024-01-31T09:31:00",
    "ImageComments": "patient QUIXLEY, MRN PID90817",
    "EchoTime": 0.03,
    "RepetitionTime": 2,
    "SliceTiming": [0, 1, 0.5, 1.5],
    "PhaseEncodingDirection": "j-",
    "BidsGuess": ["func", "_task-QUIXLEY_bold"],
    "ConversionSoftware": "dcm2niix",
    "ConversionSoftwareVersion": "v1.0.20260724",
    "SomethingNewInDcm2niix": "value",
}


def test_sidecars_keep_only_the_allow_list_and_scrub_free_text() -> None:
    kept = filter_sidecar(SIDECAR, IDS)
    assert set(kept) <= DEFAULT_SIDECAR_KEYS
    assert not set(kept) & ALWAYS_DROPPED_SIDECAR_KEYS
    assert "SomethingNewInDcm2niix" not in kept  # unknown keys are dropped until someone reviews them
    assert "AcquisitionTime" not in kept  # Basic Profile: times of day go with dates
    assert kept["SeriesDescription"] == "ep2d_bold_AP"
    assert kept["ProtocolName"] == "ep2d_bold_AP"
    assert kept["BidsGuess"] == ["func", "_task-bold"]
    assert kept["ImageType"] == ["ORIGINAL", "PRIMARY", "M", "ND"]  # coded values are not scrubbed
    assert kept["SliceTiming"] == [0, 1, 0.5, 1.5]
    assert list(kept) == [k for k in SIDECAR if k in kept]  # dcm2niix's order
    text = repr(kept).casefold()
    assert not [p for p in PLANTED if p.casefold() in text]
    assert "2024" not in text and "1961" not in text


def test_a_site_may_add_keys_but_never_identifying_ones() -> None:
    extra = parse_extra_keys(" AcquisitionTime , SomethingNewInDcm2niix,,")
    assert extra == {"AcquisitionTime", "SomethingNewInDcm2niix"}
    kept = filter_sidecar({**SIDECAR, "SomethingNewInDcm2niix": "for QUIXLEY"}, IDS, extra)
    assert kept["AcquisitionTime"] == "09:31:00.000000"
    assert kept["SomethingNewInDcm2niix"] == "for"  # added keys are scrubbed as free text
    for refused in ("InstitutionName", "PatientID", "AcquisitionDateTime", "ContentDate", "DateOfLastCalibration"):
        with pytest.raises(ValueError, match=refused):
            parse_extra_keys(f"EchoTime,{refused}")
    with pytest.raises(ValueError, match="not sidecar key names"):
        parse_extra_keys("Echo Time")
    # Even handed over without parse_extra_keys, an identifying key is never kept.
    assert "InstitutionName" not in filter_sidecar(SIDECAR, IDS, frozenset({"InstitutionName"}))


def test_extra_keys_default_to_nothing() -> None:
    assert parse_extra_keys("") == frozenset()
    assert filter_sidecar(SIDECAR, IDS) == filter_sidecar(SIDECAR, IDS, parse_extra_keys(""))


def test_a_description_made_only_of_identifiers_leaves_the_sidecar() -> None:
    kept = filter_sidecar({"SeriesDescription": "QUIXLEY ZORAN", "EchoTime": 0.03}, IDS)
    assert kept == {"EchoTime": 0.03}
