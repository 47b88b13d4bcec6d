"""Shared by every stage: errors, atomic files, the manifest, tokenizer and vocabulary, the cache contract,
typed settings, runtime choices (device, workers, autocast) and torch.distributed glue."""
