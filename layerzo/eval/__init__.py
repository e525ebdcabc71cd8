"""layerzo.eval."""
