"""Running the `dicomflow` command as a user does: a real process, with its own HOME (so the registry of
recent destinations is the test's own) and short retry delays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
