"""The live progress of ``autocpu tune``: a bar, and a line per finished trial above it."""

from __future__ import annotations

from typing import Any

from autocpu.report import format_params


class TuneProgress:
    """Live progress for ``autocpu tune``: a bar (trial n of N, current candidate, best speedup,
    failures) and one line per finished trial above it."""

    def __init__(self, console: Any, quiet: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.quiet = quiet
        self.console = console
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=True,
            disable=quiet,
        )
        self.task = self.bar.add_task("baseline", total=None, status="")

    def __enter__(self) -> TuneProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, event: Any) -> None:
        record = event.record
        status = f"best {event.best_speedup:.2f}x, {event.failures} failed"
        if event.started:
            what = f"{record.backend} {format_params(record.params)}"
            self.bar.update(self.task, description=what[:60], total=event.total, status=status)
            return
        self.bar.update(self.task, completed=event.finished, status=status)
        if self.quiet:
            return
        latency = f"{record.median_ms:8.2f} ms" if record.latency else "       - ms"
        note = f"  {record.reason}" if record.reason else ""
        self.console.print(
            f"trial {event.finished:>3} {record.backend:<13} {latency}  {record.status:<10} "
            f"{format_params(record.params)}{note}"
        )
