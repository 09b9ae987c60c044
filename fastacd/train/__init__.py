"""Training with CD penalties (``cdep``: CDEP), demo data sets and small demo models."""
