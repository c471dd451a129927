"""Decompose (``recompose decompose``): an image dataset → condition shards, on Ray Data."""
