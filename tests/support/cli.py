"""Running the `dicomflow` command as a user does: a real process, with its own HOME (so the registry of
recent destinations is the test's own) and short retry delays."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DICOMFLOW = str(Path(sys.executable).parent / "dicomflow")


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "HOME": str(home), "DICOMFLOW_RETRY_MIN_BACKOFF_SECONDS": "0.1",
            "DICOMFLOW_RETRY_MAX_BACKOFF_SECONDS": "0.5", **extra}  # fmt: skip


def run_cli(
    *args: str,
    home: Path,
    timeout: float = 240,
    check_codes: tuple[int, ...] = (0, 1, 2),
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([DICOMFLOW, *args], capture_output=True, text=True, env=env or cli_env(home),
                            timeout=timeout, check=False, cwd=cwd)  # fmt: skip
    assert result.returncode in check_codes, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    return result


def json_result(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


def outputs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".dicomflow" not in p.parts)


def wait_for_succeeded(proc: subprocess.Popen[Any], state: Path, at_least: int, timeout: float = 120) -> int:
    """Poll a running `dicomflow convert`'s state until `at_least` series succeeded, the process ended, or
    `timeout` passed; returns the last count read."""
    deadline = time.monotonic() + timeout
    succeeded = 0
    while time.monotonic() < deadline and proc.poll() is None and succeeded < at_least:
        if state.exists():
            with sqlite3.connect(state, timeout=30) as db:
                try:
                    succeeded = db.execute("SELECT COUNT(*) FROM items WHERE state = 'succeeded'").fetchone()[0]
                except sqlite3.OperationalError:
                    succeeded = 0  # the run has not created its tables yet
        time.sleep(0.05)
    return succeeded
