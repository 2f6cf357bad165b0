"""DICOM series with a distinctive value planted in every attribute of the Basic Application Level
Confidentiality Profile (PS3.15 Table E.1-1) that an MR/CT image can carry and pydicom can write with a
text VR: patient, study, people, institution, device, dates and times, free text. Every planted value is
returned as a needle a privacy test searches outputs for.

The sample generator (dicomflow.samples) writes realistic geometry and pixels; this module only adds the
identifying attributes, and stores the files under folder and file names that carry the patient's name,
as a Siemens export does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import dictionary_VR, tag_for_keyword

from dicomflow.samples import SeriesSpec, iter_datasets

# Attributes of Table E.1-1 (Basic Profile action X, Z, D or U) with a text VR; grouped for reading.
PATIENT = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs",
    "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientAge", "PatientAddress",
    "PatientTelephoneNumbers", "CountryOfResidence", "RegionOfResidence", "EthnicGroup", "Occupation",
    "MilitaryRank", "BranchOfService", "MedicalRecordLocator", "PatientReligiousPreference", "PatientComments",
    "AdditionalPatientHistory", "MedicalAlerts", "Allergies", "SpecialNeeds", "PatientState",
    "CurrentPatientLocation", "PatientInstitutionResidence", "ResponsiblePerson", "ResponsibleOrganization",
    "AdmissionID", "AdmittingDate", "AdmittingDiagnosesDescription", "DischargeDiagnosisDescription",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "VisitComments",
)  # fmt: skip
STUDY = (
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription", "SeriesDate", "SeriesTime",
    "AcquisitionDate", "AcquisitionDateTime", "ContentDate", "InstanceCreationDate", "InstanceCreationTime",
    "RequestedProcedureDescription", "RequestedProcedureID", "RequestedProcedureComments",
    "RequestedProcedureLocation", "ReasonForStudy", "ReasonForTheRequestedProcedure", "RequestingService",
    "ImagingServiceRequestComments", "PerformedProcedureStepDescription", "PerformedProcedureStepID",
    "ScheduledProcedureStepDescription", "PerformedLocation", "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
)  # fmt: skip
PEOPLE = (
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "ConsultingPhysicianName", "ContentCreatorName",
)  # fmt: skip
INSTITUTION_AND_DEVICE = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "PerformedStationName", "PerformedStationAETitle", "ScheduledStationName", "ScheduledStationAETitle",
    "GantryID", "GeneratorID", "DetectorID", "DeviceDescription", "LongDeviceDescription",
    "UniqueDeviceIdentifier", "DateOfLastCalibration", "TimeOfLastCalibration",
)  # fmt: skip
FREE_TEXT = (
    "ImageComments", "AcquisitionComments", "AcquisitionDeviceProcessingDescription", "DerivationDescription",
    "IdentifyingComments", "FrameComments", "ContrastBolusAgent", "SeriesDescription", "ProtocolName",
)  # fmt: skip
PLANTED_KEYWORDS = PATIENT + STUDY + PEOPLE + INSTITUTION_AND_DEVICE + FREE_TEXT


@dataclass(frozen=True)
class PlantedSeries:
    folder: Path
    files: tuple[Path, ...]
    series_number: int
    description: str  # the SeriesDescription as written
    needles: tuple[str, ...]  # values that must never appear in anything shared
    planted: tuple[str, ...]  # the attributes that carry one


def _date(i: int) -> tuple[str, str]:
    year, month, day = 1901 + i % 98, 1 + i % 12, 1 + i % 28  # 19xx: never the converter version 1.0.2026...
    return f"{year}{month:02d}{day:02d}", f"{year}-{month:02d}-{day:02d}"


def _values(keyword: str, vr: str, mark: str, i: int) -> tuple[str, list[str]]:
    """(the value to write, the needles it puts into the file)."""
    token = f"ZQ{mark}{i:02d}"
    if vr == "PN":
        return f"{token}FAM^{token}GIV", [f"{token}FAM", f"{token}GIV"]
    if vr == "DA":
        compact, iso = _date(i)
        return compact, [compact, iso]
    if vr == "TM":
        hhmmss = f"21{i % 60:02d}{(7 * i) % 60:02d}"
        return hhmmss, [hhmmss, f"21:{i % 60:02d}:{(7 * i) % 60:02d}"]
    if vr == "DT":
        compact, iso = _date(i)
        return f"{compact}213059", [compact, iso]
    if vr == "AS":
        return "093Y", ["093Y"]  # HIPAA (C): ages over 89
    if vr in ("LT", "ST", "UT"):
        return f"note about {token}TX", [f"{token}TX"]
    return f"{token}TX", [f"{token}TX"]  # LO, SH, AE: short enough for SH's 16 characters


def write_phi_series(
    root: Path, spec: SeriesSpec, *, seed: int, mark: str, description: str | None = None
) -> PlantedSeries:
    """Write `spec` under `root`/<family>^<given>_<date>/MRI <accession> <birth date>/<number>_<family>/, files
    named <family>_<given>.MR.<study description>.<series>.<instance>.<date>.dcm, every PLANTED_KEYWORDS
    attribute set.

    `mark` (one letter) keeps the needles of different series apart. `description` replaces the planted
    SeriesDescription/ProtocolName (to show that one without identifiers survives)."""
    values: dict[str, str] = {}
    needles: list[str] = []
    for i, keyword in enumerate(PLANTED_KEYWORDS):
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(f"pydicom does not know {keyword}")
        value, found = _values(keyword, dictionary_VR(tag), mark, i)
        values[keyword] = value
        needles.extend(found)
    family, given = values["PatientName"].split("^")
    accession, birth = values["AccessionNumber"], values["PatientBirthDate"]
    # What technologists type: the patient's name, the accession number and a date in the description.
    planted_description = f"ep2d_bold_{family}_{accession}_{birth[:4]}-{birth[4:6]}-{birth[6:]}_AP"
    values["SeriesDescription"] = values["ProtocolName"] = description or planted_description
    study = values["StudyDescription"]
    # Folders named by identifiers only (a study folder keeps its ordinary word "MRI"); the free-text study
    # description appears in the file names, which never reach the destination.
    folder = (
        root / f"{family}^{given}_{values['StudyDate']}" / f"MRI {accession} {birth}" / f"{spec.series_number}_{family}"
    )
    folder.mkdir(parents=True)
    files = []
    for n, ds in enumerate(iter_datasets(spec, seed=seed), start=1):
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        # AcquisitionTime stays as generated (dcm2niix derives SliceTiming from it); it is a needle below.
        needles.extend(_time_needles(str(ds.AcquisitionTime)))
        path = folder / f"{family}_{given}.MR.{study}.{spec.series_number:04d}.{n:04d}.{values['StudyDate']}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        needles.extend(str(ds[uid].value) for uid in ("StudyInstanceUID", "SeriesInstanceUID"))
    return PlantedSeries(
        folder=folder,
        files=tuple(files),
        series_number=spec.series_number,
        description=values["SeriesDescription"],
        needles=tuple(sorted(set(needles))),
        planted=PLANTED_KEYWORDS,
    )


def _time_needles(tm: str) -> list[str]:
    """A time of day as dcm2niix renders it: 09:31:00 in the sidecar, Time=93100.000 in descrip."""
    hh, mm, ss = tm[0:2], tm[2:4], tm[4:6]
    return [f"{hh}:{mm}:{ss}", f"{float(tm):.3f}"]
