"""layerzo.patch.format."""
