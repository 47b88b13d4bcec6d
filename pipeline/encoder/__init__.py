"""The frozen image encoder shared by `extract` and `caption` (not a stage): decoding, preprocessing, building the encoder from its record, encoding batches."""
