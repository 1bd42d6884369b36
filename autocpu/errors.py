"""The one error type and the one warning type, and how an exception becomes one line."""

from __future__ import annotations


class AutocpuError(Exception):
    """A problem the user can fix; ``str()`` is one line naming the problem and the fix."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} -- {fix}")


class AutocpuWarning(UserWarning):
    """Something the user should know that does not stop the call (e.g. a plan not reused)."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters: how autocpu reports
    an exception it caught (failed trials, unreadable files, unreachable storage)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:limit] if text else ''}".rstrip(": ")
