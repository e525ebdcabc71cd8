"""layerzo.zo.engine."""
