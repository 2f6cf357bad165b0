"""`make dist`: the functions' source archive carries the whole dependency closure, pinned and hashed
(functions/requirements.txt); a clean virtualenv installs it with `pip install --require-hashes` and imports
every entry point that infra/functions.tf deploys (Cloud Functions builds from exactly these files)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dicomflow import packaging

pytestmark = pytest.mark.infra

ENTRY_POINTS = ("batches_api", "expand_task", "dead_letter_task", "drive_changes_task", "reconcile",
                "renew_channels", "drive_webhook")  # fmt: skip
REPO = packaging.REPO


def _isolated_pip_env() -> dict[str, str]:
    """pip as Cloud Functions runs it: PyPI only, none of this machine's pip configuration (local mirrors,
    find-links, global constraints), which could serve files other than the ones the lock names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"})
    return env


def _venv(path: Path) -> str:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return str(path / "bin" / "python")


def test_the_archive_is_reproducible_and_carries_the_lock(tmp_path: Path) -> None:
    first = packaging.build(tmp_path / "a.zip").read_bytes()
    second = packaging.build(tmp_path / "b.zip").read_bytes()
    assert first == second  # its hash names the uploaded object: identical sources, identical archive
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        names = set(archive.namelist())
        requirements = archive.read("requirements.txt")
    assert {"main.py", "requirements.txt", "dicomflow/__init__.py", "dicomflow/http.py"} <= names
    assert requirements == packaging.LOCK.read_bytes()
    locked = packaging.read_lock(requirements.decode())
    assert ("dcm2niix", "1.0.20260724") in {(e.name, e.version) for e in locked}
    assert all(e.hashes for e in locked)
    # The closure, not just the direct dependencies: transitive packages are locked too.
    assert {"protobuf", "grpcio", "urllib3", "werkzeug"} <= {e.name for e in locked}


def test_the_lock_matches_pyproject_and_constraints() -> None:
    locked = packaging.check_lock()
    pins = {
        packaging.canonical(m.group(1)): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    }
    assert all(pins.get(e.name, e.version) == e.version for e in locked)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_stale_or_unhashed_lock_is_refused(tmp_path: Path) -> None:
    lock_text = packaging.LOCK.read_text()
    constraints = (REPO / "constraints.txt").read_text()
    pyproject = REPO / "pyproject.toml"
    moved_pin = _write(tmp_path / "constraints.txt", constraints.replace("numpy==2.4.6", "numpy==2.4.7"))
    with pytest.raises(packaging.LockError, match=r"numpy==2\.4\.6 but constraints\.txt pins 2\.4\.7.*packaging lock"):
        packaging.check_lock(packaging.LOCK, pyproject, moved_pin)
    unhashed = re.sub(r"(idna==3\.20) \\\n(\s+--hash=sha256:[0-9a-f]+(?: \\)?\n)+", r"\1\n", lock_text)
    assert unhashed != lock_text
    with pytest.raises(packaging.LockError, match=r"idna==3\.20 has no --hash"):
        packaging.check_lock(_write(tmp_path / "unhashed.txt", unhashed), pyproject, REPO / "constraints.txt")
    without_pydicom = re.sub(r"pydicom==3\.0\.2 \\\n(\s+--hash=sha256:[0-9a-f]+(?: \\)?\n)+", "", lock_text)
    assert without_pydicom != lock_text
    with pytest.raises(packaging.LockError, match="runtime dependency pydicom is not locked"):
        packaging.check_lock(_write(tmp_path / "partial.txt", without_pydicom), pyproject, REPO / "constraints.txt")


def test_pip_refuses_a_file_whose_hash_is_not_locked(tmp_path: Path) -> None:
    """The property the lock relies on: in --require-hashes mode a wrong hash stops the install."""
    python = _venv(tmp_path / "venv")
    bad = _write(tmp_path / "requirements.txt", "idna==3.20 --hash=sha256:" + "0" * 64 + "\n")
    result = subprocess.run(
        [python, "-m", "pip", "install", "--require-hashes", "--no-deps", "-r", str(bad)],
        capture_output=True, text=True, check=False, timeout=300, env=_isolated_pip_env(),
    )  # fmt: skip
    assert result.returncode != 0
    assert "DO NOT MATCH THE HASHES" in result.stdout + result.stderr


def test_a_clean_virtualenv_installs_the_archive_by_hash_and_imports_every_entry_point(tmp_path: Path) -> None:
    archive = packaging.build(tmp_path / "functions-source.zip")
    source = tmp_path / "source"
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(source)
    python = _venv(tmp_path / "venv")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--require-hashes", "-r", str(source / "requirements.txt")],
        capture_output=True, text=True, check=False, timeout=900, env=_isolated_pip_env(),
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    probe = (
        "import main\n"
        + "\n".join(f"assert callable(main.{name}), {name!r}" for name in ENTRY_POINTS)
        + "\nprint('ok')"
    )
    result = subprocess.run([python, "-c", probe], cwd=source, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    # Nothing but the lock was installed: the environment is exactly the locked closure.
    frozen = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    installed_names = {packaging.canonical(line.split("==")[0]) for line in frozen.splitlines() if "==" in line}
    assert installed_names == {e.name for e in packaging.read_lock(packaging.LOCK.read_text())}
