"""Torch side of a stage: its slice of the model and its state pool."""
