"""dcm2niix, from the pinned PyPI wheel (the same pin is installed in the worker image).

Flags are explicit and fixed (DESIGN.md invariant 6): `-z y` gzip, `-b y -ba y` BIDS sidecar with
patient fields removed, and `-f <stem>` — a literal name computed by dicomflow from SeriesNumber and
SeriesDescription, never `%n %i %f` (patient name, patient id, input folder).

`-w 2` (add a suffix on a name clash), never `-w 1`: one series can give several volumes that dcm2niix
cannot tell apart by its own suffixes (`_e2`, `_ph`, `_real`, ...) — several SeriesNumbers under one
SeriesInstanceUID, the original and derived images of a Philips fieldmap — and with `-w 1` each one
overwrote the previous (issue 9). With `-w 2` it names them `B`, `Ba`, `Bb`... in the order it meets
them, which follows the unsorted directory listing; the converter then gives those names out again by
each volume's content (`domain.conversion.deterministic_names`), so a re-run, a download in another
order or a folder of links yields the same name for the same volume. The output folder is fresh for
each attempt, so nothing else can clash.

The pinned dcm2niix skips Deflated Explicit VR Little Endian files ("Unsupported transfer syntax
'1.2.840.10008.1.2.1.99' (inflate files with 'dcmconv +te ...')"). When it says so, the converter does
what the message asks: it writes inflated copies (explicit VR little endian, same data set) next to the
output folder — never into the input folder, which may be the user's — and runs dcm2niix again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dcm2niix as dcm2niix_wheel

from dicomflow.domain.conversion import (
    collision_groups,
    deterministic_names,
    parse_console,
    volumes_of,
)
from dicomflow.domain.failures import ConverterTimeout
from dicomflow.domain.grouping import GroupMember, split_group
from dicomflow.domain.series import ConversionOptions
from dicomflow.ports import ConverterRun

_MERGE_FLAG = {"auto": "2", "yes": "y", "no": "n"}
_CHUNK = 1024 * 1024
DEFLATED = "1.2.840.10008.1.2.1.99"


def binary_path() -> Path:
    return Path(dcm2niix_wheel.bin)


def dcm2niix_args(binary: Path, input_dir: Path, output_dir: Path, stem: str, options: ConversionOptions) -> list[str]:
    if "%" in stem or "/" in stem:
        raise ValueError("the output stem must be a literal file name")
    return [
        str(binary),
        "-z", "y" if options.compress else "n",
        "-b", "y",
        "-ba", "y",
        "-m", _MERGE_FLAG[options.merge_2d],
        "-d", "0",  # only the given folder: it holds exactly one series (sub-folders are other series)
        "-w", "2",  # a clash gets a suffix, never an overwrite (see the module docstring)
        "-f", stem,
        "-o", str(output_dir),
        str(input_dir),
    ]  # fmt: skip


class Dcm2niixConverter:
    """Runs dcm2niix once per series, in its own process group so a timeout kills all of it."""

    def __init__(self, timeout_seconds: float, binary: Path | None = None) -> None:
        self._binary = binary or binary_path()
        self._timeout = timeout_seconds
        self._version = ""

    @property
    def binary(self) -> Path:
        return self._binary

    @property
    def version(self) -> str:
        """The converter version that enters every fingerprint (from the wheel's metadata)."""
        if not self._version:
            self._version = f"dcm2niix-{dcm2niix_wheel.__version__}"
        return self._version

    def convert(
        self,
        input_dir: Path,
        output_dir: Path,
        stem: str,
        options: ConversionOptions,
        *,
        timeout_seconds: float | None = None,
    ) -> ConverterRun:
        timeout = self._timeout if timeout_seconds is None else min(timeout_seconds, self._timeout)
        run = self._run(input_dir, output_dir, stem, options, timeout)
        if DEFLATED in parse_console(run.console).unsupported_syntaxes:
            inflated = inflate_folder(input_dir, output_dir.with_name(output_dir.name + "-inflated"))
            shutil.rmtree(output_dir)
            again = self._run(inflated, output_dir, stem, options, max(1.0, timeout - run.seconds))
            run = ConverterRun(again.exit_code, again.outputs, again.console, run.seconds + again.seconds)
        return run

    def _run(
        self, input_dir: Path, output_dir: Path, stem: str, options: ConversionOptions, timeout: float
    ) -> ConverterRun:
        output_dir.mkdir(parents=True, exist_ok=True)
        exit_code, console, seconds = _execute(
            dcm2niix_args(self._binary, input_dir, output_dir, stem, options), timeout
        )
        return ConverterRun(exit_code, _settled_outputs(output_dir, console), console, seconds)

    def convert_group(
        self, members: Sequence[GroupInput], scratch: Path, options: ConversionOptions, timeout: float
    ) -> tuple[ConverterRun, ...] | str:
        """Several series in one dcm2niix run (domain/grouping.py): each member's outputs end up in its own
        `output_dir` under the names a run of it alone gives them, with a console of its own. Returns why
        not when the run cannot be taken apart exactly; the caller then converts each member alone."""
        root, out = scratch / "in", scratch / "out"
        out.mkdir(parents=True)
        for index, member in enumerate(members):
            folder = root / f"s{index}"
            folder.mkdir(parents=True)
            for path in member.files:
                (folder / path.name).symlink_to(path.resolve())
        args = group_args(self._binary, root, out, options)
        try:
            exit_code, console, seconds = _execute(args, timeout)
        except ConverterTimeout:
            return "the group did not finish in time"
        described = [GroupMember(m.uid, m.stem, len(m.files)) for m in members]
        split = split_group(exit_code, console, [p.name for p in out.iterdir() if p.is_file()], described)
        if isinstance(split, str):
            return split
        runs: list[ConverterRun] = []
        for member, parts in zip(members, split, strict=True):
            member.output_dir.mkdir(parents=True, exist_ok=True)
            for old, new in parts.renames:
                (out / old).rename(member.output_dir / new)
            outputs = _settled_outputs(member.output_dir, parts.console)
            runs.append(ConverterRun(0, outputs, parts.console, seconds / len(members)))
        return tuple(runs)


def _settled_outputs(output_dir: Path, console: str) -> tuple[Path, ...]:
    """The files a run left in `output_dir`, volumes dcm2niix suffixed on a name clash named by content."""
    settle_clashing_names(output_dir, console)
    return tuple(sorted(p for p in output_dir.iterdir() if p.is_file()))


@dataclass(frozen=True, slots=True)
class GroupInput:
    """One series of a group run: its DICOM files, where its outputs go and under which name."""

    files: tuple[Path, ...]
    output_dir: Path
    stem: str
    uid: str  # its SeriesInstanceUID, distinct within the group


def group_args(binary: Path, input_root: Path, output_dir: Path, options: ConversionOptions) -> list[str]:
    """One run over the series folders directly below `input_root` (`-d 1`), outputs named by their
    SeriesInstanceUID (`-f %j`): scratch names only, renamed to each series' literal stem before anything
    leaves the scratch folder. Every other flag is the one a run of a single series uses."""
    args = dcm2niix_args(binary, input_root, output_dir, "group", options)
    args[args.index("-d") + 1] = "1"
    args[args.index("-f") + 1] = "%j"
    return args


def _execute(args: list[str], timeout: float) -> tuple[int, str, float]:
    """Run dcm2niix in its own process group (a timeout kills all of it): exit code, console, seconds."""
    started = time.monotonic()
    with subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ConverterTimeout(
                f"dcm2niix did not finish within {timeout:.0f} s and was stopped; it will be retried. "
                "If this series is very large, raise DICOMFLOW_CONVERT_TIMEOUT_SECONDS."
            ) from None
    return proc.returncode, out.decode("utf-8", errors="replace"), time.monotonic() - started


def inflate_folder(input_dir: Path, target: Path) -> Path:
    """`target` holding every file of `input_dir`: deflated data sets rewritten as explicit VR little
    endian (the same data set: PS3.5 A.5 deflates the encoding, not the content), the others linked."""
    from pydicom import dcmread  # noqa: PLC0415 - only for the rare deflated series
    from pydicom.uid import ExplicitVRLittleEndian  # noqa: PLC0415

    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in input_dir.iterdir() if p.is_file()):
        with warnings.catch_warnings():
            # pydicom's warnings about odd files may quote tag values (patient identifiers): not for logs.
            warnings.simplefilter("ignore")
            ds = dcmread(path, force=True)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and str(meta.get("TransferSyntaxUID", "")) == DEFLATED:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(target / path.name, enforce_file_format=True)
        else:
            (target / path.name).symlink_to(path.resolve())
    return target


def settle_clashing_names(output_dir: Path, console: str) -> dict[str, str]:
    """Give volumes that dcm2niix suffixed `a`, `b`... their name by content, not by dcm2niix's order.

    Returns the renames made (old name -> new name; empty in the usual case of no clash).
    """
    reported = parse_console(console).converted
    groups = collision_groups([r.name for r in reported])
    if not groups:
        return {}
    files = sorted(p.name for p in output_dir.iterdir() if p.is_file())
    volumes = volumes_of(files, reported)
    by_name = {v.name: v for v in volumes}
    names = [name for group in groups for name in group if name in by_name]
    keys = {name: _content_key(output_dir, by_name[name].files) for name in names}
    if len(keys) != sum(len(g) for g in groups):
        return {}  # a reported volume is missing: leave the names alone, assess() reports the loss
    moves = deterministic_names(groups, keys)
    # Every file of a moving volume moves with it: its sidecars and the volumes derived from it.
    plan: list[tuple[str, str]] = []
    for volume in volumes:
        owner = volume.name if volume.name in moves else volume.derived_from
        if owner not in moves:
            continue
        for file_name in volume.files:
            plan.append((file_name, moves[owner] + file_name[len(owner) :]))
    # Through temporary names: the moves can form cycles (B <-> Ba).
    for index, (old, _new) in enumerate(plan):
        (output_dir / old).rename(output_dir / f".dicomflow-rename-{index}")
    for index, (_old, new) in enumerate(plan):
        (output_dir / f".dicomflow-rename-{index}").rename(output_dir / new)
    return moves


def _content_key(folder: Path, files: tuple[str, ...]) -> tuple[object, ...]:
    """(SeriesNumber, derived?, digest of the voxels): orders clashing volumes the same way every time.

    SeriesNumber first so that renumbered re-runs keep their numeric order; original before derived
    (a Philips fieldmap's magnitude before its B0 map); the digest of the uncompressed NIfTI settles the
    rest (gzip headers may differ between runs, the image does not).
    """
    series_number = 1 << 31
    derived = False
    sidecar = next((f for f in files if f.endswith(".json")), None)
    if sidecar is not None:
        try:
            meta = json.loads((folder / sidecar).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta.get("SeriesNumber"), int):
            series_number = int(meta["SeriesNumber"])
        derived = "DERIVED" in [str(v).upper() for v in meta.get("ImageType") or ()]
    digest = hashlib.sha256()
    nifti = next((f for f in files if f.endswith((".nii.gz", ".nii"))), None)
    if nifti is not None:
        opener = gzip.open if nifti.endswith(".gz") else open
        with opener(folder / nifti, "rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
    return (series_number, derived, digest.hexdigest())
