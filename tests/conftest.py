"""Fixtures shared by every tier."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomflow import bootstrap
from dicomflow.config import Mode, Settings, load_settings
from dicomflow.services.context import Context

TIER_MARKERS = {"unit", "contract", "simulation", "integration", "emulator", "e2e", "infra"}
IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test must belong to a tier, or `make test` would never run it."""
    untiered = [item.nodeid for item in items if not TIER_MARKERS & {m.name for m in item.iter_markers()}]
    if untiered:
        raise pytest.UsageError("tests without a tier marker: " + ", ".join(untiered[:10]))


def require(condition: bool, reason: str) -> None:
    """Skip locally when a real component is missing; in CI that is a failure, never a skip."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required component missing in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for local mode in a temporary state file, with fast retries for tests."""

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "mode": Mode.LOCAL,
            "state_path": str(tmp_path / "state" / "state.sqlite"),
            "work_dir": str(tmp_path / "work"),
            "workers": 2,
            "retry_min_backoff_seconds": 0.05,
            "retry_max_backoff_seconds": 0.2,
        }
        values.update(overrides)
        return load_settings(environ={}, **values)

    return factory


@pytest.fixture
def local_ctx(make_settings: Callable[..., Settings]) -> Iterator[Context]:
    ctx = bootstrap.build(make_settings())
    yield ctx
    for closable in (ctx.store, ctx.queue):
        close = getattr(closable, "close", None)
        if close:
            close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests.support import emulators

    emulators.stop_all()
