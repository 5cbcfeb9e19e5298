"""Export: safetensors, ONNX and the MLflow model."""
