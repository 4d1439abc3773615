"""Training, checkpoints and evaluation of the Kepler image tokenizer."""
