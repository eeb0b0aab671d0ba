"""Prints the corpus comparison (libs.mime against the plain email package) in the terminal
summary of any run that included it, without -s."""

from __future__ import annotations

import pytest
from _pytest.terminal import TerminalReporter

REPORT = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(REPORT, None)
    if lines:
        terminalreporter.section("MIME corpus: libs.mime against Python's plain email package")
        for line in lines:
            terminalreporter.write_line(line)
