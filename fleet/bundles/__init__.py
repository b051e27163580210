"""Building signed bundles from models."""
