"""`make demo` installs only what the demo needs (issue 13): the package, not the test or lint tools;
`make lint` and `make test` add theirs. Checked on make's own plan (`make -n -B`: every command it would
run, nothing run), so the prerequisite chains are tested as written."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.infra.tfcheck import REPO_ROOT

pytestmark = pytest.mark.infra

_INSTALL = re.compile(r"pip install .*-e (\S+)")


def installs(target: str) -> list[str]:
    """What `make TARGET` would pip-install into .venv, in order (the package spec: `.`, `'.[test]'`...)."""
    plan = subprocess.run(["make", "-n", "-B", target], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return [m.group(1).strip("'\"") for line in plan.stdout.splitlines() if (m := _INSTALL.search(line))]


def test_make_demo_installs_the_package_alone() -> None:
    assert installs("demo") == ["."]


def test_make_lint_adds_the_linters_and_make_test_the_test_tools() -> None:
    assert installs("lint") == [".", ".[lint]"]
    assert installs("test") == [".", ".[test]"]


def test_make_venv_still_gives_a_developer_everything() -> None:
    assert set(installs("venv")) == {".", ".[test]", ".[lint]"}
