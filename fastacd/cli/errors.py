"""The command line's one exception."""


class RunError(Exception):
    """A problem with the command's arguments, inputs or output folder: a one-line message and
    exit code 2, no traceback."""
