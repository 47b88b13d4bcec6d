"""Self-critical sequence training (SCST) from the feature cache: CIDEr-D reward, sampling, loss."""
