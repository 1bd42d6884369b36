"""One exception type whose message is a single line: the problem, then the fix."""

from __future__ import annotations


class AutocpuError(Exception):
    """A problem the user can fix; ``str()`` is one line naming the problem and the fix."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} -- {fix}")
