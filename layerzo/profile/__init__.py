"""layerzo.profile.run."""
