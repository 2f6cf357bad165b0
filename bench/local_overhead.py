"""Local conversion overhead: `dicomflow convert` vs dcm2niix by hand, side by side in one run (issue 13).

Three inputs, each converted by four runners, alternating, median of N rounds after a warm-up round:
- small: 40 small series (24 slices of 96x96), where dcm2niix's start-up per series dominates;
- large: 40 noisy series of 96 slices of 256x256, where the conversion itself dominates;
- real:  the DICOM files shipped with pydicom and nibabel (scanner data of many vendors), one folder
         per series as discovery groups them.
Runners:
- xargs -P <cores>: one dcm2niix per series folder, in parallel: the physical limit of the task;
- one dcm2niix over the whole folder: what a user would otherwise run (it mixes series that share a
  name and cannot retry, skip or resume anything);
- dicomflow convert, as by default: everything included (start-up, discovery by header scan, state,
  de-identification, outputs, report, summary), one dcm2niix process per series;
- dicomflow convert with DICOMFLOW_GROUP_SMALL_SERIES=true: small series grouped per dcm2niix process.
Targets (issue 13): on small, dicomflow <= 2.0x the whole-folder call and <= 1.05x xargs; no regression
on large (grouping never applies there).

    python bench/local_overhead.py [--sets small,large,real] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import dcm2niix
import nibabel
import pydicom

from dicomflow.adapters.dicom_headers import scan_one
from dicomflow.domain.series import DicomHeader, FileRef, group_series
from dicomflow.samples import make_bench_archive

FLAGS = ["-z", "y", "-b", "y", "-ba", "y", "-m", "2", "-d", "0", "-w", "2", "-f", "%s_%d"]
DICOMFLOW = str(Path(sys.executable).parent / "dicomflow")
RUNNERS = ("xargs", "whole", "dicomflow", "grouped")


def timed(args: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> float:
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode not in ok:
        raise SystemExit(f"{args[0]} failed ({result.returncode}):\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}")
    return elapsed


def run_xargs(src: Path, out: Path, cores: int) -> float:
    script = (
        'mkdir -p "$2/$(basename "$1")" && "$3" ' + " ".join(FLAGS) + ' -o "$2/$(basename "$1")" "$1" >/dev/null; :'
    )
    command = (
        f"find {src} -mindepth 1 -maxdepth 1 -type d -print0 | "
        f"xargs -0 -P {cores} -I{{}} sh -c '{script}' _ {{}} {out} {dcm2niix.bin}"
    )
    return timed(["bash", "-c", command])


def run_whole_folder(src: Path, out: Path) -> float:
    out.mkdir(parents=True)
    flags = [f for f in FLAGS if f not in ("-d", "0")]  # this one must search sub-folders (default depth 5)
    return timed([dcm2niix.bin, *flags, "-o", str(out), str(src)], ok=(0, 1, 2, 8, 10))


def run_dicomflow(src: Path, out: Path, cores: int, home: Path, *, grouped: bool) -> float:
    # As a user runs it: Python caches compiled modules (a CI environment may switch that off; the warm-up
    # round in `measure` writes the cache, so no measured run compiles dicomflow's sources).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env |= {"HOME": str(home), "DICOMFLOW_GROUP_SMALL_SERIES": "true" if grouped else "false"}
    return timed([DICOMFLOW, "convert", str(src), str(out), "--workers", str(cores), "--quiet"], env, ok=(0, 2))


def real_archive(root: Path) -> int:
    """The DICOM files shipped with pydicom and nibabel, linked one folder per series (as discovery groups
    them, so xargs and dicomflow see the same series). Returns the number of series."""
    sources = [Path(pydicom.__file__).parent / "data" / "test_files", Path(nibabel.__file__).parent]
    pairs = []
    for path in sorted(p for s in sources for p in s.rglob("*") if p.is_file() and not p.name.endswith(".gz")):
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = scan_one(lambda n, data=data: data[:n], len(data))
        if isinstance(header, DicomHeader):
            pairs.append((FileRef(str(path), path.name, len(data)), header))
    groups = group_series(pairs)
    for number, group in enumerate(groups):
        folder = root / f"series-{number:03d}"
        folder.mkdir(parents=True)
        for index, ref in enumerate(group.files):
            shutil.copyfile(ref.ref, folder / f"{index:04d}.dcm")
    return len(groups)


def prepare(name: str, src: Path) -> str:
    if name == "small":
        written = make_bench_archive(src, series=40, slices=24, rows=96, cols=96, seed=1, noise=40)
        return f"40 series of 24 slices of 96x96 ({sum(w.n_files for w in written)} files)"
    if name == "large":
        written = make_bench_archive(src, series=40, slices=96, rows=256, cols=256, seed=1, noise=40)
        size = sum(p.stat().st_size for w in written for p in w.paths) / 2**20
        return f"40 noisy series of 96 slices of 256x256 ({size:.0f} MiB)"
    count = real_archive(src)
    files = sum(1 for _ in src.rglob("*.dcm"))
    return f"{count} series from pydicom's and nibabel's test data ({files} files)"


def measure(name: str, root: Path, rounds: int, cores: int) -> dict[str, list[float]]:
    src = root / name
    print(f"\n[{name}] {prepare(name, src)}", flush=True)
    jobs: dict[str, Callable[[Path, Path], float]] = {
        "xargs": lambda out, _home: run_xargs(src, out, cores),
        "whole": lambda out, _home: run_whole_folder(src, out),
        "dicomflow": lambda out, home: run_dicomflow(src, out, cores, home, grouped=False),
        "grouped": lambda out, home: run_dicomflow(src, out, cores, home, grouped=True),
    }
    times: dict[str, list[float]] = {runner: [] for runner in RUNNERS}
    for runner in RUNNERS:  # warm-up, not measured: page cache, Python's bytecode cache
        jobs[runner](root / f"out-{name}-{runner}-warm", root / f"home-{name}-warm")
        shutil.rmtree(root / f"out-{name}-{runner}-warm", ignore_errors=True)
    for n in range(rounds):
        for runner in RUNNERS:
            out, home = root / f"out-{name}-{runner}-{n}", root / f"home-{name}-{n}"
            times[runner].append(jobs[runner](out, home))
            shutil.rmtree(out, ignore_errors=True)
    med = {runner: statistics.median(values) for runner, values in times.items()}
    labels = {
        "xargs": f"xargs -P {cores} dcm2niix per series",
        "whole": "dcm2niix once on the whole folder",
        "dicomflow": "dicomflow convert (default)",
        "grouped": "dicomflow, small series grouped",
    }
    for runner in RUNNERS:
        print(f"  {labels[runner]:<38} {med[runner]:>7.2f} s   ({' '.join(f'{v:.2f}' for v in times[runner])})")
    print(f"  ratio dicomflow / xargs per series : {med['dicomflow'] / med['xargs']:.2f}")
    print(f"  ratio dicomflow / whole-folder call: {med['dicomflow'] / med['whole']:.2f}")
    print(f"  ratio dicomflow grouped / xargs per series : {med['grouped'] / med['xargs']:.2f}")
    print(f"  ratio dicomflow grouped / whole-folder call: {med['grouped'] / med['whole']:.2f}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="small,large,real", help="comma-separated: small, large, real")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores; dcm2niix {dcm2niix.__version__}; flags {' '.join(FLAGS)}")
    with tempfile.TemporaryDirectory(prefix="dicomflow-bench-") as tmp:
        for name in args.sets.split(","):
            measure(name.strip(), Path(tmp), args.rounds, cores)


if __name__ == "__main__":
    main()
