"""dcm2niix, from the pinned PyPI wheel (the same pin is installed in the worker image).

Flags are explicit and fixed (DESIGN.md invariant 6): `-z y` gzip, `-b y -ba y` BIDS sidecar with
patient fields removed, `-w 1` overwrite inside the fresh per-attempt output folder, and `-f <stem>` —
a literal name computed by dicomflow from SeriesNumber and SeriesDescription, never `%n %i %f` (patient
name, patient id, input folder).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import dcm2niix as dcm2niix_wheel

from dicomflow.domain.failures import ConverterTimeout
from dicomflow.domain.series import ConversionOptions
from dicomflow.ports import ConverterRun

_MERGE_FLAG = {"auto": "2", "yes": "y", "no": "n"}


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
        "-w", "1",
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
        output_dir.mkdir(parents=True, exist_ok=True)
        args = dcm2niix_args(self._binary, input_dir, output_dir, stem, options)
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
        seconds = time.monotonic() - started
        outputs = tuple(sorted(p for p in output_dir.iterdir() if p.is_file()))
        return ConverterRun(
            exit_code=proc.returncode,
            outputs=outputs,
            console=out.decode("utf-8", errors="replace"),
            seconds=seconds,
        )
