"""No identifier leaves a conversion (DESIGN.md invariant 6, docs/privacy.md): the README's promise, tested.

Series are written with a distinctive value in every attribute of PS3.15's Basic Profile that pydicom can
write (patient, study, people, institution, device, dates and times, free text), under folder and file
names that carry the patient's name, accession number and dates as real exports do
(tests/support/phi_series.py). They are converted through the real CLI on this machine, and through the
dev stack (functions, worker, Firestore and Cloud Tasks emulators) from and to the fake Drive; then every
place a value could escape is searched: output names, sidecars, NIfTI headers, bval/bvec, logs, the
Firestore documents, the API's answers, the Drive metadata of every output and folder. 0 hits, with one
allowance the profile makes: the local state and log (on the user's machine, 0700/0600) may name local
files by path. A description without identifiers survives intact.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomflow import devstack
from dicomflow.api_client import ApiClient
from dicomflow.config import load_settings
from dicomflow.samples import SeriesSpec
from tests.fakes.drive_server import FakeDrive
from tests.support import drive, emulators
from tests.support.phi_series import PlantedSeries, write_phi_series

pytestmark = pytest.mark.e2e

CLEAN = "ep2d_DTI_20_dir_AP"  # a description with no identifier: it must survive, whole


def _archive(root: Path) -> list[PlantedSeries]:
    planted = [
        write_phi_series(
            root, SeriesSpec(kind="mr3d", slices=4, rows=16, columns=16, series_number=1), seed=1, mark="A"
        ),
        write_phi_series(
            root, SeriesSpec(kind="mr3d", slices=4, rows=16, columns=16, series_number=2), seed=2, mark="B"
        ),
    ]
    clean = SeriesSpec(kind="mr3d", slices=4, rows=16, columns=16, series_number=3)
    return [*planted, write_phi_series(root, clean, seed=3, mark="C", description=CLEAN)]


def _needles(series: list[PlantedSeries]) -> set[str]:
    return {n for s in series for n in s.needles}


def _shared(path: Path) -> bytes:
    """What a recipient can read in an output that is not voxel data: a NIfTI's header (up to
    vox_offset, extensions included), or a whole text file."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    if path.name.endswith((".nii", ".nii.gz")):
        sizeof_hdr = struct.unpack("<i", data[:4])[0]
        little = sizeof_hdr in (348, 540)
        fmt = "<" if little else ">"
        offset = struct.unpack(f"{fmt}f", data[108:112])[0] if sizeof_hdr in (348, 348 << 24) else None
        vox = int(offset) if offset else struct.unpack(f"{fmt}q", data[168:176])[0]
        return data[:vox]
    return data


def _hits(needles: set[str], haystacks: dict[str, bytes]) -> list[tuple[str, str]]:
    return sorted(
        (where, n) for where, blob in haystacks.items() for n in needles if n.lower().encode() in blob.lower()
    )


def _without_local_paths(blob: bytes, root: Path) -> bytes:
    """The local state may name local files by path (the profile's one allowance): blank those paths."""
    return re.sub(re.escape(str(root)).encode() + rb"[^\"'\n,\]]*", b"<local path>", blob)


def _subjects_csv(path: Path, series: PlantedSeries, root: Path) -> list[str]:
    """--layout bids: the first series' top folder (named by the patient's name and a date, as exports are)
    mapped to a subject; the other series have no label and are set aside (unclassified/)."""
    top = series.folder.relative_to(root).parts[0]
    path.write_text(f"folder,subject\n{top},01\n")
    rules = path.with_name("rules.json")  # matched on the scrubbed description: ep2d_bold_AP
    rules.write_text(
        json.dumps(
            {
                "rules": [
                    {
                        "id": "bold",
                        "match": {"SeriesDescription": {"glob": "ep2d_bold*"}},
                        "datatype": "func",
                        "suffix": "bold",
                        "entities": {"task": "rest"},
                    }
                ]
            }
        )
    )
    return ["--layout", "bids", "--subjects", str(path), "--rules", str(rules)]


@pytest.mark.parametrize("layout", ["mirror", "bids"])
def test_no_identifier_leaves_a_local_conversion(tmp_path: Path, layout: str) -> None:
    src, out = tmp_path / "Exams", tmp_path / "NIfTI"
    series = _archive(src)
    env = {**os.environ, "HOME": str(tmp_path)}
    dicomflow = str(Path(sys.executable).parent / "dicomflow")
    extra = _subjects_csv(tmp_path / "subjects.csv", series[0], src) if layout == "bids" else []
    result = subprocess.run([dicomflow, "convert", str(src), str(out), "--json", *extra], capture_output=True,
                            text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counters"]["succeeded"] == 3

    haystacks: dict[str, bytes] = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode()}
    outputs = [p for p in out.rglob("*") if ".dicomflow" not in p.relative_to(out).parts]
    for path in outputs:
        haystacks[f"name {path.relative_to(out)}"] = str(path.relative_to(out)).encode()
        if path.is_file():
            haystacks[f"content {path.relative_to(out)}"] = _shared(path)
    state = out / ".dicomflow"
    for path in state.rglob("*"):
        if path.is_file() and not path.name.endswith(("-wal", "-shm", ".lock")):
            haystacks[f"local state {path.name}"] = _without_local_paths(path.read_bytes(), src)
    assert _hits(_needles(series), haystacks) == []
    assert {p.suffix for p in outputs if p.is_file()} >= {".gz", ".json", ".html"}  # outputs were there to search
    if layout == "bids":  # the BIDS files were there to search too
        names = {p.relative_to(out).as_posix() for p in outputs if p.is_file()}
        assert {"participants.tsv", "sub-01/sub-01_scans.tsv", "dataset_description.json"} <= names
        assert "sub-01/func/sub-01_task-rest_run-1_bold.nii.gz" in names
        assert any(n.startswith("unclassified/") for n in names)  # the series without a subject label

    # The local state is private: the folder 0700, its files 0600.
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in state.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name

    # A description without identifiers survives whole, in the name and in the sidecar.
    (sidecar,) = [p for p in outputs if p.name == f"3_{CLEAN}.json"]
    assert json.loads(sidecar.read_text())["SeriesDescription"] == CLEAN


@pytest.fixture
def fake() -> Iterator[FakeDrive]:
    yield from drive.started(seed=21)


def _firestore_documents(project: str) -> dict[str, bytes]:
    from google.cloud import firestore

    client = firestore.Client(project=project)
    found: dict[str, bytes] = {}

    def walk(collections: Any) -> None:
        for collection in collections:
            for snap in collection.stream():
                found[snap.reference.path] = json.dumps(snap.to_dict(), default=str).encode()
                walk(snap.reference.collections())

    walk(client.collections())
    client.close()
    return found


def _drive_tree(fake: FakeDrive, folder: str, prefix: str = "") -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for entry in fake.children(folder):
        where = f"{prefix}/{entry['name']}"
        found[f"drive metadata {where}"] = json.dumps(entry).encode()
        if entry["mimeType"] == "application/vnd.google-apps.folder":
            found |= _drive_tree(fake, entry["id"], where)
        else:
            data = fake.content(entry["id"])
            if entry["name"].endswith(".gz"):
                data = gzip.decompress(data)
            found[f"drive content {where}"] = data[:65536] if entry["name"].endswith((".nii", ".gz")) else data
    return found


def test_no_identifier_leaves_the_cloud_path(
    fake: FakeDrive, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _archive(tmp_path / "Exams")
    source = fake.add_folder("Exams", fake.root_id)
    drive.upload_tree(fake, tmp_path / "Exams", source)
    dest = fake.add_folder("NIfTI", fake.root_id)
    bids_dest = fake.add_folder("BIDS", fake.root_id)
    project = emulators.unique_project()
    logs = tmp_path_factory.mktemp("logs")
    settings = load_settings(
        environ={}, mode="cloud", tasks_emulator_python=emulators.tasks_emulator_python(), retry_max_attempts=3,
        drive_endpoint=fake.base_url, drive_identity=drive.IDENTITY, drive_max_retry_sleep_seconds=0.1,
        dispatch_deadline_seconds=60, convert_timeout_seconds=30, work_dir=str(tmp_path / "work"),
        access_grants=json.dumps({devstack.DEV_USER: [f"drive://{fake.root_id}"]}),
    )  # fmt: skip
    with devstack.dev_stack(settings, logs, firestore_host=emulators.firestore_host(), project=project) as dev:
        api = ApiClient(dev.api_url, dev.token())  # the stack verifies ID tokens like the cloud (issue 11)
        accepted = api.submit({"source": f"drive://{source}", "destination": f"drive://{dest}"})
        status = _wait(api, accepted["batch_id"])
        assert status["status"] == "completed" and status["counters"]["succeeded"] == 3, status
        # The same archive as a BIDS dataset, the first series' top folder mapped to a subject by its name.
        top = series[0].folder.relative_to(tmp_path / "Exams").parts[0]
        rule = {
            "id": "bold",
            "match": {"SeriesDescription": {"glob": "ep2d_bold*"}},
            "datatype": "func",
            "suffix": "bold",
            "entities": {"task": "rest"},
        }
        layout = {"kind": "bids", "subjects": [{"folder": top, "subject": "01"}], "rules": [rule]}
        bids = api.submit({"source": f"drive://{source}", "destination": f"drive://{bids_dest}", "layout": layout})
        bids_status = _wait(api, bids["batch_id"])
        assert bids_status["status"] == "completed" and not bids_status["finishing"], bids_status
        haystacks = {
            "api submit": json.dumps(accepted).encode(),
            "api status": json.dumps(status).encode(),
            "api bids status": json.dumps(bids_status).encode(),
            "api list": json.dumps(api.batches()).encode(),
        }
        haystacks |= {f"firestore {k}": v for k, v in _firestore_documents(project).items()}
    haystacks |= {f"log {p.name}": p.read_bytes() for p in logs.iterdir() if p.is_file()}
    haystacks |= _drive_tree(fake, dest)
    bids_tree = _drive_tree(fake, bids_dest)
    assert any(k.endswith("/participants.tsv") for k in bids_tree) and any("/sub-01/func/" in k for k in bids_tree)
    staged = [k for k in bids_tree if "/.dicomflow/staging/" in k and "content" in k]
    assert any(k.endswith("/report.html") for k in bids_tree) and staged == []
    haystacks |= {f"bids {k}": v for k, v in bids_tree.items()}
    assert any(k.startswith("firestore batches/") for k in haystacks) and any("drive content" in k for k in haystacks)
    assert _hits(_needles(series), haystacks) == []
    assert any(k.endswith(f"/3_{CLEAN}.nii.gz") for k in haystacks)  # the clean description survives on Drive


def _wait(api: ApiClient, batch_id: str) -> dict[str, Any]:
    """The batch's status once it is final and its finish step (report, BIDS placement) is done."""
    deadline = time.monotonic() + 120
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = api.status(batch_id, page_size="500")
        if status["status"] in ("completed", "completed_with_failures") and not status.get("finishing"):
            break
        time.sleep(0.5)
    return status
