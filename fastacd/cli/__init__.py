"""The command line: ``fastacd run`` (hierarchies over a folder of images), ``demo``, ``info``,
``bench``. ``main`` parses; ``run`` does the work."""
from .main import main  # noqa: F401
