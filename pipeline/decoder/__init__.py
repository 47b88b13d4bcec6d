"""The decoder and everything stage 2 shares: the cached dataset, the model, decoding, checkpoints, metrics."""
