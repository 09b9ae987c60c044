"""``python -m fastacd`` (and ``torchrun -m fastacd``): the command line of ``fastacd.cli``."""
import sys

from .cli.main import main

sys.exit(main())
