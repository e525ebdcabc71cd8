"""layerzo.profile: activation statistics, the dominant-layer rule, the profile run and its figure."""
