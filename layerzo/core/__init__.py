"""layerzo.core."""
