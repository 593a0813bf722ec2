"""Errors meant for the user: one line naming the problem and the fix."""


class QBenchError(Exception):
    """An error the CLI prints as one line (no traceback) before exiting 2."""


def describe_validation(exc) -> str:
    """The first problem of a pydantic ``ValidationError`` as "field 'a.b':
    message" (or just the message when it concerns the whole object)."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"field '{field}': {message}" if field else message
