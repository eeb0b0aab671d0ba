"""Progress for the commands that wait: a spinner while a step runs, then one line saying how it
ended and how long it took.

:mod:`cli.stack` and :mod:`cli.services` take a :data:`Step` and know nothing of the terminal;
:func:`quiet` is their default, so tests and library callers print nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.text import Text

__all__ = ["Step", "StepLine", "Steps", "quiet"]


@dataclass(slots=True)
class StepLine:
    """What a step's closing line says; the step may replace it with its outcome."""

    text: str


# A step: ``with step("starting kafka on 127.0.0.1:9092") as line: ...``
Step = Callable[[str], AbstractContextManager[StepLine]]


@contextmanager
def quiet(what: str) -> Iterator[StepLine]:
    yield StepLine(what)


class Steps:
    """Steps shown on a rich console: a spinner on a terminal; elsewhere (a log, CI) a line when
    a step is still running after ``announce_after_s``, so a step of minutes does not look hung
    and a quick one prints only its closing line."""

    def __init__(self, console: Console | None = None, *, announce_after_s: float = 1.0) -> None:
        self.console = console or Console(highlight=False)
        self.announce_after_s = announce_after_s
        self._depth = 0  # rich shows one live display at a time: a nested step only prints

    @contextmanager
    def step(self, what: str) -> Iterator[StepLine]:
        line = StepLine(what)
        started = time.monotonic()
        spinner = self._depth == 0 and self.console.is_terminal
        announce = None
        if not spinner:
            announce = threading.Timer(
                self.announce_after_s, self.console.print, (Text(f"… {what}", style="dim"),)
            )
            announce.daemon = True
            announce.start()
        self._depth += 1
        try:
            if spinner:
                with self.console.status(Text(what)):
                    yield line
            else:
                yield line
        except BaseException:
            self.console.print(Text.assemble(("✗ ", "red"), what))
            raise
        finally:
            self._depth -= 1
            if announce is not None:
                announce.cancel()
        elapsed = time.monotonic() - started
        self.console.print(Text.assemble(("✓ ", "green"), line.text, (f" ({elapsed:.1f} s)", "dim")))

    def __call__(self, what: str) -> AbstractContextManager[StepLine]:
        return self.step(what)
