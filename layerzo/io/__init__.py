"""layerzo.io."""
