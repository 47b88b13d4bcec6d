"""Stage "prepare": dataset files (COCO, Karpathy, Flickr8k) -> manifest.json, vocab.json, labels.h5."""
