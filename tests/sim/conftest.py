"""The simulation's summary line, printed with each tier's pytest summary (seeds, faults, invariants)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in SUMMARY:
        terminalreporter.write_line(f"simulation: {line}")


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """The services log every event; a simulation test reports only what its assertions say."""
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)
