"""Serve (``recompose serve``): the Ray Serve app — JSON API, batched model deployment, web page."""
