"""Turn PyTorch models into ONNX files the pipeline runs with onnxruntime: the PathCLIP
image encoder (``python -m exporters.pathclip_onnx``) and sub-models
(``python -m exporters.submodels``)."""
