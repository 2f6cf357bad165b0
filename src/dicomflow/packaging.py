"""`make dist`: the Cloud Functions source archive that Terraform uploads (infra/functions.tf).

Cloud Functions (gen2) builds from a source folder with `main.py` and `requirements.txt`. The archive
holds functions/main.py, the dicomflow package itself (so the functions run exactly this code), and the
runtime dependencies pinned to the versions in constraints.txt (the versions the tests ran with).

    python -m dicomflow.packaging dist/functions-source.zip
"""

from __future__ import annotations

import re
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Fixed timestamps make the archive byte-identical for identical sources (its hash names the object).
_EPOCH = (1980, 1, 1, 0, 0, 0)


def runtime_requirements(pyproject: Path, constraints: Path) -> list[str]:
    """pyproject's runtime dependencies, pinned to constraints.txt where it pins them."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = {}
    for line in constraints.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    requirements = []
    for dependency in dependencies:
        name = re.split(r"[<>=!~\[ ;]", dependency, maxsplit=1)[0].lower().replace("_", "-")
        requirements.append(f"{name}=={pins[name]}" if name in pins else dependency)
    # gunicorn serves the worker image only; the functions runtime brings its own server.
    return [r for r in requirements if not r.startswith("gunicorn")]


def build(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    package = REPO / "src" / "dicomflow"
    requirements = runtime_requirements(REPO / "pyproject.toml", REPO / "constraints.txt")
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        _add(archive, "main.py", (REPO / "functions" / "main.py").read_bytes())
        _add(archive, "requirements.txt", ("\n".join(requirements) + "\n").encode())
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
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "dist/functions-source.zip")
    built = build(target)
    sys.stdout.write(f"wrote {built} ({built.stat().st_size // 1024} KiB)\n")


if __name__ == "__main__":
    main()
