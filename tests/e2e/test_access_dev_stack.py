"""Issue 11's proof and issue 12's `dicomflow smoke`, on the dev stack: every component a real process, the
stack signing ID tokens with its own key and the functions verifying them like Google's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomflow import devstack, samples
from dicomflow.api_client import ApiClient, ApiError
from dicomflow.config import load_settings
from dicomflow.dev_issuer import DevIssuer
from tests.fakes.drive_server import FakeDrive
from tests.support import drive, emulators

pytestmark = pytest.mark.e2e

DICOMFLOW = str(Path(sys.executable).parent / "dicomflow")
ALICE, BOB, ADMIN = "alice@lab.example", "bob@lab.example", "admin@lab.example"


def _settings(tmp: Path, **extra: Any) -> Any:
    return load_settings(
        environ={}, mode="cloud", tasks_emulator_python=emulators.tasks_emulator_python(), retry_max_attempts=3,
        dispatch_deadline_seconds=60, convert_timeout_seconds=30, work_dir=str(tmp / "work"), **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[devstack.DevStack, FakeDrive, Path, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("access")
    fake = FakeDrive(seed=12)
    fake.start()
    share = fake.add_folder("Share", fake.root_id)
    ids = {"a": fake.add_folder("GroupA", share), "b": fake.add_folder("GroupB", share)}
    ids["a_nested"] = fake.add_folder("Private-Study-of-John-Smith", fake.add_folder("inner", ids["a"]))
    ids["b_out"] = fake.add_folder("NIfTI", ids["b"])
    grants = {ALICE: [str(tmp / "alice"), f"drive://{ids['a']}"], BOB: [str(tmp / "bob"), f"drive://{ids['b']}"],
              ADMIN: [str(tmp)]}  # fmt: skip
    settings = _settings(tmp, admins=ADMIN, access_grants=json.dumps(grants), drive_endpoint=fake.base_url,
                         drive_identity=drive.IDENTITY, drive_max_retry_sleep_seconds=0.1)  # fmt: skip
    try:
        with devstack.dev_stack(settings, tmp / "logs", firestore_host=emulators.firestore_host(),
                                project=emulators.unique_project(), local_roots=[tmp]) as dev:  # fmt: skip
            yield dev, fake, tmp, ids
    finally:
        fake.stop()


def _refused(call: Any, status: int) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    assert caught.value.status == status, caught.value.problem
    return caught.value


def test_two_users_and_an_administrator(world: tuple[devstack.DevStack, FakeDrive, Path, dict[str, str]]) -> None:
    dev, _fake, tmp, ids = world
    samples.write_series(tmp / "alice" / "dicom" / "s1", samples.SeriesSpec(kind="ct", slices=4), seed=81)
    alice, bob = ApiClient(dev.api_url, dev.token(ALICE)), ApiClient(dev.api_url, dev.token(BOB))
    admin = ApiClient(dev.api_url, dev.token(ADMIN))
    batch_id = alice.submit({"source": str(tmp / "alice" / "dicom"), "destination": str(tmp / "alice" / "out")})[
        "batch_id"
    ]
    # bob can neither see, read, cancel nor retry alice's batch: 404, as for an id that does not exist
    unknown = _refused(lambda: bob.status("doesnotexist0"), 404).problem["detail"]
    for call in (lambda: bob.status(batch_id), lambda: bob.cancel(batch_id), lambda: bob.retry_dead_letters(batch_id)):
        assert _refused(call, 404).problem["detail"] == unknown.replace("doesnotexist0", batch_id)
    assert bob.batches() == []
    # bob cannot use alice's folders (local or Drive, nested deep inside her root) and learns no name
    for body in (
        {"source": str(tmp / "alice" / "dicom"), "destination": str(tmp / "bob" / "out")},
        {"source": f"drive://{ids['a_nested']}", "destination": f"drive://{ids['b_out']}"},
        {"source": str(tmp / "bob" / ".." / "alice" / "dicom"), "destination": str(tmp / "bob" / "out")},
    ):
        problem = _refused(lambda b=body: bob.submit(b), 403).problem  # type: ignore[misc]
        assert (
            "John" not in problem["detail"] and "GroupA" not in problem["detail"] and "Private" not in problem["detail"]
        )
    watch = {"folder": f"drive://{ids['a_nested']}", "destination": f"drive://{ids['b_out']}"}
    assert "John" not in _refused(lambda: bob.add_watch(watch), 403).problem["detail"]
    # anonymous and forged tokens
    _refused(lambda: ApiClient(dev.api_url).batches(), 401)
    forged = DevIssuer(dev.issuer.issuer if dev.issuer else "").token(ADMIN, dev.api_url)  # same name, other key
    _refused(lambda: ApiClient(dev.api_url, forged).batches(), 401)
    _refused(lambda: ApiClient(dev.api_url, dev.token(ADMIN, aud="https://elsewhere")).batches(), 401)
    # bob's own batch, and the administrator sees both
    samples.write_series(tmp / "bob" / "dicom" / "s1", samples.SeriesSpec(kind="ct", slices=4), seed=82)
    bobs = bob.submit({"source": str(tmp / "bob" / "dicom"), "destination": str(tmp / "bob" / "out")})["batch_id"]
    assert [b["batch_id"] for b in bob.batches()] == [bobs]
    assert {b["batch_id"] for b in admin.batches()} >= {batch_id, bobs}
    assert admin.status(batch_id)["owner"] == ALICE
    assert bob.add_watch({"folder": f"drive://{ids['b']}", "destination": f"drive://{ids['b_out']}"})["owner"] == BOB
    assert alice.watches() == [] and len(admin.watches()) == 1


def test_the_cli_refuses_to_send_a_token_over_plain_http_to_another_host(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "DICOMFLOW_API_URL": "http://192.0.2.1:9",
        "DICOMFLOW_API_TOKEN": "x.y.z",
    }
    done = subprocess.run([DICOMFLOW, "status", "somebatch"], capture_output=True, text=True, env=env, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 1 and "refusing to send your token over plain http" in done.stderr


def _smoke(dev: devstack.DevStack, scratch: Path, who: str = devstack.DEV_USER) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DICOMFLOW_API_URL": dev.api_url, "DICOMFLOW_API_TOKEN": dev.token(who)}
    return subprocess.run([DICOMFLOW, "smoke", "--scratch", str(scratch), "--logs", str(dev.log_dir), "--stall", "25",
                           "--timeout", "120"], capture_output=True, text=True, env=env, timeout=300,
                          check=False)  # fmt: skip


def test_smoke_passes_on_a_healthy_stack(world: tuple[devstack.DevStack, FakeDrive, Path, dict[str, str]]) -> None:
    dev, _fake, tmp, _ids = world
    done = _smoke(dev, tmp / "scratch", ADMIN)  # the one granted the whole stack folder
    assert done.returncode == 0, done.stdout + done.stderr
    for check in ("route", "identity", "submit", "indexes", "delivery", "result", "logs"):
        assert f"ok   {check}:" in done.stdout, (check, done.stdout)
    assert "smoke passed" in done.stdout


@pytest.mark.parametrize(
    ("option", "failed", "advice"),
    [
        ({"api_prefix": "dicomflow-batches"}, "route", "strip its own prefix"),
        ({"block_worker": True}, "delivery", "Cloud Tasks cannot call the worker"),
    ],
)
def test_smoke_reports_what_to_change_on_a_broken_stack(
    tmp_path: Path, option: dict[str, Any], failed: str, advice: str
) -> None:
    with devstack.dev_stack(_settings(tmp_path), tmp_path / "logs", firestore_host=emulators.firestore_host(),
                            project=emulators.unique_project(), local_roots=[tmp_path], **option) as dev:  # fmt: skip
        done = _smoke(dev, tmp_path / "scratch")
    assert done.returncode == 1, done.stdout
    assert f"FAIL {failed}:" in done.stdout and advice in done.stdout and "what to change:" in done.stdout
    assert "smoke FAILED" in done.stdout
