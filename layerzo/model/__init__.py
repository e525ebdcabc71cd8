"""layerzo.model."""
