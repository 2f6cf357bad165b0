"""Drive transfer (DESIGN.md §8): a 500-file series (~256 KiB per file) from the fake Drive server with
20 ms of latency per request, downloaded by dicomflow's Drive source vs one file at a time (what the old
scripts did), measured side by side in one run. Plus the peak RSS of a process downloading a 100-file
and a 1,000-file series: it must not grow with the series (files stream to disk in bounded chunks).
Targets: >= 8x faster; RSS flat.

    python bench/drive_transfer.py [--files 500] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests/ fakes live beside bench/

from tests.fakes.drive_server import FakeDrive

FILE_BYTES = 256 * 1024


def make_series(fake: FakeDrive, files: int) -> str:
    folder = fake.add_folder(f"series-{files}", fake.root_id)
    for n in range(files):
        fake.add_file(f"IM{n:05d}", folder, os.urandom(FILE_BYTES))
    return folder


_CHILD_PRELUDE = """
import hashlib, io, json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from dicomflow.adapters.drive.connection import DriveConnection
from dicomflow.config import load_settings
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.series import FileRef

def peak_rss_mib():
    # VmHWM belongs to this process image (ru_maxrss would include the parent's size at fork).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0

settings = load_settings(environ={{}}, drive_endpoint={base!r}, drive_identity="bench")
connection = DriveConnection.from_settings(settings)
refs = [e for e in connection.source().list_files(Location(LocationKind.DRIVE, {folder!r})) if isinstance(e, FileRef)]
digest = hashlib.sha256()
"""

_SEQUENTIAL = """
from googleapiclient.http import MediaIoBaseDownload
with connection.client() as service, tempfile.TemporaryDirectory() as tmp:
    started = time.perf_counter()
    for n, ref in enumerate(refs):
        buffer = io.BytesIO()
        downloader = MediaIoBaseDownload(buffer, service.files.get_media(fileId=ref.ref))
        done = False
        while not done:
            _, done = downloader.next_chunk(num_retries=3)
        (Path(tmp) / f"{{n:06d}}.dcm").write_bytes(buffer.getvalue())
    elapsed = time.perf_counter() - started
    for n in range(len(refs)):
        digest.update((Path(tmp) / f"{{n:06d}}.dcm").read_bytes())
"""

_DICOMFLOW = """
with tempfile.TemporaryDirectory() as tmp:
    started = time.perf_counter()
    connection.source().fetch(refs, Path(tmp))
    elapsed = time.perf_counter() - started
    for n in range(len(refs)):
        digest.update((Path(tmp) / f"{{n:06d}}.dcm").read_bytes())
"""

_REPORT = """
connection.close()
import resource as _r; _u = _r.getrusage(_r.RUSAGE_SELF)
report = {{"seconds": elapsed, "rss_mib": peak_rss_mib(), "sha256": digest.hexdigest()}}
print(json.dumps(report | {{"cpu": _u.ru_utime + _u.ru_stime}}))
"""


def run_child(base: str, folder: str, body: str) -> dict[str, float | str]:
    """Download one series in a fresh process (its own GIL, as against a remote Drive); report time and RSS."""
    code = (_CHILD_PRELUDE + body + _REPORT).format(repo=str(Path(__file__).resolve().parents[1]), base=base,
                                                     folder=folder)  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    data: dict[str, float | str] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    with FakeDrive(seed=1) as fake:
        fake.start()
        folder = make_series(fake, args.files)
        fake.latency_seconds = args.latency_ms / 1000
        sequential = run_child(fake.base_url, folder, _SEQUENTIAL)
        ours = run_child(fake.base_url, folder, _DICOMFLOW)
        fake.latency_seconds = 0.0
        small = run_child(fake.base_url, make_series(fake, 100), _DICOMFLOW)
        large = run_child(fake.base_url, make_series(fake, 1000), _DICOMFLOW)
    seq_s, ours_s = float(sequential["seconds"]), float(ours["seconds"])
    print(f"client CPU, whole process: one at a time {sequential['cpu']:.2f} s, dicomflow {ours['cpu']:.2f} s")
    rss_small, rss_large = float(small["rss_mib"]), float(large["rss_mib"])
    same = sequential["sha256"] == ours["sha256"]
    mib = args.files * FILE_BYTES / 2**20
    print(f"series: {args.files} files x 256 KiB = {mib:.0f} MiB, {args.latency_ms:.0f} ms latency per request")
    print(f"one file at a time   : {seq_s:7.2f} s")
    print(f"dicomflow Drive fetch: {ours_s:7.2f} s   (identical bytes: {same})")
    print(f"speed-up             : {seq_s / ours_s:7.1f}x   (target >= 8x)")
    print(f"peak RSS, 100-file series  : {rss_small:6.1f} MiB")
    print(f"peak RSS, 1000-file series : {rss_large:6.1f} MiB   (ratio {rss_large / rss_small:.2f}; flat = ~1)")
    print(json.dumps({"speedup": round(seq_s / ours_s, 2), "rss_ratio": round(rss_large / rss_small, 3)}))


if __name__ == "__main__":
    main()
