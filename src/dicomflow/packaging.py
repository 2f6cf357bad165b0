"""`make dist`: the Cloud Functions source archive that Terraform uploads (infra/functions.tf).

Cloud Functions (gen2) builds from a source folder with `main.py` and `requirements.txt`. The archive
holds functions/main.py, the dicomflow package itself (so the functions run exactly this code), and
functions/requirements.txt: the whole dependency closure of the runtime dependencies, pinned to the
versions of constraints.txt (the versions the tests ran with) and locked with the SHA-256 of every file
PyPI has for each version. pip installs a file only if its hash is listed (`--require-hashes` mode, which
any `--hash` line turns on), so the build can neither pick another version nor a re-uploaded file.

    python -m dicomflow.packaging dist/functions-source.zip   # build the archive (checks the lock first)
    python -m dicomflow.packaging lock                        # regenerate functions/requirements.txt

`lock` needs uv (`python -m pip install uv`) and network access to PyPI. It resolves for the functions
runtime (CPython 3.11 on x86-64 Linux) whatever machine runs it, so a lock made on an ARM laptop is the
one Cloud Functions installs. Run it after changing pyproject.toml's dependencies or constraints.txt;
`make dist` refuses a lock that no longer matches them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "functions" / "requirements.txt"
# Fixed timestamps make the archive byte-identical for identical sources (its hash names the object).
_EPOCH = (1980, 1, 1, 0, 0, 0)
# The runtime the functions are deployed on (infra/functions.tf: runtime = "python311").
TARGET_PYTHON = "3.11"
TARGET_PLATFORM = "x86_64-manylinux_2_28"
INDEX_URL = "https://pypi.org/simple"
# gunicorn serves the worker image; the functions runtime brings its own server (functions-framework may
# still pull it in as a dependency: then the lock has it, hashed like everything else).
_NOT_FOR_FUNCTIONS = ("gunicorn",)

_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


class LockError(Exception):
    """functions/requirements.txt is missing, incomplete or out of date."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(constraints: Path) -> dict[str, str]:
    pins = {}
    for line in constraints.read_text().splitlines():
        match = _REQUIREMENT.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def runtime_requirements(pyproject: Path, constraints: Path) -> list[str]:
    """pyproject's runtime dependencies, pinned to constraints.txt where it pins them (the lock's input)."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = _pins(constraints)
    requirements = []
    for dependency in dependencies:
        name = canonical(re.split(r"[<>=!~\[ ;]", dependency, maxsplit=1)[0])
        if name in _NOT_FOR_FUNCTIONS:
            continue
        requirements.append(f"{name}=={pins[name]}" if name in pins else dependency)
    return requirements


@dataclass(frozen=True)
class Locked:
    name: str
    version: str
    hashes: tuple[str, ...]


def read_lock(text: str) -> list[Locked]:
    """The requirements of a hashed requirements file (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    locked = []
    for raw in joined.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise LockError(f"unexpected option line in {LOCK.name}: {line[:60]}")
        match = _REQUIREMENT.match(line)
        if not match:
            raise LockError(f"{LOCK.name}: {line[:60]!r} is not pinned with ==")
        locked.append(Locked(canonical(match.group(1)), match.group(2), tuple(_HASH.findall(line))))
    return locked


def check_lock(
    lock: Path = LOCK, pyproject: Path = REPO / "pyproject.toml", constraints: Path = REPO / "constraints.txt"
) -> list[Locked]:
    """The lock covers every runtime dependency, pins every package at constraints.txt's version, and
    hashes every one. Raises LockError saying how to fix it otherwise."""
    fix = "regenerate it: python -m dicomflow.packaging lock"
    if not lock.is_file():
        raise LockError(f"{lock} is missing; {fix}")
    locked = read_lock(lock.read_text())
    by_name = {entry.name: entry for entry in locked}
    pins = _pins(constraints)
    problems = [f"{e.name}=={e.version} has no --hash" for e in locked if not e.hashes]
    problems += [
        f"{e.name}=={e.version} but constraints.txt pins {pins[e.name]}"
        for e in locked
        if e.name in pins and pins[e.name] != e.version
    ]
    for requirement in runtime_requirements(pyproject, constraints):
        name = canonical(re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0])
        if name not in by_name:
            problems.append(f"the runtime dependency {name} is not locked")
    if problems:
        where = lock.relative_to(REPO) if lock.is_relative_to(REPO) else lock
        raise LockError(f"{where} is out of date: {'; '.join(problems)}; {fix}")
    return locked


def lock(output: Path = LOCK) -> Path:
    """Resolve and hash the closure with uv for the functions runtime, into functions/requirements.txt."""
    uv = shutil.which("uv")
    command = [uv] if uv else [sys.executable, "-m", "uv"]
    requirements = runtime_requirements(REPO / "pyproject.toml", REPO / "constraints.txt")
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "requirements.in"
        source.write_text("\n".join(requirements) + "\n")
        compiled = Path(scratch) / "requirements.txt"
        subprocess.run(
            [
                *command,
                "pip",
                "compile",
                str(source),
                "--constraint",
                str(REPO / "constraints.txt"),
                "--generate-hashes",
                "--python-version",
                TARGET_PYTHON,
                "--python-platform",
                TARGET_PLATFORM,
                "--index-url",
                INDEX_URL,
                "--no-config",
                "--no-header",
                "--no-annotate",
                "--quiet",
                "--output-file",
                str(compiled),
            ],
            check=True,
        )
        header = (
            "# The Cloud Functions' dependency closure, pinned to constraints.txt and locked by hash (every\n"
            "# file PyPI has for each version). Generated by `python -m dicomflow.packaging lock` (uv pip\n"
            f"# compile for CPython {TARGET_PYTHON} on {TARGET_PLATFORM}); do not edit by hand.\n"
        )
        output.write_text(header + compiled.read_text())
    check_lock(output)
    return output


def build(target: Path) -> Path:
    check_lock()
    target.parent.mkdir(parents=True, exist_ok=True)
    package = REPO / "src" / "dicomflow"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        _add(archive, "main.py", (REPO / "functions" / "main.py").read_bytes())
        _add(archive, "requirements.txt", LOCK.read_bytes())
        for path in sorted(package.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".typed", ".json"):
                _add(archive, f"dicomflow/{path.relative_to(package).as_posix()}", path.read_bytes())
    return target


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def main() -> None:
    argument = sys.argv[1] if len(sys.argv) > 1 else "dist/functions-source.zip"
    try:
        if argument == "lock":
            written = lock()
            sys.stdout.write(f"wrote {written} ({len(read_lock(written.read_text()))} packages)\n")
            return
        built = build(Path(argument))
    except LockError as exc:
        sys.stderr.write(f"{exc}\n")
        raise SystemExit(1) from exc
    sys.stdout.write(f"wrote {built} ({built.stat().st_size // 1024} KiB)\n")


if __name__ == "__main__":
    main()
