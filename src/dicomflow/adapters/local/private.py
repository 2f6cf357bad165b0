"""Local state is private to the user: its folder 0700, its files 0600 (docs/privacy.md).

Local state may name source files by path (the user's own machine), so it is kept from other accounts
on a shared machine. Outputs are not touched: they are the user's to share, with the permissions their
umask gives.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed; a folder dicomflow owns (`.dicomflow`, or one it has just
    created) is made 0700. A folder the user chose and that existed is left as it is."""
    existed = path.exists()
    path.mkdir(parents=True, exist_ok=True)
    if not existed or path.name == ".dicomflow":
        with contextlib.suppress(OSError):
            path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """Make an existing state file 0600 (SQLite's -wal and -shm files copy the database file's mode)."""
    with contextlib.suppress(OSError):
        path.chmod(0o600)
    return path
