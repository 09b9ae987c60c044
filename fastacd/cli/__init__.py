"""The command line: ``fastacd run`` (hierarchies over a folder of images), ``demo``, ``info``,
``bench``. ``main`` parses; ``inputs`` reads sources, images and class indices; ``outdir``
owns the output folder (atomic files, the lock, what counts as finished); ``run`` does the work."""


class RunError(Exception):
    """A problem with the command's arguments, inputs or output folder: a one-line message and
    exit code 2, no traceback."""


from .main import main  # noqa: E402,F401
