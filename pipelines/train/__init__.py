"""Train (``recompose train``): condition shards → a trained pipeline, on Ray Train, in MLflow."""
