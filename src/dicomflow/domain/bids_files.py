"""The top-level files of a BIDS dataset, computed from the plan of every converted series.

Pure functions returning file contents. They are rewritten whole at the end of each batch by one writer
(the batch-completion step), never appended to by workers: the same plan gives byte-identical files, so
concurrent batches and parallel workers cannot race on participants.tsv or scans.tsv, and a re-run that
adds a session changes only that session's scans.tsv and, for a new subject, participants.tsv.

Acquisition times (scans.tsv `acq_time`): the privacy profile allows no real dates or times of day.
BIDS allows dates shifted for de-identification, marked by a year of 1925 or earlier (Common principles,
"Units": dates and times). dicomflow keeps only the time elapsed since the first acquisition of the
session and writes it after the anchor 1800-01-01T00:00:00: every session starts at that instant, the
order and spacing of its runs are kept, and no date, time of day or interval between sessions remains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from dicomflow.domain import bids_schema as schema
from dicomflow.domain.bids import UNCLASSIFIED_DIR, DatasetPlan, PlannedOutput
from dicomflow.domain.paths import join

ANCHOR: Final = datetime(1800, 1, 1)  # zone-less on purpose: a de-identified BIDS datetime
# Files dicomflow writes at the destination that are not BIDS: the QA report. The unclassified folder
# is listed without a trailing slash: bids-validator-deno 3.0.2 still reports `unclassified/` as
# NOT_INCLUDED when the pattern is `unclassified/` (checked in tests/integration/test_bids_dataset.py).
BIDSIGNORE: Final = (UNCLASSIFIED_DIR, "report.html")


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    name: str
    dicomflow_version: str
    dcm2niix_version: str
    authors: tuple[str, ...] = ()
    license: str = ""


def dataset_description(info: DatasetInfo) -> str:
    """dataset_description.json (BIDS "Dataset description"): REQUIRED Name and BIDSVersion, the raw
    DatasetType, and GeneratedBy naming both programs that made the files."""
    data: dict[str, object] = {
        "Name": info.name,
        "BIDSVersion": schema.BIDS_VERSION,
        "DatasetType": "raw",
    }
    if info.license:
        data["License"] = info.license
    if info.authors:
        data["Authors"] = list(info.authors)
    data["GeneratedBy"] = [
        {
            "Name": "dicomflow",
            "Version": info.dicomflow_version,
            "Description": "DICOM to BIDS with dcm2niix; series naming from dcm2niix's BidsGuess and the rules file",
        },
        {"Name": "dcm2niix", "Version": info.dcm2niix_version},
    ]
    return _json(data)


def participants_tsv(plan: DatasetPlan) -> str:
    """One row per subject that has BIDS files. No other column: dicomflow reads no patient attribute
    (age, sex) from DICOM, by the privacy profile."""
    return "participant_id\n" + "".join(f"sub-{subject}\n" for subject in plan.subjects())


def participants_json() -> str:
    return _json({"participant_id": {"Description": "Subject label, from the source folder name or the user."}})


def scans_path(subject: str, session: str | None) -> str:
    name = f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_scans.tsv"
    return join(f"sub-{subject}", f"ses-{session}" if session else "", name)


def scans_tsv(plan: DatasetPlan, subject: str, session: str | None) -> str:
    """sub-<label>[_ses-<label>]_scans.tsv: every NIfTI file of the session with its shifted acq_time."""
    rows: list[tuple[str, str]] = []
    prefix = join(f"sub-{subject}", f"ses-{session}" if session else "") + "/"
    for out in plan.classified:
        if (out.subject, out.session) == (subject, session) and out.nifti:
            rows.append((out.nifti.removeprefix(prefix), _acq_time(out)))
    return "filename\tacq_time\n" + "".join(f"{name}\t{when}\n" for name, when in sorted(rows))


def _acq_time(out: PlannedOutput) -> str:
    offset = out.seconds_from_session_start
    if offset is None:
        return "n/a"
    when = ANCHOR + timedelta(seconds=round(offset, 6))
    return when.isoformat(timespec="seconds" if when.microsecond == 0 else "microseconds")


def scans_json() -> str:
    """Top-level scans.json (inherited by every scans.tsv, BIDS "The Inheritance Principle")."""
    return _json(
        {
            "acq_time": {
                "LongName": "Acquisition time, de-identified",
                "Description": "Time since the first acquisition of the session, written after 1800-01-01T00:00:00. "
                "Real dates and times of day are not kept; every session starts at that anchor.",
            }
        }
    )


def readme(info: DatasetInfo) -> str:
    """A README scaffold (BIDS RECOMMENDS one): what made the dataset and what to fill in."""
    return (
        f"# {info.name}\n\n"
        "Raw MRI data in BIDS, converted from DICOM by dicomflow with dcm2niix "
        f"(dicomflow {info.dicomflow_version}, dcm2niix {info.dcm2niix_version}).\n\n"
        "## To complete\n\n"
        "- What the study is, who took part, and how the data were acquired.\n"
        "- Authors and License in dataset_description.json.\n\n"
        "## How the files were made\n\n"
        "- Subject and session labels come from folder names (`sub-<label>`, `ses-<label>`) or from the "
        "labels given to dicomflow, never from patient names or IDs.\n"
        "- `acq_time` in the scans.tsv files is the time since the start of the session, written after "
        "1800-01-01: no real dates or times of day are kept.\n"
        f"- Series that could not be named in BIDS are in `{UNCLASSIFIED_DIR}/` (ignored by the BIDS "
        "validator through `.bidsignore`), with their reason in dicomflow's report.html.\n"
    )


def bidsignore() -> str:
    return "".join(f"{pattern}\n" for pattern in BIDSIGNORE)


def top_level_files(plan: DatasetPlan, info: DatasetInfo) -> dict[str, str]:
    """Every file computed from the plan, by path relative to the dataset root, in a stable order."""
    files = {
        ".bidsignore": bidsignore(),
        "README.md": readme(info),
        "dataset_description.json": dataset_description(info),
        "participants.json": participants_json(),
        "participants.tsv": participants_tsv(plan),
        "scans.json": scans_json(),
    }
    for subject, session in plan.sessions():
        files[scans_path(subject, session)] = scans_tsv(plan, subject, session)
    return dict(sorted(files.items()))


def _json(data: object) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
