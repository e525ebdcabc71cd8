"""layerzo.export.onnx."""
