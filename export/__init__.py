"""Export: the step model, checkpoints, and (later) ONNX/TensorRT artifacts. Stands on trees/."""
