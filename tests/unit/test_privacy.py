"""The de-identification profile (docs/privacy.md): identifiers planted in every attribute the profile knows
are removed from descriptions, protocol names, folder names and sidecars (domain/privacy.py); descriptions
without identifiers survive intact; names keep their end; NIfTI header text fields keep nothing from free
text (adapters/nifti_text.py); library log records cannot carry names (log_privacy.py)."""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import httplib2
import nibabel as nib
import numpy as np
import pytest
from googleapiclient import http as googleapiclient_http
from hypothesis import given
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword

from dicomflow.adapters.dicom_identifiers import KEYWORDS
from dicomflow.adapters.nifti_text import NiftiFormatError, gzip_nifti, header_text, scrub_nifti
from dicomflow.domain.privacy import (
    ALWAYS_DROPPED_SIDECAR_KEYS,
    DEFAULT_SIDECAR_KEYS,
    IDENTIFIER_KEYS,
    DirScrub,
    Identifiers,
    destination_dir,
    filter_sidecar,
    merge_dirs,
    parse_extra_keys,
    scrub_dirs,
    scrub_path_component,
    scrub_rel_dirs,
    scrub_text,
    series_stem,
)
from dicomflow.log_privacy import RedactingFilter, guard

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
        ("QUIXLEYep2d_AP", "ep2d_AP"),  # glued where the case changes
        ("ep2dZoranQuixley", "ep2d"),
        ("QuixleyZoranVex_T1", "T1"),  # three parts glued
        ("fieldmap_quixleyish", "fieldmap_quixleyish"),  # glued in one case: not cut (see the docstring)
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
        ("Imaging_T1", "Imaging_T1"),  # nor of the department ("Tellmark Imaging")
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


def test_a_removal_that_forms_a_date_removes_the_date_too() -> None:
    assert scrub_text("T1_2024_QUIXLEY_01_31_sag", IDS) == "T1_sag"
    assert scrub_text("dwi_123_ACN7731_45_AP", IDS) == "dwi_123_45_AP"  # joined digits stay separate tokens


@given(
    st.lists(st.sampled_from(["QUIXLEY", "Zoran", "2024", "01", "31", "_", " ", "-", "ep2d", "AP", "7"])).map("".join)
)
def test_scrubbing_twice_changes_nothing_more(text: str) -> None:
    once = scrub_text(text, IDS)
    assert scrub_text(once, IDS) == once
    assert not tokens(once) & {"quixley", "zoran"}


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


def test_a_folder_shared_by_two_patients_is_named_by_neither() -> None:
    smith = Identifiers.from_values({"patient_name": "SMYTHE^ANNA"})
    jones = Identifiers.from_values({"patient_name": "JONAS^BEN"})
    dirs = scrub_rel_dirs([("import_SMYTHE/a", smith), ("import_SMYTHE/b", jones), ("sub-01/ses-01", jones)], key=KEY)
    top = {d.split("/")[0] for d in (dirs["import_SMYTHE/a"], dirs["import_SMYTHE/b"])}
    assert len(top) == 1  # Jones' series land in the same folder as Smith's...
    assert re.fullmatch(r"anon-[0-9a-f]{10}", top.pop())  # ...named by neither: their scrubs disagreed
    assert "smythe" not in "".join(dirs.values()).casefold()
    assert dirs["sub-01/ses-01"] == "sub-01/ses-01"


def test_folders_of_one_patient_keep_what_is_not_identifying() -> None:
    dirs = scrub_rel_dirs([("exams_QUIXLEY/sub-01/ses-01", IDS), ("exams_QUIXLEY/sub-01/ses-02", IDS)], key=KEY)
    first, second = dirs["exams_QUIXLEY/sub-01/ses-01"], dirs["exams_QUIXLEY/sub-01/ses-02"]
    assert re.fullmatch(r"exams-[0-9a-f]{10}/sub-01/ses-01", first)
    assert second == first.replace("ses-01", "ses-02")


def test_what_a_scan_records_about_folders_names_nobody() -> None:
    # Scans run in separate tasks; what they store must let the grouping step merge folders without
    # holding identifiers or source names.
    recorded = [s.to_dict() for s in scrub_dirs("QUIXLEY^ZORAN_20240131/MRI ACN7731/sub-01", IDS, key=KEY)]
    text = json.dumps(recorded).casefold()
    assert not [p for p in PLANTED if p.casefold() in text] and "20240131" not in text
    restored = tuple(DirScrub.from_dict(d) for d in recorded)
    merged = merge_dirs([restored])
    assert re.fullmatch(r"anon-[0-9a-f]{10}/MRI-[0-9a-f]{10}/sub-01", destination_dir(restored, merged))
    assert scrub_dirs("a/b", IDS, key=KEY)[1].folder != scrub_dirs("c/b", IDS, key=KEY)[1].folder  # by path


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


# --- NIfTI header text (adapters/nifti_text.py) ------------------------------------------------------------

NIFTI_PLANTED = b"QUIXLEY"


def _nifti(path: Path, *, version: int = 1, endian: str = "<", extension: bool = True) -> np.ndarray:
    """A small image with PHI planted in every text field and in an extension; returns its voxels."""
    data = (np.arange(4 * 5 * 3 * 2, dtype=np.int16).reshape(4, 5, 3, 2) * 7).astype(endian + "i2")
    header_class = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    image_class = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    header = header_class(endianness=endian)
    image = image_class(data, np.eye(4), header=header)
    image.header["descrip"] = b"TE=30;Time=93100.000;phase=1;QUIXLEY"
    image.header["aux_file"] = b"QUIXLEY ZORAN"
    image.header["intent_name"] = b"QUIXLEY"
    if version == 1:
        image.header["db_name"] = b"QUIXLEY"
        image.header["data_type"] = b"QUIXLEY"
    if extension:
        image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"patient QUIXLEY ZORAN PID90817"))
    nib.save(image, path)
    return data


def _raw(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_text_fields_keep_nothing_from_free_text(tmp_path: Path, version: int, endian: str, suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    voxels = _nifti(path, version=version, endian=endian)
    before = _raw(path)
    vox_offset = int(nib.load(path).dataobj.offset)  # the header field reads 0 once nibabel has loaded it
    assert NIFTI_PLANTED in before

    report = scrub_nifti(path)

    after = _raw(path)
    assert NIFTI_PLANTED not in after and b"PID90817" not in after
    assert b"Time=" not in after
    assert report.changed and "descrip" in report.fields and "aux_file" in report.fields
    assert report.extension_bytes > 0
    assert len(after) == len(before)
    assert after[vox_offset:] == before[vox_offset:]  # voxel bytes untouched, in place
    image = nib.load(path)
    assert image.header["descrip"].tobytes().rstrip(b"\0") == b"TE=30;phase=1"
    assert not image.header.extensions
    assert np.array_equal(np.asarray(image.dataobj), voxels)
    assert header_text(after)["aux_file"] == ""


def test_a_clean_nifti_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "img.nii.gz"
    _nifti(path)
    scrub_nifti(path)
    settled = path.read_bytes()
    report = scrub_nifti(path)
    assert not report.changed
    assert path.read_bytes() == settled  # not rewritten


def test_the_report_never_carries_the_removed_text(tmp_path: Path) -> None:
    path = tmp_path / "img.nii"
    _nifti(path)
    assert "QUIXLEY" not in repr(scrub_nifti(path))


def test_gzip_output_is_deterministic_and_readable(tmp_path: Path) -> None:
    source = tmp_path / "img.nii"
    _nifti(source, extension=False)
    plain = source.read_bytes() + bytes(range(256)) * 9000  # more than one block
    outputs = []
    for threads in (1, 3):
        src = tmp_path / f"t{threads}" / "img.nii"
        src.parent.mkdir()
        src.write_bytes(plain)
        out = gzip_nifti(src, threads=threads)
        assert not src.exists()
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]  # the thread count changes nothing
    assert outputs[0][4:8] == b"\0\0\0\0"  # no time stamp
    assert gzip.decompress(outputs[0]) == plain


def test_multi_member_gzip_files_are_read_whole(tmp_path: Path) -> None:
    source = tmp_path / "img.nii"
    _nifti(source)
    plain = source.read_bytes()
    path = tmp_path / "img.nii.gz"
    path.write_bytes(gzip.compress(plain[:400]) + gzip.compress(plain[400:]))
    scrub_nifti(path)
    after = gzip.decompress(path.read_bytes())
    assert NIFTI_PLANTED not in after
    assert len(after) == len(plain)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("x.nii", b"not a nifti file at all, long enough to hold a header" * 20),
        ("x.txt", b""),
        ("x.nii.gz", b"\x1f\x8b\x08\x00garbage"),
    ],
)
def test_files_that_are_not_nifti_are_refused(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(NiftiFormatError):
        scrub_nifti(path)


def test_a_truncated_gzip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "img.nii.gz"
    _nifti(path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(NiftiFormatError, match="truncated"):
        scrub_nifti(path)


# --- logs (log_privacy.py) ------------------------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A handler guarded the way logs.configure must guard its handlers, on the root logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    guard(handler)
    guard(handler)  # idempotent
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


class _FlakyHttp:
    """An httplib2-like transport: 503 once, then 200 (what makes googleapiclient log its retry)."""

    def __init__(self) -> None:
        self.calls = 0

    def request(self, uri: str, method: str, **_: object) -> tuple[httplib2.Response, bytes]:
        self.calls += 1
        return httplib2.Response({"status": 503 if self.calls == 1 else 200}), b"{}"


def test_googleapiclient_retry_warnings_do_not_leak_drive_queries(captured: io.StringIO) -> None:
    query = "q=name+%3D+%27QUIXLEY%5EZORAN%27+and+%27root%27+in+parents&fields=files(id,name)"
    uri = f"https://www.googleapis.com/drive/v3/files?{query}"
    googleapiclient_http._retry_request(
        _FlakyHttp(), 2, "request", lambda _s: None, lambda: 0.0, uri, "GET"
    )  # the real library code path
    text = captured.getvalue()
    assert "googleapiclient.http WARNING Sleeping" in text  # the record is kept...
    assert "https://www.googleapis.com/drive/v3/files?[redacted]" in text  # ...with the path, not the query
    assert "QUIXLEY" not in text and "%27" not in text


def test_library_messages_lose_queries_and_quoted_values(captured: io.StringIO) -> None:
    api = logging.getLogger("googleapiclient.http")
    api.warning("Retry #1 for media upload: PUT https://www.googleapis.com/upload/drive/v3/files?upload_id=QUIXLEY1")
    api.warning("Invalid JSON content from response: %s", b'{"files": [{"name": "QUIXLEY ZORAN"}]}')
    logging.getLogger("googleapiclient.discovery").debug("URL being requested: GET /drive/v3/files?q=QUIXLEY")
    logging.getLogger("urllib3.connectionpool").warning(
        "Retrying after connection broken by 'X': /drive/v3/files?q=name%3D%27QUIXLEY%27"
    )
    logging.getLogger("py.warnings").warning("dataset.py:12: UserWarning: Invalid value for VR PN: 'QUIXLEY^ZORAN'")
    text = captured.getvalue()
    assert "QUIXLEY" not in text
    assert text.count("[redacted]") >= 5


def test_pydicom_messages_are_withheld_whole(captured: io.StringIO) -> None:
    logging.getLogger("pydicom").warning("The value length (7) of PN QUIXLEY is odd")
    text = captured.getvalue()
    assert "QUIXLEY" not in text and "pydicom reported a problem" in text


def test_exceptions_keep_their_frames_but_not_their_queries(captured: io.StringIO) -> None:
    def fetch_series() -> None:
        raise RuntimeError(
            "<HttpError 404 when requesting https://www.googleapis.com/drive/v3/files?q=%27QUIXLEY%27&alt=json "
            "returned \"File 'QUIXLEY ZORAN.dcm' not found\">"
        )

    try:
        fetch_series()
    except RuntimeError:
        logging.getLogger("dicomflow.services.convert_series").exception("download failed")
        logging.getLogger("googleapiclient.http").exception("request failed")
    text = captured.getvalue()
    assert "QUIXLEY" not in text
    assert "fetch_series" in text  # the traceback is still useful
    assert "HttpError 404 when requesting https://www.googleapis.com/drive/v3/files?[redacted]" in text


def test_dicomflow_events_are_left_as_they_are(captured: io.StringIO) -> None:
    logging.getLogger("dicomflow.services.tasks").info("series %s done in %.1f s ('%s')", "ab12", 2.5, "T1w")
    assert "dicomflow.services.tasks INFO series ab12 done in 2.5 s ('T1w')" in captured.getvalue()


def test_the_adapter_reads_every_identifier_the_domain_knows() -> None:
    assert KEYWORDS.keys() == IDENTIFIER_KEYS.keys()
    assert all(tag_for_keyword(keyword) is not None for keyword in KEYWORDS.values())
