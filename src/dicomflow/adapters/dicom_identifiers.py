"""The identifying values of a series, read with pydicom from its files on disk (the worker has them at
conversion time). They become an `Identifiers` that scrubs the series' sidecar, names and dcm2niix's
messages, and are never stored or logged (docs/privacy.md).

The whole header is read (`stop_before_pixels`), not a 64 KiB prefix: a Siemens CSA header can push
group 0x0020 past 300 KB (DESIGN.md §9), and only the attributes in `KEYWORDS` are decoded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from dicomflow.domain.privacy import Identifiers
from dicomflow.log_privacy import guard

__all__ = ["KEYWORDS", "identifier_values", "read_identifiers", "read_study_time"]

# domain.privacy.IDENTIFIER_KEYS name → pydicom keyword of the same attribute (a unit test checks both match).
KEYWORDS: Final = {
    "patient_name": "PatientName",
    "other_patient_names": "OtherPatientNames",
    "patient_birth_name": "PatientBirthName",
    "patient_mother_birth_name": "PatientMotherBirthName",
    "referring_physician_name": "ReferringPhysicianName",
    "performing_physician_name": "PerformingPhysicianName",
    "operators_name": "OperatorsName",
    "physicians_of_record": "PhysiciansOfRecord",
    "name_of_physicians_reading_study": "NameOfPhysiciansReadingStudy",
    "requesting_physician": "RequestingPhysician",
    "patient_id": "PatientID",
    "other_patient_ids": "OtherPatientIDs",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "device_serial_number": "DeviceSerialNumber",
    "institution_name": "InstitutionName",
    "institution_address": "InstitutionAddress",
    "institutional_department_name": "InstitutionalDepartmentName",
    "station_name": "StationName",
    "patient_birth_date": "PatientBirthDate",
    "study_date": "StudyDate",
    "series_date": "SeriesDate",
    "acquisition_date": "AcquisitionDate",
    "content_date": "ContentDate",
}


def identifier_values(dataset: Any) -> dict[str, str]:
    """The identifying values of a pydicom Dataset, keyed as in IDENTIFIER_KEYS."""
    values: dict[str, str] = {}
    for key, keyword in KEYWORDS.items():
        element = dataset.get(keyword)
        if element is None:
            continue
        # PersonName decodes with the dataset's character set; str() gives family^given as stored.
        text = "\\".join(str(v) for v in element) if _is_multi(element) else str(element)
        if text.strip():
            values[key] = text.strip()
    return values


def _is_multi(value: Any) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"


def read_identifiers(paths: Iterable[Path]) -> Identifiers:
    """The union of the identifiers of `paths` (one file is enough for patient and study attributes;
    pass the first and the last to catch operators or stations that changed mid-series).

    A file pydicom cannot read contributes nothing: the conversion itself reports unreadable files, and
    the generic rules (dates, long numbers) still apply to whatever text is scrubbed.
    """
    from pydicom import dcmread  # noqa: PLC0415 - importing pydicom costs a quarter of a second
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415

    # pydicom logs (logger "pydicom") and warns with the values it found odd, i.e. the very values read
    # here: its records are redacted wherever they go, and its warnings are not shown.
    guard(logging.getLogger("pydicom"))
    result = Identifiers()
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dataset = dcmread(path, stop_before_pixels=True, specific_tags=_SPECIFIC_TAGS, force=True)
                values = identifier_values(dataset)
            except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
                continue
        result = result.union(Identifiers.from_values(values))
    return result


# SpecificCharacterSet too, so names in other character sets decode as the scanner wrote them.
_SPECIFIC_TAGS: Final = ["SpecificCharacterSet", *KEYWORDS.values()]


def read_study_time(path: Path) -> str | None:
    """StudyTime (0008,0030) of one file, as stored (HHMMSS.frac), or None. Never stored or logged: the
    caller keeps only a duration computed from it (domain.facts.offset_from_study)."""
    from pydicom import dcmread  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset = dcmread(path, stop_before_pixels=True, specific_tags=["StudyTime"], force=True)
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
            return None
    value = dataset.get("StudyTime")
    return str(value).strip() or None if value is not None else None
