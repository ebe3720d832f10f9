"""Errors that the CLI turns into one clear line and an exit code.

A stage raises ``UsageError`` for a user's mistake (exit 2) and ``StageError`` for a failure at run
time (exit 1). Both carry a message that names the thing at fault and what to do about it; the
traceback is shown only with ``--debug``.
"""


class LlmctlError(Exception):
    exit_code = 1


class StageError(LlmctlError):
    """Runtime failure: the inputs were acceptable but the work could not be done."""

    exit_code = 1


class UsageError(LlmctlError):
    """The user asked for something that cannot work: a missing file, wrong artifact, bad option."""

    exit_code = 2
