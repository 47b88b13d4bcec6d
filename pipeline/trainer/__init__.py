"""What every decoder-training stage (train, scst) does around its own step: batches, validation, the run
and its state, output claiming, logs and plots. Not a stage: train and scst import it, never each other."""
