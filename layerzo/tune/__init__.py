"""layerzo.tune."""
