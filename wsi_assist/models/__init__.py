"""Models over tiles: PathCLIP (and other open_clip) embeddings and zero-shot classes
(``pathclip``, ``embed``, ``zeroshot``), ONNX sub-models (``submodels``, ``stain``), and
the captioner."""
