"""The one error type for user mistakes: a bad setting, file or value.

The command line catches only this type (one ``error:`` line per problem, exit status 2); every other
exception is a bug (ours or a dependency's) and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """One or more user mistakes; ``problems`` holds one ``setting=value: reason`` line per mistake."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
