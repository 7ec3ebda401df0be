"""Progress on long stages, without threading a new parameter through every signature.

Every stage already takes `log` (a callable that writes one timestamped line). The CLI passes a `Reporter`, which is
such a callable and also draws rich progress bars; API callers and tests may pass any plain callable, and then
`track` is a no-op. A stage reports progress like this:

    with track(log, "calibration", total=len(cases)) as advance:
        for case in cases:
            ...
            advance()            # or advance(1, "case 3: astronaut") to name the step

Bars show elapsed time and, where the total is known, an ETA. They are drawn only on a terminal and never with
--quiet; the log lines are always written, so CI logs keep their timestamps.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


def _noop(n: int = 1, note: str | None = None) -> None:
    return None


@contextlib.contextmanager
def track(log: Callable[[str], None], description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A progress task on `log`'s reporter, if it has one; yields advance(n=1, note=None)."""
    tracker = getattr(log, "track", None)
    if tracker is None:
        yield _noop
        return
    with tracker(description, total) as advance:
        yield advance


class Reporter:
    """`log` for the CLI: timestamped lines on a rich Console, plus progress bars when it is a terminal."""

    def __init__(self, console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self._progress = None
        self._depth = 0

    @property
    def live(self) -> bool:
        """Bars are drawn only on an interactive terminal, and never with --quiet."""
        return not self.quiet and self.console.is_terminal

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            self.console.log(msg, highlight=False)

    @contextlib.contextmanager
    def track(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        if not self.live:
            yield _noop
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
            TimeElapsedColumn, TimeRemainingColumn

        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[dim]{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=True,
            )
            self._progress.start()
        self._depth += 1
        task = self._progress.add_task(description, total=total, note="")

        def advance(n: int = 1, note: str | None = None) -> None:
            fields = {"note": note} if note is not None else {}
            self._progress.update(task, advance=n, **fields)

        try:
            yield advance
        finally:
            self._progress.remove_task(task)
            self._depth -= 1
            if self._depth == 0:
                self._progress.stop()
                self._progress = None
