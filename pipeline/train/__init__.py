"""Stage "train": the projection + LSTM decoder trained from the feature cache -> checkpoints, curves."""
