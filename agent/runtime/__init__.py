"""Inference backends and the model host that hot-swaps releases."""
