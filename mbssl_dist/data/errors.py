"""The one exception type of the data layer: it always names where the problem is."""

from __future__ import annotations

import re


class DataError(ValueError):
    """Bad input data. ``str()`` reads ``FILE:LINE: problem`` (or ``FILE: problem``)."""

    def __init__(self, problem: str, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        problem = re.sub(r"\s*\n\s*", " ", str(problem)).strip()  # one line, even for library messages
        self.problem = problem
        self.file = file
        self.line = line
        self.field = field
        where = file or "<input>"
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f" (field {field!r})"
        super().__init__(f"{where}: {problem}")
