"""One synthetic MR session with every kind of series a BIDS dataset is made of, for `--layout bids`.

`samples.make_demo_archive` covers anatomical, 4D and diffusion series; a BIDS layout needs more: a
single-band reference, a multi-echo BOLD run, repeated runs of one task, a pair of reversed phase-encoding
fieldmaps, a GRE fieldmap (two magnitude echoes and a phase series), and a series holding magnitude and
phase images together. `add_bids_session` writes those into an archive with `samples`' own encoder, so
they share its geometry, phantom and determinism (same seed, same bytes).

Series are acquired 5 minutes apart in SeriesNumber order (`samples`' timing), so runs of one kind
are numbered as their series numbers go.

What dcm2niix 1.0.20260724 makes of them without vendor private headers: a `BidsGuess` for the T1w
(`anat`) and diffusion (`dwi`) series; none for gradient-echo EPI (BOLD, SBRef, EPI fieldmaps), nor the
phase encoding polarity (`PhaseEncodingDirection`) or `TotalReadoutTime` that EPI fieldmaps require,
nor the echo times of a phase-difference map. Real Siemens data carries those in the CSA header; here
`BIDS_RULES` supplies them, the way a user's rules file would (docs/bids.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomflow.samples import Patient, SeriesSpec, Study, derive_uid, iter_datasets, write_series

__all__ = ["BIDS_RULES", "BidsSeries", "BidsSession", "add_bids_session"]

_PHASE_IMAGE_TYPE: Final = ["ORIGINAL", "PRIMARY", "P", "ND"]


@dataclass(frozen=True)
class BidsSeries:
    """One written series and the BIDS files (names without sub/ses and extension) it must become."""

    folder: Path  # relative to the archive root
    series_number: int
    description: str
    expected: tuple[str, ...]  # e.g. ("func/task-rest_run-1_bold",); () for series set aside


@dataclass(frozen=True)
class BidsSession:
    subject: str
    session: str
    series: tuple[BidsSeries, ...]


# The rules file a user of this scanner protocol would write (JSON, docs/bids.md). EPI fieldmap polarity
# and readout time come from the protocol, as a user would read them from the scanner's exam card.
BIDS_RULES: Final = json.dumps(
    {
        "rules": [
            {
                "id": "sbref",
                "match": {"SeriesDescription": {"glob": "*_SBRef"}},
                "datatype": "func",
                "suffix": "sbref",
                "entities": {"task": "rest"},
            },
            {
                "id": "rest",
                "match": {"SeriesDescription": {"regex": "(?i)rest.*bold|bold.*rest"}},
                "datatype": "func",
                "suffix": "bold",
                "entities": {"task": "rest"},
            },
            {
                "id": "nback",
                "match": {"SeriesDescription": {"glob": "*nback*"}},
                "datatype": "func",
                "suffix": "bold",
                "entities": {"task": "nback"},
            },
            {
                "id": "me-bold",
                "match": {"ProtocolName": "fMRI_multiecho"},
                "datatype": "func",
                "suffix": "bold",
                "entities": {"task": "rest", "acq": "me"},
            },
            {
                "id": "fmap-ap",
                "match": {"SeriesDescription": "SpinEchoFieldMap_AP"},
                "datatype": "fmap",
                "suffix": "epi",
                "entities": {"dir": "AP"},
                "sidecar": {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.0465},
            },
            {
                "id": "fmap-pa",
                "match": {"SeriesDescription": "SpinEchoFieldMap_PA"},
                "datatype": "fmap",
                "suffix": "epi",
                "entities": {"dir": "PA"},
                "sidecar": {"PhaseEncodingDirection": "j", "TotalReadoutTime": 0.0465},
            },
            {
                "id": "gre-phase",
                "match": {"SeriesDescription": "gre_field_mapping", "ImageType": "P"},
                "datatype": "fmap",
                "suffix": "phasediff",
                "sidecar": {"EchoTime1": 0.00492, "EchoTime2": 0.00738},
            },
            {
                "id": "gre-magnitude",
                "match": {"SeriesDescription": "gre_field_mapping"},
                "datatype": "fmap",
                "suffix": "magnitude1",
            },
            {
                "id": "t2star",
                "match": {"SeriesDescription": "T2star_magphase"},
                "datatype": "anat",
                "suffix": "T2starw",
            },
            {
                "id": "scout",
                "match": {"SeriesDescription": {"regex": "(?i)scout|localizer"}},
                "unclassified": "localizers are not analysed",
            },
        ]
    },
    indent=2,
)


def _session_study(subject: str) -> Study:
    return Study(
        study_date="20240301",
        study_time="080000",
        description="BIDS^PROTOCOL",
        accession_number=f"ACCBIDS{subject}",
        study_id="1",
    )


def add_bids_session(root: Path, *, subject: str = "04", session: str = "01", seed: int = 0) -> BidsSession:
    """Write `sub-<subject>/ses-<session>/<NNN>_<description>/` series under `root` (which may hold
    other data, e.g. a demo archive) and return what each must become in BIDS."""
    patient = Patient(name=f"BIDS^SUBJECT{subject}", patient_id=f"BIDS{subject}", birth_date="19800101", sex="O")
    study = _session_study(subject)
    base = Path(f"sub-{subject}", f"ses-{session}")
    written: list[BidsSeries] = []

    def add(spec: SeriesSpec, expected: tuple[str, ...], *, with_phase: bool = False, phase_only: bool = False) -> None:
        spec = replace(spec, patient=patient, study=study)
        folder = base / f"{spec.series_number:03d}_{spec.description}"
        if with_phase or phase_only:
            _write_with_phase(root / folder, spec, seed=seed, magnitude=not phase_only)
        else:
            write_series(root / folder, spec, seed=seed, file_names="numbered")
        written.append(BidsSeries(folder, spec.series_number, spec.description, expected))

    epi = SeriesSpec(kind="mr4d", slices=8, rows=24, columns=24)
    add(SeriesSpec(kind="mr3d", series_number=1, series_description="AAHead_Scout", slices=6), ())
    add(SeriesSpec(kind="mr3d", series_number=2, slices=12), ("anat/acq-tfl3_run-1_T1w",))
    add(
        replace(epi, series_number=3, series_description="SpinEchoFieldMap_AP", volumes=1),
        ("fmap/dir-AP_run-1_epi",),
    )
    add(
        replace(epi, series_number=4, series_description="SpinEchoFieldMap_PA", volumes=1),
        ("fmap/dir-PA_run-1_epi",),
    )
    add(
        replace(epi, series_number=5, series_description="rfMRI_REST_AP_SBRef", volumes=1),
        ("func/task-rest_run-1_sbref",),
    )
    add(
        replace(epi, series_number=6, series_description="rfMRI_REST_AP_bold", volumes=4),
        ("func/task-rest_run-1_bold",),
    )
    add(
        replace(epi, series_number=9, series_description="tfMRI_nback_bold", volumes=3),
        ("func/task-nback_run-1_bold",),
    )
    add(
        replace(epi, series_number=10, series_description="tfMRI_nback_bold", volumes=3),
        ("func/task-nback_run-2_bold",),
    )
    add(
        replace(epi, series_number=11, series_description="fMRI_multiecho", volumes=3, echo_times_ms=(14.0, 38.0)),
        ("func/task-rest_acq-me_run-1_echo-1_bold", "func/task-rest_acq-me_run-1_echo-2_bold"),
    )
    add(
        SeriesSpec(kind="dwi", series_number=12, volumes=7, slices=8),
        ("dwi/acq-epb0_dir-AP_run-1_dwi",),
    )
    add(
        SeriesSpec(
            kind="mr3d",
            series_number=7,
            series_description="gre_field_mapping",
            slices=8,
            echo_times_ms=(4.92, 7.38),
            repetition_time_ms=500.0,
            flip_angle_deg=60.0,
        ),
        ("fmap/run-1_magnitude1", "fmap/run-1_magnitude2"),
    )
    add(
        SeriesSpec(
            kind="mr3d",
            series_number=8,
            series_description="gre_field_mapping",
            slices=8,
            echo_times_ms=(7.38,),
            repetition_time_ms=500.0,
            flip_angle_deg=60.0,
        ),
        ("fmap/run-1_phasediff",),
        phase_only=True,
    )
    add(
        SeriesSpec(
            kind="mr3d", series_number=13, series_description="T2star_magphase", slices=8, echo_times_ms=(20.0,)
        ),
        ("anat/run-1_part-mag_T2starw", "anat/run-1_part-phase_T2starw"),
        with_phase=True,
    )
    return BidsSession(subject, session, tuple(written))


def _phase_datasets(spec: SeriesSpec, seed: int, offset: int) -> Iterator[Dataset]:
    """The series' images again as phase images (ImageType P), numbered after the magnitude ones,
    with their own SOP instance UIDs — how Siemens stores magnitude and phase in one series."""
    for ds in iter_datasets(spec, seed=seed):
        uid = derive_uid(seed, "phase", ds.SOPInstanceUID)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
        ds.ImageType = list(_PHASE_IMAGE_TYPE)
        ds.InstanceNumber = int(ds.InstanceNumber) + offset
        yield ds


def _write_with_phase(folder: Path, spec: SeriesSpec, *, seed: int, magnitude: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    datasets = list(iter_datasets(spec, seed=seed)) if magnitude else []
    datasets += list(_phase_datasets(spec, seed, spec.n_files if magnitude else 0))
    for ds in datasets:
        ds.save_as(folder / f"IM-{spec.series_number:04d}-{int(ds.InstanceNumber):04d}.dcm", enforce_file_format=True)
