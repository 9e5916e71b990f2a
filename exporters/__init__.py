"""Turn PyTorch models into ONNX files the pipeline runs with onnxruntime."""
