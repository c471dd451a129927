"""Evaluate (``recompose evaluate``): condition fidelity, the synthetic benchmark, FID/KID/CLIP."""
