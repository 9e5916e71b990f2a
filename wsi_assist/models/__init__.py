"""Models: PathCLIP embeddings, zero-shot classes, ONNX sub-models, captioners."""
