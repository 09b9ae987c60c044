"""The command line: ``fastacd run`` (hierarchies over a folder of images), ``demo``, ``info``,
``bench``. ``main`` parses; ``inputs`` reads sources, images and class indices; ``outdir``
owns the output folder (atomic files, the lock, what counts as finished); ``run`` does the work."""
from .errors import RunError  # noqa: F401
from .main import main  # noqa: F401
