"""Local conversion overhead: `dicomflow convert` vs dcm2niix run per series by `xargs -P <cores>`.

Same generated series, same dcm2niix binary and flags, measured side by side in one run (alternating,
median of N rounds). xargs with one dcm2niix per series directory is the physical limit of the task
(DESIGN.md §8, target ratio <= 1.10). One whole-folder dcm2niix call is shown too: it is what a user
would otherwise run, though it mixes series that share a name and cannot retry or skip anything.
dicomflow's time includes everything: start-up, discovery (header scan), state, outputs, summary.

    python bench/local_overhead.py [--series 40] [--slices 96] [--size 256] [--noise 40] [--rounds 3]
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
from pathlib import Path

import dcm2niix

from dicomflow.samples import make_bench_archive

FLAGS = ["-z", "y", "-b", "y", "-ba", "y", "-m", "2", "-d", "0", "-w", "1", "-f", "%s_%d"]
DICOMFLOW = str(Path(sys.executable).parent / "dicomflow")


def timed(args: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed


def run_xargs(src: Path, out: Path, cores: int) -> float:
    script = (
        'mkdir -p "$2/$(basename "$1")" && exec "$3" ' + " ".join(FLAGS) + ' -o "$2/$(basename "$1")" "$1" >/dev/null'
    )
    command = (
        f"find {src} -mindepth 1 -maxdepth 1 -type d -print0 | "
        f"xargs -0 -P {cores} -I{{}} sh -c '{script}' _ {{}} {out} {dcm2niix.bin}"
    )
    return timed(["bash", "-c", command])


def run_whole_folder(src: Path, out: Path) -> float:
    out.mkdir(parents=True)
    flags = [f for f in FLAGS if f not in ("-d", "0")]  # this one must search sub-folders (default depth 5)
    return timed([dcm2niix.bin, *flags, "-o", str(out), str(src)])


def run_dicomflow(src: Path, out: Path, cores: int, home: Path) -> float:
    env = {**os.environ, "HOME": str(home)}
    return timed([DICOMFLOW, "convert", str(src), str(out), "--workers", str(cores), "--quiet"], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=40)
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each slice")
    parser.add_argument("--noise", type=int, default=40, help="MR noise amplitude (0 = unrealistically compressible)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="dicomflow-bench-") as tmp:
        root = Path(tmp)
        src = root / "dicom"
        started = time.perf_counter()
        written = make_bench_archive(
            src, series=args.series, slices=args.slices, rows=args.size, cols=args.size, seed=1, noise=args.noise
        )
        files = sum(w.n_files for w in written)
        size_mb = sum(p.stat().st_size for w in written for p in w.paths) / 2**20
        generated = time.perf_counter() - started
        print(f"input: {len(written)} series, {files} files, {size_mb:.0f} MiB (generated in {generated:.1f} s)")
        print(f"machine: {cores} cores; dcm2niix {dcm2niix.__version__}; flags {' '.join(FLAGS)}")

        times: dict[str, list[float]] = {"xargs": [], "dicomflow": [], "whole": []}
        for n in range(args.rounds):
            for name, measured in times.items():
                out = root / f"out-{name}-{n}"
                if name == "xargs":
                    measured.append(run_xargs(src, out, cores))
                elif name == "dicomflow":
                    measured.append(run_dicomflow(src, out, cores, root / f"home-{n}"))
                else:
                    measured.append(run_whole_folder(src, out))
                shutil.rmtree(out, ignore_errors=True)

    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'runner':<34} {'median s':>9}   runs")
    print(f"{f'xargs -P {cores} dcm2niix per series':<34} {med['xargs']:>9.2f}   {_fmt(times['xargs'])}")
    print(f"{'dcm2niix once on the whole folder':<34} {med['whole']:>9.2f}   {_fmt(times['whole'])}")
    print(f"{'dicomflow convert':<34} {med['dicomflow']:>9.2f}   {_fmt(times['dicomflow'])}")
    print(f"ratio dicomflow / xargs per series : {med['dicomflow'] / med['xargs']:.3f}  (target <= 1.10)")
    print(f"ratio dicomflow / whole-folder call: {med['dicomflow'] / med['whole']:.3f}")


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
