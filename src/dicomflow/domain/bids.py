"""`--layout bids`: where every dcm2niix output of every converted series goes in a BIDS dataset.

Pure: it takes what conversion produced (file names and parsed JSON sidecars, per series) and returns a
plan — a BIDS path per output file, sidecar keys to add, and a reason for every output it could not name.
Nothing is dropped: outputs that cannot be named go under `unclassified/<source folder>/`, which
`.bidsignore` hides from the validator (see `bids_files.py`).

How an output is named:
- datatype, suffix and entities come from the first matching rule of the rules file (`bids_rules.py`),
  else from dcm2niix's `BidsGuess` sidecar field (its `run-` is dropped: runs are ours);
- what dcm2niix split a series into decides `echo-<n>` (outputs `_e1`, `_e2`... of a multi-echo series),
  `part-mag`/`part-phase`/`part-real`/`part-imag` (outputs `_ph`, `_real`, `_imaginary`), and for GRE
  fieldmaps `magnitude1`/`magnitude2` and `phasediff` or `phase1`/`phase2`;
- `run-<n>` is always written and numbered per subject, session and kind (same datatype, suffixes and
  entities) in acquisition order. A series keeps the run it was first given (`previous_runs`), so a
  re-run that adds series never renames files already published; numbering stays in acquisition order
  as long as series arrive in that order;
- each fieldmap (one `acq`/`run` group of a session) is assigned the functional and diffusion runs it is
  nearest before (else nearest after), and gets their BIDS URIs as `IntendedFor`, or a shared
  `B0FieldIdentifier`/`B0FieldSource` pair, or both (BIDS "Using IntendedFor metadata" and
  "Using B0FieldIdentifier metadata").

Every rule of the schema the validator checks for these files is applied here (allowed and required
entities, required sidecar keys, `.bval/.bvec` for diffusion): an output that would fail it is set
aside with the reason, so the dataset stays valid and the user learns what to add to the rules file.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from dicomflow.domain import bids_schema as schema
from dicomflow.domain.bids_labels import LabelPolicy, Labels, labels_for
from dicomflow.domain.bids_rules import Rule, first_match
from dicomflow.domain.paths import join

UNCLASSIFIED_DIR: Final = "unclassified"
NO_SUBJECT: Final = (
    "no subject label: name its folder sub-<label>, pass --subject for a one-subject source, "
    "or list its folder in the --subjects mapping file"
)
NIFTI_EXTENSIONS: Final = (".nii.gz", ".nii")
_EXTENSIONS: Final = (*NIFTI_EXTENSIONS, ".json", ".bval", ".bvec")
# dcm2niix output-name suffixes (nii_dicom_batch.cpp): _e<n> echo, _ph phase, _real, _imaginary.
_TOKEN: Final = re.compile(r"_(e\d+|ph|real|imaginary)")
_PART_OF_TOKEN: Final = {"ph": "phase", "real": "real", "imaginary": "imag"}
_TIME: Final = re.compile(r"(\d{2}):?(\d{2}):?(\d{2}(?:\.\d+)?)")

FieldmapStyle = Literal["intended_for", "b0field", "both"]
_Key = tuple[str, str]  # (series_id, output stem)


@dataclass(frozen=True, slots=True)
class ConvertedSeries:
    """What one converted series produced, as the pipeline records it.

    `stem` is the `-f` name dicomflow gave dcm2niix (`Item.output_stem`); `files` the output names
    (base names, or paths whose last component is the name); `sidecars` the parsed JSON sidecar of each
    output, keyed by output stem (the name without extension). `acquired_at` orders series in time:
    seconds on any clock (only differences are used); when None, the sidecar's AcquisitionTime is used.
    """

    series_id: str
    rel_dir: str
    stem: str
    files: tuple[str, ...]
    sidecars: Mapping[str, Mapping[str, object]]
    series_number: int | None = None
    description: str = ""
    acquired_at: float | None = None
    # Labels found when the series was discovered (used when plan_dataset is given no policy).
    labels: Labels | None = None
    # Outputs already placed under a BIDS name, by output stem: their NIfTI path in the dataset. A placed
    # output keeps its name (and the series its run) for good, whatever the rules say now.
    placed: Mapping[str, str] = field(default_factory=dict)
    # Sidecar keys a rule added to a placed output (by stem), kept when its sidecar is written again.
    extras: Mapping[str, Mapping[str, object]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LayoutOptions:
    fieldmaps: FieldmapStyle = "intended_for"

    def __post_init__(self) -> None:
        if self.fieldmaps not in ("intended_for", "b0field", "both"):
            raise ValueError("fieldmaps must be intended_for, b0field or both")


@dataclass(frozen=True, slots=True)
class PlannedFile:
    source: str  # as given in ConvertedSeries.files
    path: str  # relative to the dataset root, '/'-separated


@dataclass(frozen=True, slots=True)
class PlannedOutput:
    """One dcm2niix output (a NIfTI with its sidecar and companions) and where it goes."""

    series_id: str
    stem: str
    files: tuple[PlannedFile, ...]
    subject: str | None = None
    session: str | None = None
    datatype: str = ""
    suffix: str = ""
    entities: tuple[tuple[str, str], ...] = ()
    sidecar_updates: Mapping[str, object] = field(default_factory=dict)
    rule: str = ""  # id of the rule that named it; "" when dcm2niix's guess did
    reason: str = ""  # why it is unclassified; "" when it has a BIDS name
    seconds_from_session_start: float | None = None

    @property
    def classified(self) -> bool:
        return not self.reason

    @property
    def nifti(self) -> str:
        """Its NIfTI file's path in the dataset ("" if it has none)."""
        return next((f.path for f in self.files if f.path.endswith(NIFTI_EXTENSIONS)), "")

    @property
    def sidecar_path(self) -> str:
        return next((f.path for f in self.files if f.path.endswith(".json")), "")


@dataclass(frozen=True, slots=True)
class DatasetPlan:
    outputs: tuple[PlannedOutput, ...]
    runs: Mapping[str, int]  # series_id -> run index; pass back as `previous_runs` on the next plan

    @property
    def classified(self) -> tuple[PlannedOutput, ...]:
        return tuple(o for o in self.outputs if o.classified)

    @property
    def unclassified(self) -> tuple[PlannedOutput, ...]:
        return tuple(o for o in self.outputs if not o.classified)

    def sessions(self) -> tuple[tuple[str, str | None], ...]:
        """(subject, session) pairs with at least one BIDS file, sorted."""
        pairs = {(o.subject, o.session) for o in self.classified if o.subject}
        return tuple(sorted(((s, ses) for s, ses in pairs if s), key=lambda p: (p[0], p[1] or "")))

    def subjects(self) -> tuple[str, ...]:
        return tuple(sorted({s for s, _ in self.sessions()}))


# ------------------------------------------------------------------------------------ classification


@dataclass
class _Output:
    series: ConvertedSeries
    stem: str
    files: list[tuple[str, str]]  # (source name, extension)
    sidecar: Mapping[str, object]
    echo: int | None = None
    part: str | None = None  # None: magnitude (or no part at all)
    unknown: str = ""  # dcm2niix output suffix BIDS has no name for


@dataclass
class _Named:
    datatype: str
    suffix: str
    entities: dict[str, str]
    sidecar: dict[str, object]
    rule: str


def _split_ext(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    for ext in _EXTENSIONS:
        if base.endswith(ext):
            return base[: -len(ext)], ext
    return base, ""


def split_ext(name: str) -> tuple[str, str]:
    """(stem, extension) of an output name: `7_gre_e1.nii.gz` → (`7_gre_e1`, `.nii.gz`)."""
    return _split_ext(name)


def _outputs(series: ConvertedSeries) -> list[_Output]:
    by_stem: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name in series.files:
        stem, ext = _split_ext(name)
        by_stem[stem].append((name, ext))
    outputs = []
    for stem, files in sorted(by_stem.items()):
        out = _Output(series, stem, sorted(files), series.sidecars.get(stem, {}))
        rest = stem[len(series.stem) :] if stem.startswith(series.stem) else stem
        tokens = _TOKEN.findall(rest)
        leftover = _TOKEN.sub("", rest)
        if leftover or any(ext == "" for _, ext in files):
            out.unknown = leftover or next(name for name, ext in files if ext == "")
        for token in tokens:
            if token.startswith("e"):
                out.echo = int(token[1:])
            else:
                out.part = _PART_OF_TOKEN[token]
        outputs.append(out)
    return outputs


def _match_view(out: _Output) -> dict[str, object]:
    """The sidecar as rules see it; SeriesDescription and SeriesNumber from the series when the sidecar
    lacks them (a privacy profile may remove free text from sidecars, not from matching)."""
    view = dict(out.sidecar)
    if out.series.description:
        view.setdefault("SeriesDescription", out.series.description)
    if out.series.series_number is not None:
        view.setdefault("SeriesNumber", out.series.series_number)
    return view


def _from_guess(guess: object) -> _Named | str:
    if not (isinstance(guess, list) and guess and all(isinstance(g, str) for g in guess)):
        return (
            "dcm2niix could not tell what kind of image this is and no rule matched it; "
            "add a rule to the rules file (see docs/bids.md)"
        )
    datatype = guess[0]
    if datatype == "discard":
        return "dcm2niix marks this series as not for BIDS (e.g. a localizer or a derived image)"
    if datatype not in schema.DATATYPES or len(guess) < 2:
        return (
            f"dcm2niix guessed datatype {datatype!r}, which dicomflow does not write to a BIDS "
            f"{schema.BIDS_VERSION} dataset; add a rule if this series belongs in it"
        )
    tokens = [t for t in guess[1].split("_") if t]
    entities: dict[str, str] = {}
    for token in tokens[:-1]:
        name, _, value = token.partition("-")
        # run is ours (acquisition order); echo and part follow from dcm2niix's outputs; a guessed label
        # BIDS would reject is dropped rather than trusted.
        if name not in ("run", "echo", "part") and not schema.entity_error(name, value):
            entities[name] = value
    return _Named(datatype, tokens[-1] if tokens else "", entities, {}, "")


@dataclass(frozen=True, slots=True)
class _Shape:
    """What dcm2niix split one series into: echo numbers per part, and the non-magnitude parts."""

    echoes: Mapping[str | None, tuple[int, ...]]
    parts: frozenset[str]

    @classmethod
    def of(cls, outputs: Sequence[_Output]) -> _Shape:
        echoes: dict[str | None, set[int]] = defaultdict(set)
        for o in outputs:
            if o.echo is not None and not o.unknown:
                echoes[o.part].add(o.echo)
        parts = frozenset(o.part for o in outputs if o.part is not None and not o.unknown)
        return cls({part: tuple(sorted(e)) for part, e in echoes.items()}, parts)

    def echo_index(self, out: _Output) -> int | None:
        """1-based position of the output's echo among its part's echoes, when there are several."""
        echoes = self.echoes.get(out.part, ())
        return echoes.index(out.echo) + 1 if len(echoes) > 1 and out.echo in echoes else None


_GRE_FIELDMAP: Final = frozenset({"magnitude", "magnitude1", "magnitude2", "phasediff", "phase1", "phase2"})
# B0 fieldmaps, by kind: the files of one kind, acq and run form one fieldmap (BIDS "Types of fieldmaps":
# a phase-difference or direct map with its magnitudes, or a set of reversed phase-encoding EPIs). RF
# (B1) maps are not B0 fieldmaps and get neither IntendedFor nor B0FieldIdentifier from dicomflow.
_B0_FAMILY: Final = {**dict.fromkeys((*_GRE_FIELDMAP, "fieldmap"), "gre"), "epi": "epi"}


def parse_bids_path(path: str) -> tuple[Labels, _Named, int] | None:
    """The labels, datatype, suffix, entities and run of a file dicomflow named (`sub-01/ses-1/func/
    sub-01_ses-1_task-rest_run-1_bold.nii.gz`), or None for any other path."""
    parts = path.split("/")
    if len(parts) not in (3, 4) or not parts[0].startswith("sub-"):
        return None
    base, _ = _split_ext(parts[-1])
    tokens = base.split("_")
    entities: dict[str, str] = {}
    for token in tokens[:-1]:
        name, dash, value = token.partition("-")
        if not dash:
            return None
        entities[name] = value
    subject, session, run = entities.pop("sub", ""), entities.pop("ses", None), entities.pop("run", "")
    if not subject or not run.isdigit():
        return None
    return Labels(subject, session), _Named(parts[-2], tokens[-1], entities, {}, ""), int(run)


def _classify(out: _Output, rules: Sequence[Rule], shape: _Shape) -> _Named | str:
    if out.unknown:
        return f"dcm2niix named this output {out.unknown!r}, which has no BIDS equivalent"
    rule = first_match(rules, _match_view(out))
    if rule is not None and rule.unclassified:
        return f"set aside by rule {rule.id!r}: {rule.unclassified}"
    named: _Named | str
    if rule is not None:
        named = _Named(rule.datatype, rule.suffix, dict(rule.entities), dict(rule.sidecar), rule.id)
    else:
        named = _from_guess(out.sidecar.get("BidsGuess"))
    if isinstance(named, str):
        return named
    problem = _apply_shape(named, out, shape)
    return problem or _check(named, out)


def _apply_shape(named: _Named, out: _Output, shape: _Shape) -> str:
    """Echo and part entities, or GRE-fieldmap suffixes, from what dcm2niix split the series into
    (BIDS "Magnitude and phase images", "Multi-echo", and fieldmap cases 1-3)."""
    if named.datatype == "fmap" and named.suffix in _GRE_FIELDMAP:
        if out.part in ("real", "imag"):
            return "BIDS has no name for real or imaginary images of a GRE fieldmap"
        index = shape.echo_index(out)
        phase = out.part == "phase" or (out.part is None and named.suffix.startswith("phase") and not shape.parts)
        if phase:
            named.suffix = f"phase{index}" if index else "phasediff"
        elif index:
            named.suffix = f"magnitude{index}"
        elif not named.suffix.startswith("magnitude"):
            named.suffix = "magnitude1"
        return ""
    index = shape.echo_index(out)
    if index is not None and out.echo is not None:
        named.entities.setdefault("echo", str(out.echo))
    part = out.part or ("mag" if shape.parts else None)
    if part is not None:
        named.entities.setdefault("part", part)
    return ""


def _check(named: _Named, out: _Output) -> _Named | str:
    rule = schema.file_rule(named.datatype, named.suffix)
    if rule is None:
        return f"BIDS has no suffix {named.suffix!r} in {named.datatype}/"
    extra = sorted(set(named.entities) - rule.allowed, key=schema.ENTITY_ORDER.index)
    if extra:
        return f"BIDS does not allow the {extra[0]} entity in a {named.datatype} {named.suffix} file"
    missing = sorted(rule.required - set(named.entities) - {"run"})
    if missing:
        hint = ' (add a rule with "entities": {"task": "..."})' if "task" in missing else ""
        return f"a {named.datatype} {named.suffix} file needs the {missing[0]} entity{hint}"
    if named.datatype == "func" and "task" in named.entities:
        named.sidecar.setdefault("TaskName", named.entities["task"])
    if named.entities.get("part") == "phase" and "Units" not in out.sidecar:
        # BIDS requires Units ("rad" or "arbitrary") for phase images; dcm2niix writes the vendor's
        # stored values unscaled, so they are in arbitrary units until someone rescales them.
        named.sidecar.setdefault("Units", "arbitrary")
    merged = {**out.sidecar, **named.sidecar}
    absent = [k for k in schema.REQUIRED_SIDECAR.get((named.datatype, named.suffix), ()) if k not in merged]
    if absent:
        return (
            f"BIDS requires {', '.join(absent)} in a {named.suffix} sidecar and dcm2niix could not read it "
            'from these DICOM files; add it with a rule\'s "sidecar"'
        )
    have = {ext for _, ext in out.files}
    lacking = [e for e in schema.REQUIRED_COMPANIONS.get((named.datatype, named.suffix), ()) if e not in have]
    if lacking:
        return f"a {named.suffix} file needs {' and '.join(lacking)}, which dcm2niix did not write"
    if not have & set(NIFTI_EXTENSIONS):
        return "dcm2niix wrote no NIfTI image for this output"
    return named


# ---------------------------------------------------------------------------------------- the plan


def seconds_of_day(value: object) -> float | None:
    """A DICOM/BIDS time of day ("14:16:00.5" or "141600.5") in seconds, or None."""
    if not isinstance(value, str) or not (m := _TIME.fullmatch(value.strip())):
        return None
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def acquired_at(series: ConvertedSeries) -> float | None:
    """When the series was acquired, in seconds: the pipeline's value, else the earliest sidecar
    AcquisitionTime (a time of day: series of one session crossing midnight then sort wrongly)."""
    if series.acquired_at is not None:
        return series.acquired_at
    times = [seconds_of_day(sidecar.get("AcquisitionTime")) for sidecar in series.sidecars.values()]
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _order_key(series: ConvertedSeries) -> tuple[int, float, int, str]:
    """Acquisition order: time when known, then SeriesNumber (scanners number series as acquired)."""
    when = acquired_at(series)
    number = series.series_number if series.series_number is not None else 0
    return (0, when, number, series.series_id) if when is not None else (1, 0.0, number, series.series_id)


def _file_name(labels: Labels, named: _Named, run: int, ext: str) -> str:
    entities = {"sub": labels.subject, **({"ses": labels.session} if labels.session else {})}
    entities.update(named.entities)
    entities["run"] = str(run)
    parts = [f"{k}-{v}" for k, v in schema.ordered(entities)]
    folder = join(f"sub-{labels.subject}", f"ses-{labels.session}" if labels.session else "", named.datatype)
    return join(folder, "_".join([*parts, named.suffix]) + ext)


def _unclassified(out: _Output, reason: str, labels: Labels | None) -> PlannedOutput:
    files = tuple(
        PlannedFile(name, join(UNCLASSIFIED_DIR, out.series.rel_dir, name.rsplit("/", 1)[-1])) for name, _ in out.files
    )
    return PlannedOutput(
        out.series.series_id,
        out.stem,
        files,
        labels.subject if labels else None,
        labels.session if labels else None,
        reason=reason,
    )


def plan_dataset(
    series: Iterable[ConvertedSeries],
    policy: LabelPolicy | None,
    rules: Sequence[Rule] = (),
    options: LayoutOptions = LayoutOptions(),
    previous_runs: Mapping[str, int] | None = None,
) -> DatasetPlan:
    """The BIDS layout of every converted series of a destination (all batches so far, not only the last).

    Labels come from `policy` and each series' folders, or, when `policy` is None, from each series'
    own `labels` (found at discovery). Outputs already placed (`ConvertedSeries.placed`) keep their names
    and their series its run; the others are named now, and runs continue with the lowest free numbers.
    Deterministic: the same series, policy, rules and previous runs give the same plan, whatever the
    input order; a plan made again after some of its outputs were placed gives the same names.
    Raises `BidsConfigError` only for source folders whose `sub-`/`ses-` label is invalid.
    """
    all_series = sorted(series, key=_order_key)
    named: dict[_Key, tuple[_Output, _Named, Labels]] = {}
    pinned: dict[_Key, str] = {}
    previous = dict(previous_runs or {})
    planned: list[PlannedOutput] = []
    for s in all_series:
        outputs = _outputs(s)
        labels = s.labels if policy is None else labels_for(s.rel_dir, policy)
        shape = _Shape.of(outputs)
        for out in outputs:
            parsed = parse_bids_path(s.placed[out.stem]) if out.stem in s.placed else None
            if parsed is not None:
                placed_labels, placed_name, run = parsed
                placed_name.sidecar.update(s.extras.get(out.stem, {}))
                named[(s.series_id, out.stem)] = (out, placed_name, placed_labels)
                pinned[(s.series_id, out.stem)] = s.placed[out.stem]
                previous[s.series_id] = run
                continue
            if labels is None:
                planned.append(_unclassified(out, NO_SUBJECT, None))
                continue
            result = _classify(out, rules, shape)
            if isinstance(result, str):
                planned.append(_unclassified(out, result, labels))
            else:
                named[(s.series_id, out.stem)] = (out, result, labels)
    runs = _assign_runs(all_series, named, previous)
    taken: dict[str, str] = {}
    placed: dict[_Key, PlannedOutput] = {}
    starts = _session_starts(named)
    # Placed outputs first: they hold their names, whatever a new output would be called.
    for (series_id, stem), (out, n, labels) in sorted(named.items(), key=lambda kv: kv[0] not in pinned):
        if (series_id, stem) in pinned:
            base = _split_ext(pinned[(series_id, stem)])[0]
            folder = pinned[(series_id, stem)].rsplit("/", 1)[0]
            files = tuple(PlannedFile(name, f"{folder}/{base}{ext}") for name, ext in out.files)
        else:
            files = tuple(PlannedFile(name, _file_name(labels, n, runs[series_id], ext)) for name, ext in out.files)
        nifti = next(f.path for f in files if f.path.endswith(NIFTI_EXTENSIONS))
        if nifti in taken:
            planned.append(_unclassified(out, f"another output already has the BIDS name {nifti}", labels))
            continue
        taken[nifti] = series_id
        when = acquired_at(out.series)
        start = starts.get((labels.subject, labels.session))
        placed[(series_id, stem)] = PlannedOutput(
            series_id,
            stem,
            files,
            labels.subject,
            labels.session,
            n.datatype,
            n.suffix,
            schema.ordered({**n.entities, "run": str(runs[series_id])}),
            dict(n.sidecar),
            n.rule,
            seconds_from_session_start=None if when is None or start is None else when - start,
        )
    _link_fieldmaps(placed, all_series, options)
    everything = tuple(sorted([*planned, *placed.values()], key=lambda o: (o.files[0].path if o.files else "", o.stem)))
    used = {o.series_id for o in placed.values()}
    return DatasetPlan(everything, {sid: run for sid, run in sorted(runs.items()) if sid in used})


def _session_starts(
    named: Mapping[_Key, tuple[_Output, _Named, Labels]],
) -> dict[tuple[str, str | None], float]:
    starts: dict[tuple[str, str | None], float] = {}
    for out, _, labels in named.values():
        when = acquired_at(out.series)
        key = (labels.subject, labels.session)
        if when is not None and (key not in starts or when < starts[key]):
            starts[key] = when
    return starts


def _assign_runs(
    all_series: Sequence[ConvertedSeries],
    named: Mapping[_Key, tuple[_Output, _Named, Labels]],
    previous: Mapping[str, int],
) -> dict[str, int]:
    """Run indices: per subject, session and kind of series, in acquisition order; a series keeps the
    run it already had, new series continue after the highest run in use (BIDS "run" entity: an index
    distinguishing repeated acquisitions of the same kind in one session)."""
    kinds: dict[str, set[tuple[object, ...]]] = defaultdict(set)
    where: dict[str, Labels] = {}
    for (series_id, _), (_, n, labels) in named.items():
        plain = tuple(sorted((k, v) for k, v in n.entities.items() if k not in ("echo", "part")))
        kinds[series_id].add((n.datatype, n.suffix, plain))
        where[series_id] = labels
    groups: dict[tuple[object, ...], list[str]] = defaultdict(list)
    for s in all_series:  # already in acquisition order
        if s.series_id in kinds:
            labels = where[s.series_id]
            groups[(labels.subject, labels.session or "", tuple(sorted(kinds[s.series_id])))].append(s.series_id)
    runs: dict[str, int] = {}
    for members in groups.values():
        used: set[int] = set()
        for series_id in members:
            run = previous.get(series_id)
            if run is not None and run >= 1 and run not in used:
                runs[series_id] = run
                used.add(run)
        # New series take the lowest free numbers in acquisition order. With no gaps that is "after the
        # highest run in use"; and a plan made again after some of its series were placed (a finish step
        # interrupted half-way) gives every series the number the first plan gave it.
        free = (n for n in itertools.count(1) if n not in used)
        for series_id in members:
            if series_id not in runs:
                runs[series_id] = next(free)
    return runs


def _link_fieldmaps(
    placed: dict[_Key, PlannedOutput], all_series: Sequence[ConvertedSeries], options: LayoutOptions
) -> None:
    position = {s.series_id: i for i, s in enumerate(all_series)}
    by_session: dict[tuple[str | None, str | None], list[_Key]] = defaultdict(list)
    for key, out in placed.items():
        by_session[(out.subject, out.session)].append(key)
    for (_, session), members in by_session.items():
        groups: dict[tuple[str, str, str], list[_Key]] = defaultdict(list)
        for key in members:
            family = _B0_FAMILY.get(placed[key].suffix) if placed[key].datatype == "fmap" else None
            if family:
                entities = dict(placed[key].entities)
                groups[(family, entities.get("acq", ""), entities["run"])].append(key)
        if not groups:
            continue
        targets = _fieldmap_targets(placed, members, groups, position)
        for group, keys in groups.items():
            family, acq, run = group
            labels = (family, f"ses{session}" if session else "", f"acq{acq}" if acq else "", f"run{run}")
            ident = "_".join(p for p in labels if p)
            uris = sorted(f"bids::{placed[t].nifti}" for t in targets.get(group, []))
            for key in keys:
                updates = dict(placed[key].sidecar_updates)
                if options.fieldmaps in ("intended_for", "both") and uris:
                    updates["IntendedFor"] = uris
                if options.fieldmaps in ("b0field", "both"):
                    updates["B0FieldIdentifier"] = ident
                placed[key] = _with_updates(placed[key], updates)
            if options.fieldmaps in ("b0field", "both"):
                for t in targets.get(group, []):
                    placed[t] = _with_updates(placed[t], {**placed[t].sidecar_updates, "B0FieldSource": ident})


def _fieldmap_targets(
    placed: Mapping[_Key, PlannedOutput],
    members: Sequence[_Key],
    groups: Mapping[tuple[str, str, str], Sequence[_Key]],
    position: Mapping[str, int],
) -> dict[tuple[str, str, str], list[_Key]]:
    """Each functional or diffusion output of a session goes with the fieldmap acquired last before it,
    or, when none was, the first one after it (a fieldmap corrects the runs that follow it until the
    subject moves or the next fieldmap; protocols that measure it at the end are the exception)."""
    starts = sorted((min(position[k[0]] for k in keys), group) for group, keys in groups.items())
    targets: dict[tuple[str, str, str], list[_Key]] = defaultdict(list)
    for key in members:
        if (placed[key].datatype, placed[key].suffix) not in schema.FIELDMAP_TARGETS:
            continue
        at = position[key[0]]
        before = [group for start, group in starts if start < at]
        targets[before[-1] if before else starts[0][1]].append(key)
    return targets


def _with_updates(out: PlannedOutput, updates: Mapping[str, object]) -> PlannedOutput:
    return PlannedOutput(
        out.series_id,
        out.stem,
        out.files,
        out.subject,
        out.session,
        out.datatype,
        out.suffix,
        out.entities,
        dict(updates),
        out.rule,
        out.reason,
        out.seconds_from_session_start,
    )


def sidecar_text(original: Mapping[str, object], output: PlannedOutput) -> str:
    """The JSON sidecar to write for `output`: dcm2niix's (after the privacy profile) plus our keys."""
    merged = {**original, **output.sidecar_updates}
    return json.dumps(merged, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
