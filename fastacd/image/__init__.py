"""Images: tiles (``tiling_2d``), the 2-D agglomeration (``agg_2d``, the original's dict of
lists), hierarchies as trees (``hierarchy``) and plots (``plots``)."""
