"""Errors that the CLI turns into a one-line ``Error:`` message and a non-zero exit.

Library code raises :class:`GanprintError` (or a subclass) with a message that names the
offending file and says what to do; the CLI never shows a traceback for these.
"""

from __future__ import annotations

import re

_LINE_BREAKS = re.compile(r"[ \t]*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+[ \t]*")


def one_line(message: str) -> str:
    """``message`` on one line: each line break (and the indentation around it) becomes one space.

    Runs of spaces inside a line are kept, so a quoted value such as ``'0   '`` prints exactly."""
    return _LINE_BREAKS.sub(" ", str(message)).strip()


class GanprintError(Exception):
    """A user-facing error: bad input, missing weights, mismatched artifacts."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return one_line(self.message)


class BadImageError(GanprintError):
    """An input file that is not a readable image."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"{path}: {reason}; remove or fix the file, or pass --skip-bad to drop unreadable images"
        )


class ArtifactError(GanprintError):
    """An artifact that is missing, corrupt, or inconsistent with another one."""


class WeightsError(GanprintError):
    """Backbone weights that cannot be found or loaded."""
