"""The one error type for user mistakes (a bad setting, file or value), and the early stop of a run.

The command line catches :class:`UserError` (one ``error:`` line per problem, exit status 2) and
:class:`Preempted` (one line, exit status 75); every other exception is a bug (ours or a dependency's) and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """One or more user mistakes; ``problems`` holds one ``setting=value: reason`` line per mistake."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class Preempted(Exception):
    """The run stopped early on request (a signal, or its launcher went) after writing a checkpoint;
    running the same command again resumes from it. The command line exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, reason: str, step: int, checkpoint: str | None):
        self.reason, self.step, self.checkpoint = reason, step, checkpoint
        super().__init__(f"stopped by {reason} at step {step}; checkpoint {checkpoint}")


EXIT_USAGE = 2
"""Exit status of a user mistake."""
EXIT_PREEMPTED = 75
"""Exit status of a run stopped by a signal after its checkpoint (EX_TEMPFAIL: run it again to resume)."""
