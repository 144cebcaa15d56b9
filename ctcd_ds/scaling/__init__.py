"""Scaling experiments (``ctcd-ds scale``): a grid of short runs through the launcher, one CSV row and plot point
each. ``grid`` names the points and their commands, ``sweep`` runs and measures them, ``report`` writes the table
and the plot."""
