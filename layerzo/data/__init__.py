"""layerzo.data."""
