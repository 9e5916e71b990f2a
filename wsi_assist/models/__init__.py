"""Models over tiles: PathCLIP (and other open_clip) embeddings and zero-shot classes.

``pathclip`` loads image-text models by spec and embeds tiles; ``zeroshot`` turns
embeddings into class probabilities with prompt sets; ``embed`` is the pipeline stage
that runs the image encoder over a slide's tile stream (torch or onnxruntime).
"""
