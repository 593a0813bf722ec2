"""Errors meant for the user: one line naming the problem and the fix."""


class QBenchError(Exception):
    """An error the CLI prints as one line (no traceback) before exiting 2."""
