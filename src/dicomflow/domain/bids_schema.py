"""The part of the BIDS specification dicomflow writes: datatypes, suffixes, entities and their order.

Facts from the BIDS schema that the official validator (`bids-validator-deno` 3.0.2, schema for BIDS
1.11.1) checks, restricted to what dcm2niix produces from MRI: the raw-data file rules
(`rules.files.raw.{anat,func,dwi,fmap}` of the schema) and the entity table (BIDS Appendix "Entities",
whose order is the order of entities in a file name). Kept as plain data so a change of BIDS version is a
change of this one file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

# The version of the specification the validator in `make test` checks (bids-validator-deno 3.0.2).
BIDS_VERSION: Final = "1.11.1"

# BIDS Common principles, "Entities": a label is alphanumeric, an index is a non-negative integer.
LABEL_PATTERN: Final = re.compile(r"[a-zA-Z0-9]+")
INDEX_PATTERN: Final = re.compile(r"[0-9]+")

# Entity short names in the order BIDS file names must use (Appendix "Entities", entity table).
ENTITY_ORDER: Final[tuple[str, ...]] = (
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec", "dir",
    "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split", "recording",
    "chunk",
)  # fmt: skip

# Entities whose value is an index (digits), not a label.
INDEX_ENTITIES: Final = frozenset({"run", "echo", "flip", "inv", "chunk", "split"})

# The `part` entity's allowed values (Appendix "Entities": part).
PART_VALUES: Final = ("mag", "phase", "real", "imag")


@dataclass(frozen=True, slots=True)
class FileRule:
    """One raw-data file rule of the schema: which suffixes in which datatype take which entities."""

    datatype: str
    suffixes: tuple[str, ...]
    optional: frozenset[str]
    required: frozenset[str] = frozenset()

    @property
    def allowed(self) -> frozenset[str]:
        return self.optional | self.required


def _rule(datatype: str, suffixes: str, optional: str, required: str = "") -> FileRule:
    return FileRule(datatype, tuple(suffixes.split()), frozenset(optional.split()), frozenset(required.split()))


# rules.files.raw of the BIDS 1.11.1 schema, for the datatypes dcm2niix output can belong to. `sub` and
# `ses` are left out: every rule here takes both. Perfusion (`perf`) is left out on purpose: an ASL
# series is valid BIDS only with an aslcontext.tsv and labelling metadata that DICOM does not carry.
FILE_RULES: Final[tuple[FileRule, ...]] = (
    _rule("anat", "T1w T2w PDw T2starw FLAIR inplaneT1 inplaneT2 PDT2 angio", "task acq ce rec run echo part chunk"),
    _rule(
        "anat",
        "T1map T2map T2starmap R1map R2map R2starmap PDmap MTRmap MTsat UNIT1 T1rho MWFmap MTVmap Chimap S0map M0map",
        "task acq ce rec run chunk",
    ),
    _rule("anat", "MEGRE", "task acq ce rec run part chunk", "echo"),
    _rule("anat", "MESE", "task acq ce rec dir run part chunk", "echo"),
    _rule("anat", "VFA", "task acq ce rec run echo part chunk", "flip"),
    _rule("anat", "IRT1", "task acq ce rec run part chunk", "inv"),
    _rule("anat", "MP2RAGE", "task acq ce rec run echo flip part chunk", "inv"),
    _rule("anat", "MPM MTS", "task acq ce rec run echo part chunk", "flip mt"),
    _rule("anat", "MTR", "task acq ce rec run part chunk", "mt"),
    _rule("func", "bold cbv sbref", "acq ce rec dir run echo part chunk", "task"),
    _rule("dwi", "dwi sbref", "acq rec dir run part chunk"),
    _rule("fmap", "phasediff phase1 phase2 magnitude1 magnitude2 magnitude fieldmap", "acq run chunk"),
    _rule("fmap", "epi", "acq ce rec dir run part chunk"),
    _rule("fmap", "TB1DAM", "acq ce rec run inv part chunk", "flip"),
    _rule("fmap", "TB1EPI", "acq ce rec run inv part chunk", "echo flip"),
    _rule("fmap", "TB1AFI TB1TFL TB1RFM RB1COR", "acq ce rec run echo flip inv part chunk"),
    _rule("fmap", "TB1SRGE", "acq ce rec run echo part chunk", "flip inv"),
    _rule("fmap", "TB1map RB1map", "acq ce rec run chunk"),
)

DATATYPES: Final = tuple(sorted({r.datatype for r in FILE_RULES}))

# Sidecar keys BIDS REQUIRES for a suffix (Modality specific files, MRI), which the validator checks.
# dcm2niix fills them from vendor headers when it can; when it cannot, the output is set aside with a
# reason instead of making the dataset invalid.
REQUIRED_SIDECAR: Final[dict[tuple[str, str], tuple[str, ...]]] = {
    ("func", "bold"): ("RepetitionTime", "TaskName"),
    ("func", "cbv"): ("RepetitionTime", "TaskName"),
    ("fmap", "phasediff"): ("EchoTime1", "EchoTime2"),
    ("fmap", "phase1"): ("EchoTime",),
    ("fmap", "phase2"): ("EchoTime",),
    ("fmap", "fieldmap"): ("Units",),
    ("fmap", "epi"): ("PhaseEncodingDirection", "TotalReadoutTime"),
}

# Companion files a suffix needs besides its NIfTI and JSON (MRI "Diffusion imaging data").
REQUIRED_COMPANIONS: Final[dict[tuple[str, str], tuple[str, ...]]] = {("dwi", "dwi"): (".bval", ".bvec")}

# Images a fieldmap corrects: the BIDS "Using IntendedFor metadata" section lists functional and
# diffusion runs as the usual targets; single-band references are corrected with their run.
FIELDMAP_TARGETS: Final = frozenset(
    {("func", "bold"), ("func", "cbv"), ("func", "sbref"), ("dwi", "dwi"), ("dwi", "sbref")}
)


def file_rule(datatype: str, suffix: str) -> FileRule | None:
    for rule in FILE_RULES:
        if rule.datatype == datatype and suffix in rule.suffixes:
            return rule
    return None


def suffixes_of(datatype: str) -> tuple[str, ...]:
    return tuple(s for r in FILE_RULES if r.datatype == datatype for s in r.suffixes)


def entity_error(name: str, value: str) -> str:
    """Why `value` is not a valid value of entity `name`, or "" when it is."""
    if name not in ENTITY_ORDER or name in ("sub", "ses"):
        return f"'{name}' is not an entity dicomflow can set (use one of {', '.join(ENTITY_ORDER[2:])})"
    if name in INDEX_ENTITIES:
        return "" if INDEX_PATTERN.fullmatch(value) else f"{name} must be a number (BIDS index), not {value!r}"
    if name == "part" and value not in PART_VALUES:
        return f"part must be one of {', '.join(PART_VALUES)}, not {value!r}"
    return "" if LABEL_PATTERN.fullmatch(value) else f"{name} must be letters and digits only, not {value!r}"


def ordered(entities: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Entities in BIDS file-name order."""
    return tuple((name, entities[name]) for name in ENTITY_ORDER if name in entities)
