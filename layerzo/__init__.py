"""layerzo: dominant-layer zeroth-order fine-tuning."""

__version__ = "0.1.0"
