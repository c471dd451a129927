"""Generate (``recompose generate``): conditions from command-line flags → samples and pictures."""
