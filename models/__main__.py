"""``python -m models``: the parameter count of every preset."""

from models.presets import parameter_counts

for name, n in parameter_counts().items():
    print(f"{name:<8} {n / 1e6:8.1f} M parameters")
