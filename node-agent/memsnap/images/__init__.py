"""Checkpoint images: CRIU image directories as layers of a chain, each with a manifest."""
