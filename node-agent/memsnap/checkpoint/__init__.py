"""Incremental checkpoints: pre-copy layers from the tracker, a final layer from CRIU."""
