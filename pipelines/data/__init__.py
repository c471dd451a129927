"""Data: reading image sources, decoding, the shard format and manifest, the synthetic set,
previews, and turning decomposed rows into model-ready batches."""
