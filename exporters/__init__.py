"""Turn PyTorch models into ONNX sub-models (``python -m exporters.submodels``)."""
