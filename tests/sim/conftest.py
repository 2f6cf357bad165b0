"""The simulation's summary line, printed with each tier's pytest summary (seeds, faults, invariants)."""

from __future__ import annotations

import pytest

SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in SUMMARY:
        terminalreporter.write_line(f"simulation: {line}")
