"""`make dist`: the functions' source archive, unpacked into a clean virtualenv, imports every entry point
that infra/functions.tf deploys (Cloud Functions builds from exactly these files)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dicomflow import packaging

pytestmark = pytest.mark.infra

ENTRY_POINTS = ("batches_api", "expand_task", "dead_letter_task", "drive_changes_task", "reconcile",
                "renew_channels", "drive_webhook")  # fmt: skip


def test_the_archive_is_reproducible_and_pins_the_converter(tmp_path: Path) -> None:
    first = packaging.build(tmp_path / "a.zip").read_bytes()
    second = packaging.build(tmp_path / "b.zip").read_bytes()
    assert first == second  # its hash names the uploaded object: identical sources, identical archive
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        names = set(archive.namelist())
        requirements = archive.read("requirements.txt").decode().split()
    assert {"main.py", "requirements.txt", "dicomflow/__init__.py", "dicomflow/http.py"} <= names
    assert "dcm2niix==1.0.20260724" in requirements
    assert all("==" in r for r in requirements)  # every dependency pinned


def test_a_clean_virtualenv_imports_every_entry_point(tmp_path: Path) -> None:
    archive = packaging.build(tmp_path / "functions-source.zip")
    source = tmp_path / "source"
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    installed = subprocess.run(
        [*pip, "-r", str(source / "requirements.txt")], capture_output=True, text=True, check=False, timeout=600
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    probe = (
        "import main\n"
        + "\n".join(f"assert callable(main.{name}), {name!r}" for name in ENTRY_POINTS)
        + "\nprint('ok')"
    )
    result = subprocess.run([python, "-c", probe], cwd=source, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
