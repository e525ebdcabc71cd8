"""layerzo.sweep.run."""
