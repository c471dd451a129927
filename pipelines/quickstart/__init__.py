"""Quickstart (``recompose quickstart``): every stage end to end on one machine, with a report."""
